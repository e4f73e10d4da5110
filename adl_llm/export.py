"""The adapter merged into its base model and saved as one standalone Hugging Face model folder: safetensors weights
in `export.dtype`, config, tokenizer, the gen group's decoding as generation_config.json, and a model card.

    python -m adl_llm.run task=export adapter=outputs/runs/<run>/adapter [export.dtype=float32] [export.dir=...]

The base is loaded unquantised in float32 on the CPU, the adapter merged into it (W + alpha/r * B @ A, rounded
once) and the result cast to `export.dtype`: merged in bf16, each weight would be rounded twice. A QLoRA adapter
was trained, and the study measured it, on the NF4-quantised base, but the merged weights cannot be NF4 again
without a new rounding of every weight; so the export is the adapter on the full-precision base, which scores
slightly differently from NF4 + adapter (the model card says so). The folder is built under a temporary name and
renamed into place, and only an earlier export is ever replaced.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from adl_llm.artifacts import provenance, replace_dir, write_json, write_text
from adl_llm.config import Config, DType, Quant
from adl_llm.decoding import generation_config
from adl_llm.errors import ResourceError, UserError
from adl_llm.memory import GIB
from adl_llm.model_card import model_card
from adl_llm.modeling import load_adapter, load_model
from adl_llm.stages import lineage

log = logging.getLogger(__name__)

MARKER = "adl_llm_export.json"  # what the export was made of; only a folder holding it is ever replaced


def export_dir(cfg: Config) -> Path:
    """Where the model folder goes: `export.dir`, or model/ inside the run folder."""
    return Path(cfg.export.dir).expanduser() if cfg.export.dir else Path(cfg.output_dir) / "model"


def check_export_dir(folder: Path, run_dir: Path) -> None:
    """Refuse, before anything loads, a destination that is not a new or empty folder or an earlier export (a base
    model folder, a home folder), or one that cannot be written."""
    where = f"export.dir={folder}"
    if folder.resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
        raise UserError(f"{where}: holds the run folder {run_dir}; give a folder of its own")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{where}: is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise UserError(f"{where}: exists and is not an earlier export (no {MARKER}); give a new or empty folder")
    existing = next(p for p in (folder.parent, *folder.parent.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResourceError(f"{where}: cannot write in {existing}; give another export.dir")


def export_model(cfg: Config, tokenizer, source: str, final: Path) -> dict:
    """Merge `cfg.adapter` into the base from `source`, save the folder at `final` (replacing an earlier export),
    and return the `export/` metrics."""
    started = time.perf_counter()
    trained = lineage(Path(cfg.adapter).expanduser())
    if trained.get("base_model", cfg.model.name_or_path) != cfg.model.name_or_path:
        log.warning("the adapter's training.json names the base %s; merging it into %s", trained["base_model"], source)
    log.info("merging into the unquantised base in float32 on the CPU (NF4 cannot hold the merge exactly)")
    # On the CPU: Liger's GPU kernels have no part in a merge, whatever model.liger asks of training.
    full_precision = dataclasses.replace(cfg.model, quant=Quant.none, dtype=DType.float32, liger=False)
    model = load_model(full_precision, torch.device("cpu"), source)
    model = load_adapter(model, cfg.adapter).merge_and_unload()
    dtype = getattr(torch, cfg.export.dtype.value)
    model = model.to(dtype)
    stops = {"stop_strings": list(cfg.gen.stop_strings)} if cfg.gen.stop_strings else {}
    model.generation_config = generation_config(cfg.gen, tokenizer, **stops)
    record = {
        "base_model": cfg.model.name_or_path,
        "adapter": str(Path(cfg.adapter).expanduser().resolve()),
        "lineage": trained,
        "dtype": cfg.export.dtype.value,
        "gen": dataclasses.asdict(cfg.gen),
        "prompt": dataclasses.asdict(cfg.prompt),
        "provenance": provenance(),
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        model.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        write_text(work / "README.md", model_card(cfg, record, final))
        write_json(work / MARKER, record)  # last: a folder holding it is a complete export
        replace_dir(work, final)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err):
            message = "no space left on the device; free some, or give another export.dir"
            raise ResourceError(f"export.dir={final}: {message}") from None
        raise
    size = sum(path.stat().st_size for path in final.glob("*.safetensors"))
    log.info("exported %s merged into %s (%s) to %s", cfg.adapter, cfg.model.name_or_path, dtype, final)
    return {"export/dir": str(final), "export/weights_gib": size / GIB, "export/seconds": time.perf_counter() - started}
