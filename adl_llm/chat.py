"""Talk to the tuned model: each line is wrapped in the study's prompt and answered with the study's decoding.

    python -m adl_llm.chat adapter=outputs/runs/<run>/adapter                    # at a terminal: answers stream
    python -m adl_llm.chat adapter=... gen=greedy prompt=few_shot gen.max_new_tokens=64
    python -m adl_llm.chat model.name_or_path=outputs/runs/<run>/model model.quant=none   # an exported model
    printf '...\\n...\\n' | python -m adl_llm.chat adapter=... gen=greedy           # scripted

The command line takes the entrypoint's overrides (model, adapter, prompt, gen, data for the few-shot examples,
seed). At a terminal it shows a prompt and streams each answer; with stdin not a terminal it reads one question
a line and writes one answer a line to stdout (a newline inside an answer written as the two characters \\n),
everything else to stderr. A \\n typed in a question is a line break (the data's questions have them). Lines
starting with / are commands (/help lists them). Nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import TextIO

from adl_llm.config import CONF_DIR, Config, GenConfig, compose
from adl_llm.errors import UserError, one_line_error

HELP = """commands:
  /gen key=value ...  change the decoding, checked like gen.key=value at start-up (beams, do_sample, top_p, top_k,
                      temperature, max_new_tokens, stop_strings); /gen greedy: an option of conf/gen/, as gen=greedy
                      at start-up (more key=value may follow); /gen alone shows the setting
  /prompt             show the prompt each line is wrapped in
  /help               this list
  /quit               leave (or Ctrl-D); Ctrl-C stops the answer being written
