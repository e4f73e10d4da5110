"""adl_llm.chat: streamed answers equal the batch decoder's, /gen is checked like an override, and the session works
piped (one answer a line) and at a terminal (a pseudo-terminal: prompt, streaming, /gen, errors, Ctrl-C, /quit)."""

from __future__ import annotations

import codecs
import copy
import io
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from adl_llm.chat import changed_gen, converse, split_args, start
from adl_llm.config import PROJECT_ROOT, GenConfig
from adl_llm.decoding import generate_texts
from adl_llm.errors import ConfigError, UserError
from adl_llm.prompts import build_prompts
from adl_llm.streaming import AnswerStream
from tests.conftest import run_module, tiny_overrides

QUESTIONS = ["子曰：學而時習之", "翻譯成白話文：天下大亂", "今天天氣很好"]


def _args(tiny_model_dir, tiny_adapter_dir, *extra):
    return [*tiny_overrides(tiny_model_dir, f"adapter={tiny_adapter_dir}", "gen=greedy"), *extra]


def _expected(session, questions, gen: GenConfig) -> list[str]:
    """What task=generate answers: the batch decoder, on the same prompts."""
    prompts = build_prompts(questions, session.cfg.prompt, session.shots)
    return generate_texts(session.model, session.tokenizer, prompts, gen, progress=False)


@pytest.fixture(scope="module")
def session(tiny_model_dir, tiny_adapter_dir):
    return start(_args(tiny_model_dir, tiny_adapter_dir, "gen.max_new_tokens=12"))


def test_a_streamed_answer_is_the_batch_decoders_and_comes_in_pieces(session):
    free = changed_gen(session.gen, ["stop_strings=[]"])
    full = _expected(session, QUESTIONS[:1], free)[0]
    stop = full[5]  # a character the model goes on to write
    cut = changed_gen(session.gen, [f'stop_strings=["{stop}", "USER:"]'])
    assert _expected(session, QUESTIONS[:1], cut)[0] == full[: full.index(stop)].strip()  # the stop string cuts it
    for gen in (free, cut):
        session.gen = gen
        for question, expected in zip(QUESTIONS[:2], _expected(session, QUESTIONS[:2], gen)):
            pieces: list[str] = []
            session.answer(question, pieces.append)
            assert "".join(pieces) == expected
            assert len(pieces) > 1 or len(expected) <= 1


