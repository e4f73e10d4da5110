"""Sweeps spread over the GPUs of one machine: each job of a multirun claims a GPU that no other job holds, and
sees only that one.

A claim is an exclusive `flock` on a file named after the GPU, held for the life of the process, so it works under
any launcher: `hydra/launcher=gpus` (Hydra's joblib launcher with one worker process per GPU, so the next job starts
on whichever GPU frees up first), the basic launcher (one job after another, on a GPU no other sweep holds), or two
sweeps started by hand. The lock files live in the machine's own temporary folder, never on a shared file system,
where one node's GPU 0 would block another's. Nothing is claimed for a single run, under torchrun (each rank has its
GPU), or where a process sees fewer than two GPUs (a Slurm job given one): there is nothing to choose.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_claim: dict = {}  # this process's claim: {"gpu": name, "lock": the open lock file}, kept for its life


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs), found without
    starting CUDA, which would fix the process's view of the GPUs before a claim could narrow it."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        usable = []
        for name in (name.strip() for name in listed.split(",")):
            if not name or name.startswith("-"):  # CUDA stops at the first entry it cannot use (-1 hides them all)
                break
            usable.append(name)
        return usable
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.stdout.splitlines() if line.startswith("GPU "))]


def gpu_count() -> int:
    """How many jobs `hydra/launcher=gpus` runs at once: one per visible GPU, at least one."""
    return max(1, len(visible_gpus()))


def claim_gpu(poll_seconds: float = 2.0) -> str | None:
    """Claim a GPU no other process holds and make it the only one this process sees; waits while all are held.
    The GPU's name, or None where there is nothing to choose (see the module's docstring)."""
    if _claim:
        return _claim["gpu"]
    gpus = visible_gpus()
    if len(gpus) < 2:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # too late to narrow what this process sees
        log.warning("CUDA already started in this process: the job uses every GPU it sees, none claimed")
        return None
    folder = Path(tempfile.gettempdir()) / f"adl-llm-{os.getuid()}" / "gpus"
    folder.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        for gpu in gpus:
            lock = open(folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock", "a")  # noqa: SIM115 (held for the life of the process)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            _claim.update(gpu=gpu, lock=lock)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("GPU %s claimed: this job sees only it (%d GPUs visible)", gpu, len(gpus))
            return gpu
        if not said:
            said = True
            log.info("all %d GPUs are held by other jobs; waiting for one to free up", len(gpus))
        time.sleep(poll_seconds)