Each line is a new question (\\n in it: a line break); the study's prompt is single-turn, so there is no history.
With one beam answers stream as they are generated; with beams > 1 each is written whole once done (transformers
streams only one beam)."""

DECODING = ("beams", "do_sample", "top_p", "top_k", "temperature", "max_new_tokens", "stop_strings")


def changed_gen(gen: GenConfig, args: list[str]) -> GenConfig:
    """`gen` with `/gen` arguments applied: options of conf/gen/ first, then key=value, checked as at start-up."""
    from omegaconf import OmegaConf

    from adl_llm.conf_files import option_values

    options = sorted(path.stem for path in (CONF_DIR / "gen").glob("*.yaml"))
    node = OmegaConf.create({"gen": OmegaConf.structured(gen)})
    for arg in (a for a in args if "=" not in a):
        if arg not in options:
            raise UserError(f"/gen {arg}: neither key=value nor an option of gen ({', '.join(options)})")
        node.gen = OmegaConf.merge(OmegaConf.structured(GenConfig()), option_values(f"gen/{arg}"))
    node.merge_with(OmegaConf.from_dotlist([f"gen.{a}" for a in args if "=" in a]))
    return OmegaConf.to_object(node.gen)


def describe(gen: GenConfig) -> str:
    """The decoding keys as `/gen` takes them."""
    values = {key: getattr(gen, key) for key in DECODING}
    return " ".join(f"{key}={str(v).lower() if isinstance(v, bool) else repr(v)}" for key, v in values.items())


def split_args(text: str) -> list[str]:
    """Words split at spaces outside brackets and quotes: `/gen stop_strings=["USER:", "\\n"] beams=1`."""
    return re.findall(r"""(?:[^\s\[\]"']+|\[[^\]]*\]|"[^"]*"|'[^']*')+""", text)


@dataclasses.dataclass
class Session:
    cfg: Config
    model: object
    tokenizer: object
    shots: list  # the few-shot examples the prompt shows (none for zero-shot)
    gen: GenConfig
    stops: dict = dataclasses.field(default_factory=dict)  # stop strings -> criterion factory (1 s for 262k tokens)

    def command(self, line: str) -> str:
        """Run a /command; returns what to show. A mistake is a UserError."""
        name, *args = split_args(line)
        if name == "/help":
            return HELP
        if name == "/prompt":
            from adl_llm.prompts import build_prompts

            return build_prompts(["{your line}"], self.cfg.prompt, self.shots)[0]
        if name == "/gen":
            if args:
                self.gen = changed_gen(self.gen, args)
            return describe(self.gen)
        raise UserError(f"{name}: unknown command; /help lists them")

    def answer(self, line: str, write: Callable[[str], None]) -> None:
        """Answer one line, giving `write` the answer as it settles (whole at the end, with beams > 1)."""
        import torch
        from transformers import StoppingCriteriaList

        from adl_llm.decoding import encode_prompts, generate_from_ids, generation_config, stop_criterion
        from adl_llm.generate import fit_prompts
        from adl_llm.prompts import build_prompts
        from adl_llm.streaming import AnswerStream

        prompt = build_prompts([line], self.cfg.prompt, self.shots)
        limit = self.gen.max_prompt_tokens or self.cfg.eval.max_length
        bos = self.tokenizer.bos_token_id is not None
        [ids], _ = fit_prompts(encode_prompts(self.tokenizer, prompt), limit, self.gen.long_prompts, ["line"], bos)
        if self.gen.beams > 1:
            write(generate_from_ids(self.model, self.tokenizer, [ids], self.gen, progress=False)[0])
            return
        key = tuple(self.gen.stop_strings)
        if key not in self.stops:
            self.stops[key] = stop_criterion(self.tokenizer, key)
        stops = self.stops[key]
        self.model.generate(
            input_ids=torch.tensor([ids], device=self.model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.model.device),
            generation_config=generation_config(self.gen, self.tokenizer),
            stopping_criteria=StoppingCriteriaList([stops(len(ids))] if stops else []),
            streamer=AnswerStream(self.tokenizer, self.gen.stop_strings, write),
        )


def start(overrides: list[str]) -> Session:
    """Compose and check the config, then load the tokenizer, the few-shot examples, the model and the adapter."""
    cfg = compose(*overrides)
    from adl_llm.folders import check_adapter_folder

    if cfg.adapter:  # before the heavy imports: a mistake costs a second
        check_adapter_folder(cfg.adapter, "adapter")
    from transformers import set_seed

    from adl_llm.modeling import load_adapter, load_model, load_tokenizer, model_source
    from adl_llm.prompts import load_shots
    from adl_llm.tasks import model_settings

    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    shots = load_shots(cfg)
    set_seed(cfg.seed)  # sampled answers repeat from one session to the next
    model = load_model(model_settings(cfg, compiled=False, decoding=True), source=source)
    model = load_adapter(model, cfg.adapter) if cfg.adapter else model
    return Session(cfg, model, tokenizer, shots, cfg.gen)


def converse(session: Session, stdin: TextIO, stdout: TextIO, interactive: bool) -> None:
    """Answer each line of `stdin` until EOF or /quit: at a terminal (`interactive`: read through input(), for line
    editing) with a prompt and streamed answers; otherwise one answer a line on stdout, and everything else on
    stderr."""
    notes = stdout if interactive else sys.stderr
    if interactive:
        with contextlib.suppress(ImportError):
            importlib.import_module("readline")  # line editing and history for input()
        cfg = session.cfg
        adapter = f"adapter {cfg.adapter}" if cfg.adapter else "no adapter"
        print(f"adl-llm chat: {cfg.model.name_or_path}, {adapter}, the {cfg.prompt.name} prompt", file=stdout)
        print(f"decoding: {describe(session.gen)}\n/help for commands, /quit or Ctrl-D to leave", file=stdout)
    while True:
        try:
            line = input("> ") if interactive else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=stdout)
            continue
        if not interactive and not line:
            break
        line = line.rstrip("\r\n")
        if line.strip() == "/quit":
            break
        try:
            if line.startswith("/"):
                print(session.command(line), file=notes, flush=True)
            elif line.strip():
                _answer(session, line.replace("\\n", "\n"), stdout, interactive)  # the data's questions span lines
            elif not interactive:
                print(file=stdout, flush=True)  # one line out for each line in
        except Exception as err:  # a mistake of the user's (a bad /gen value, a prompt refused) is one line
            message = one_line_error(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr, flush=True)
            if not interactive and not line.startswith("/"):
                print(file=stdout, flush=True)  # still one line out for each line in: an empty answer


def _answer(session: Session, line: str, stdout: TextIO, interactive: bool) -> None:
    def write(text: str) -> None:
        stdout.write(text if interactive else text.replace("\n", "\\n"))
        stdout.flush()

    try:
        session.answer(line, write)
    except KeyboardInterrupt:
        if not interactive:
            raise
        write("  [stopped]")
    print(file=stdout, flush=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m adl_llm.chat [overrides]`: a mistake at start-up is one line, exit status 2, as the entrypoint's."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip() + "\n\n" + HELP)
        return
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    try:
        session = start(argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        message = one_line_error(exc)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"adl-llm: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_status", 2))
    try:
        converse(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    except KeyboardInterrupt:
        print("\nadl-llm: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