class PieceTokenizer:
    """Decodes each id to a fixed piece of text, as a tokenizer does."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_the_stream_holds_back_a_possible_stop_string_spaces_and_half_characters():
    import torch

    pieces = [" ", "其", "言", "\ufffd", "也", "善 ", " U", "SE", "R:", " 又"]
    written: list[str] = []
    stream = AnswerStream(PieceTokenizer(pieces), ["USER:", "\n"], written.append)
    stream.put(torch.tensor([[0, 1]]))  # the prompt: skipped
    seen = []
    for i in range(len(pieces)):
        if pieces[i] == "\ufffd":
            pieces[i] = ""  # the next token completes the character: it decodes to nothing alone
        stream.put(torch.tensor([i]))
        seen.append("".join(written))
    stream.end()
    assert "".join(written) == "其言也善" == stream.answer
    assert all("U" not in text and not text.endswith(" ") and "\ufffd" not in text for text in seen)
    assert seen[2] == "其言"  # streamed as it came, not only at the end


def test_gen_commands_are_checked_like_overrides():
    gen = GenConfig()
    assert changed_gen(gen, ["beams=2"]).beams == 2 and gen.beams == 3
    assert changed_gen(gen, split_args('do_sample=false stop_strings=["USER:", "\\n"]')).stop_strings == ["USER:", "\n"]
    greedy = changed_gen(changed_gen(gen, ["max_new_tokens=5"]), ["greedy", "top_k=3"])
    assert (greedy.beams, greedy.do_sample, greedy.max_new_tokens, greedy.top_k) == (1, False, 128, 3)
    with pytest.raises(ConfigError, match=r"^gen\.beams: must be >= 1, got 0"):
        changed_gen(gen, ["beams=0"])
    with pytest.raises(UserError, match=r"^/gen beam7: neither key=value nor an option of gen"):
        changed_gen(gen, ["beam7"])


def _chat(*args, stdin: str, timeout=120) -> subprocess.CompletedProcess:
    return run_module("adl_llm.chat", *args, stdin=stdin, timeout=timeout)


@pytest.mark.parametrize("mistake,needle", [("gen.beams=0", "gen.beams: must be >= 1"), ("adapter=nope", "adapter")])
def test_a_start_up_mistake_is_one_line_and_exit_2(mistake, needle):
    result = _chat(mistake, stdin="")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"adl-llm: error: {needle}")


@pytest.mark.slow
def test_piped_chat_writes_one_answer_a_line(session, tiny_model_dir, tiny_adapter_dir):
    lines = f"{QUESTIONS[0]}\n/gen max_new_tokens=5\n\n{QUESTIONS[1]}\\n{QUESTIONS[2]}\n"  # \\n: a line break
    result = _chat(*_args(tiny_model_dir, tiny_adapter_dir, "gen.max_new_tokens=12"), stdin=lines)
    assert result.returncode == 0, result.stderr
    first = _expected(session, QUESTIONS[:1], changed_gen(session.gen, ["greedy", "max_new_tokens=12"]))
    two_lines = [f"{QUESTIONS[1]}\n{QUESTIONS[2]}"]
    second = _expected(session, two_lines, changed_gen(session.gen, ["greedy", "max_new_tokens=5"]))
    assert result.stdout.split("\n") == [*first, "", *second, ""]  # the command writes nothing to stdout
    assert "max_new_tokens=5" in result.stderr


def test_piped_chat_keeps_one_line_out_for_each_line_in_when_a_question_is_refused(session, capsys):
    fits = len(build_prompts(QUESTIONS[:1], session.cfg.prompt, session.shots)[0]) + 5  # one token a character
    lines = f"/gen long_prompts=refuse max_prompt_tokens={fits}\n{QUESTIONS[0]}\n{QUESTIONS[0] * 3}\n{QUESTIONS[0]}\n"
    out = io.StringIO()
    converse(copy.copy(session), io.StringIO(lines), out, interactive=False)  # the copy takes the /gen change
    answers = out.getvalue().split("\n")
    assert len(answers) == 4 and answers[1] == "" and answers[0] == answers[2] != ""  # 3 lines in, 3 out
    assert "error: " in capsys.readouterr().err


class Terminal:
    """`python -m adl_llm.chat ARGS` on a pseudo-terminal, as a user at a terminal runs it."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its stdin, stdout and stderr are the terminal
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # ^C interrupts, even if this suite runs in the background
            os.chdir(PROJECT_ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "adl_llm.chat", *args])
        self.seen = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")()  # a read may end inside a character
        self.status: int | None = None

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc) -> None:
        if self.status is None:  # a failed test leaves no chat running
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    def expect(self, text: str, timeout: float = 60) -> str:
        """Read until `text` appears; return what came before it (since the last expect)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = self._read() if ready else b""
            if not chunk:
                raise AssertionError(f"no {text!r} on the terminal, which shows:\n{self.seen[-2000:]}")
            self.seen += self.decoder.decode(chunk)
        before, _, self.seen = self.seen.partition(text)
        return before

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_status(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            if select.select([self.fd], [], [], 0.1)[0]:
                self._read()  # a child blocked on a full terminal would never exit
        raise AssertionError("the chat did not exit")

    def _read(self) -> bytes:
        try:
            return os.read(self.fd, 4096)
        except OSError:  # EIO: the child has closed the terminal
            return b""


@pytest.mark.slow
def test_chat_at_a_terminal(session, tiny_model_dir, tiny_adapter_dir):
    with Terminal(*_args(tiny_model_dir, tiny_adapter_dir, "gen.max_new_tokens=12")) as term:
        _converse_at_a_terminal(term, session)


def _converse_at_a_terminal(term: Terminal, session) -> None:
    assert "/help for commands" in term.expect("> ")
    term.send(QUESTIONS[0] + "\r")
    greedy = changed_gen(session.gen, ["greedy", "max_new_tokens=12"])
    assert _expected(session, QUESTIONS[:1], greedy)[0] in term.expect("> ")

    term.send("/gen beams=2\r")
    assert "beams=2 " in term.expect("> ")
    term.send(QUESTIONS[1] + "\r")
    assert _expected(session, QUESTIONS[1:2], changed_gen(greedy, ["beams=2"]))[0] in term.expect("> ")
    term.send("/gen beams=0\r")
    assert "error: gen.beams: must be >= 1, got 0" in term.expect("> ")
    term.send("/gen\r")
    assert "beams=2 " in term.expect("> ")  # the session goes on with the setting it had

    term.send("/gen beams=1 stop_strings=[] max_new_tokens=1000\r")
    term.expect("> ")
    term.send(QUESTIONS[0] + "\r")
    term.expect(QUESTIONS[0])  # the line echoed; then the answer streams
    start = _expected(session, QUESTIONS[:1], greedy)[0][:3]
    assert len(start) == 3
    term.expect(start)
    term.send("\x03")  # Ctrl-C stops the answer, not the session
    term.expect("[stopped]")
    term.expect("> ")
    term.send("/help\r")
    assert "/quit" in term.expect("> ")
    term.send("/quit\r")
    assert term.exit_status() == 0
