"""Training checkpoints: everything needed to continue exactly, written atomically, safetensors and JSON only.

A checkpoint is `checkpoints/step-NNNNNN/` holding the adapter weights and the optimiser state (safetensors),
and `state.json` (the position in the data, the loss history, the scheduler and the optimiser's non-tensor
state). Random state needs no file: training reseeds every step from (seed, step, rank), see train.py.
It is assembled under a temporary name and renamed into place, so a kill
during a save leaves the previous checkpoint as the latest complete one. Nothing here is unpickled.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adl_llm.artifacts import replace_dir
from adl_llm.errors import ResourceError, UserError

PREFIX = "step-"
STATE_FILE = "state.json"  # written last: a folder without it is not a checkpoint
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands, after `global_step` optimiser steps."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimiser steps done inside `epoch`
    losses: list[float] = field(default_factory=list)  # one per optimiser step
    step_seconds: list[float] = field(default_factory=list)  # one per optimiser step
    step_tokens: list[int] = field(default_factory=list)  # input tokens of each optimiser step
    tokens: int = 0  # input tokens seen
    seconds: float = 0.0  # training time so far, across resumptions
    fingerprint: str = ""  # of the settings that shape the result; resuming under others is refused
    compiled_steps: int = 0  # optimiser steps whose decoder layers ran compiled (train.compile; 0 after a fallback)

    def record_step(self, loss: float, tokens: int, seconds: float) -> None:
        """One optimiser step done: its mean answer-token loss, input tokens and time."""
        self.global_step += 1
        self.step_in_epoch += 1
        self.losses.append(loss)
        self.step_tokens.append(tokens)
        self.step_seconds.append(seconds)
        self.tokens += tokens
        self.seconds += seconds

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def save_checkpoint(folder: Path, state: TrainState, adapter: dict, optimizer, scheduler, keep: int) -> Path:
    """Write a checkpoint for `state.global_step` under `folder`, then keep only the newest `keep`.

    A write that fails (a full disk) leaves no temporary folder behind and names what to change."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{state.global_step:06d}"
    work = folder / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, work / "adapter.safetensors")
        optimizer_tensors, optimizer_meta = _split_optimizer_state(optimizer.state_dict())
        save_file(optimizer_tensors, work / "optimizer.safetensors")
        payload = {"train": asdict(state), "scheduler": scheduler.state_dict(), "optimizer": optimizer_meta}
        with open(work / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        replace_dir(work, final)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        if _disk_full(err):
            raise ResourceError(
                f"{folder}: no space left on the device while saving a checkpoint; free some, or save less often "
                "(train.save_every, 0 for the end only)"
            ) from None
        raise
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(err: BaseException) -> bool:
    # safetensors reports the OS error inside its own exception's text
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err)


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def check_resumable(folder: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint under `folder` whose state can be read, refused if it was written under other
    training settings (another `fingerprint`); None when there is none. Read before anything is written."""
    for path in reversed(complete_checkpoints(folder)):
        try:
            written_under = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["train"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged: training skips it too, with a warning
        if written_under != fingerprint:
            raise UserError(
                f"{path} was written with other training settings; resume it with the same config, "
                "or start over with train.resume=never"
            )
        return path
    return None


def load_latest_checkpoint(
    folder: Path, optimizer, scheduler, device: torch.device, fingerprint: str
) -> tuple[TrainState, dict] | None:
    """Restore the optimiser and scheduler from the newest usable checkpoint under `folder`; return the training
    state and adapter weights, or None when there is no checkpoint.

    A damaged checkpoint (a truncated file, unreadable JSON) is skipped with a warning naming it, for the one
    before; one written under other training settings is refused.
    """
    candidates = complete_checkpoints(folder)
    for path in reversed(candidates):
        try:
            payload = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            state = TrainState(**payload["train"])
            optimizer_tensors = load_file(path / "optimizer.safetensors", device=str(device))
            adapter = load_file(path / "adapter.safetensors", device=str(device))
            optimizer_state = _join_optimizer_state(optimizer_tensors, payload["optimizer"])
        except Exception as err:  # safetensors raises its own error type for a truncated file
            log.warning("%s is damaged (%s); the checkpoint before it is used", path, f"{type(err).__name__}: {err}")
            continue
        if state.fingerprint != fingerprint:
            raise UserError(
                f"{path} was written with other training settings; resume it with the same config, "
                "or start over with train.resume=never"
            )
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(payload["scheduler"])
        return state, adapter
    if candidates:
        raise UserError(f"{folder}: every checkpoint is damaged; start over with train.resume=never")
    return None


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to safetensors, everything else (param groups, integer steps, nesting) to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    state = {
        str(param_id): _split(entries, str(param_id), tensors) for param_id, entries in state_dict["state"].items()
    }
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if torch.is_tensor(value):
        tensors[key] = value.detach().contiguous().cpu()
        return {"tensor": key}
    if isinstance(value, dict):  # bitsandbytes nests its 8-bit state one level down
        return {"dict": {name: _split(v, f"{key}.{name}", tensors) for name, v in value.items()}}
    return {"value": value}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state = {int(param_id): _join(entries, tensors) for param_id, entries in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _join(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {name: _join(child, tensors) for name, child in node["dict"].items()}
    return node["value"]
