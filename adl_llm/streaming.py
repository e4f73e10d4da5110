"""One answer written while it is generated, ending where the batch decoder cuts it (adl_llm/decoding.py).

What an `AnswerStream` has written once generation ends is exactly `cut_at_stop(new text, stop strings)`, the
answer `task=generate` gives: text that may still turn out to be the start of a stop string, trailing spaces
(stripped at the end) and a half-decoded character are held back until the next tokens settle them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers.generation.streamers import BaseStreamer

from adl_llm.decoding import cut_at_stop

HALF_DECODED = "\ufffd"  # what a tokenizer decodes the first bytes of a character split over tokens to


class AnswerStream(BaseStreamer):
    """A streamer for `model.generate(streamer=...)` of one prompt; `write` gets each settled piece of the answer."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], write: Callable[[str], None]):
        self.tokenizer, self.stop_strings, self.write = tokenizer, list(stop_strings), write
        self.ids: list[int] = []
        self.prompt_passed = False  # generate passes the prompt first
        self.written = ""
        self.done = False

    def put(self, value) -> None:
        if not self.prompt_passed:
            self.prompt_passed = True
            return
        if not self.done:
            self.ids.extend(value.reshape(-1).tolist())
            self._write(final=False)

    def end(self) -> None:
        if not self.done:
            self._write(final=True)

    @property
    def answer(self) -> str:
        return cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop_strings)

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if any(stop in text for stop in self.stop_strings):
            final = True  # generation stops at this token; anything after the stop string is not the answer
        if final:
            self.done = True
            settled = cut_at_stop(text, self.stop_strings)
        else:
            # the answer's spaces are stripped at the end: trailing ones wait for the text that follows them
            settled = text[: len(text) - unsettled(text, self.stop_strings)].rstrip(HALF_DECODED).strip()
        if settled.startswith(self.written) and len(settled) > len(self.written):
            self.write(settled[len(self.written) :])
            self.written = settled


def unsettled(text: str, stop_strings: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    return max((k for stop in stop_strings for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
