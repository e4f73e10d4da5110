"""Model and adapter folders checked before anything loads: a damaged or incomplete folder is one line naming the
file, in a second, not a traceback after minutes of loading a base model.

Weights must be safetensors: an adapter holding only `adapter_model.bin` (a pickle) is refused rather than
unpickled, and every safetensors file must be whole (its header parses and the data it describes is all there).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from adl_llm.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def damaged_safetensors(path: Path) -> str | None:
    """Why the safetensors file at `path` cannot be whole (a truncated copy, an interrupted save), or None."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > size - 8:
                return f"{size} bytes, shorter than its header"
            header = json.loads(handle.read(header_size))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "not a safetensors file"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    return None if size >= expected else f"{size} bytes of {expected}: truncated"


def check_adapter_folder(folder: str | Path, key: str) -> None:
    """A PEFT adapter folder: a readable adapter_config.json and whole safetensors weights."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelError(f"{key}={folder}: no such adapter folder")
    config = path / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"{key}={folder}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"{key}={folder}: adapter_config.json is not valid JSON ({err})") from None
    if not isinstance(parsed, dict) or "peft_type" not in parsed:
        raise ModelError(f"{key}={folder}: adapter_config.json is not a PEFT adapter config (no peft_type)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise ModelError(
            f"{key}={folder}: "
            + (
                "holds only adapter_model.bin, a pickle, which adl-llm does not load; save it as safetensors"
                if pickled
                else "no adapter_model.safetensors"
            )
        )
    _check_weights(weights, f"{key}={folder}")


def check_model_folder(folder: Path, key: str) -> None:
    """A local model folder: config.json, tokenizer files, and whole safetensors weights."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{key}={folder}: not a model folder (no config.json)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{key}={folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    for weights in sorted(folder.glob("*.safetensors")):
        _check_weights(weights, f"{key}={folder}")


def _check_weights(path: Path, where: str) -> None:
    reason = damaged_safetensors(path)
    if reason:
        raise ModelError(f"{where}: {path.name} is damaged ({reason}); copy or save it again")
