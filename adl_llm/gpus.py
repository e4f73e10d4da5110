"""Sweeps spread over the GPUs of one machine: each job of a multirun claims a GPU that no other job holds, and
sees only that one.

A claim is an exclusive `flock` on a file named after the GPU's UUID (its CUDA_VISIBLE_DEVICES name where
nvidia-smi is missing), held for the life of the process, so it works under any launcher: `hydra/launcher=gpus`
(Hydra's joblib launcher with one worker process per GPU, so the next job starts on whichever GPU frees up first),
the basic launcher (one job after another, on a GPU no other sweep holds), or sweeps started by hand, by any user.
The lock files live in /dev/shm (else /tmp), on the machine itself, never on a shared file system where one node's
GPU 0 would block another's. Nothing is claimed for a single run, under torchrun (each rank has its GPU), or where
a process sees fewer than two GPUs (a Slurm job given one): there is nothing to choose. Where no lock can be had,
the job runs unclaimed and says so. On a MIG machine, list the instances in CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

_claim: dict = {}  # this process's claim: {"gpu": name, "fd": the open lock file}, kept for its life
# Node-local by construction (a tmpfs, or /tmp), not $TMPDIR, which clusters often point at a shared file system;
# one folder for every user, since a GPU is one whoever runs on it.
LOCKS = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / "adl-llm-gpus"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs), found without
    starting CUDA, which would fix the process's view of the GPUs before a claim could narrow it."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(_nvidia_smi())
    usable = []
    for name in (name.strip() for name in listed.split(",")):
        if not name or name.startswith("-"):  # CUDA stops at the first entry it cannot use (-1 hides them all)
            break
        usable.append(name)
    return usable


def _nvidia_smi() -> dict[str, str]:
    """{index: UUID} of the GPUs nvidia-smi lists; empty without it."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rows = (line.split(",") for line in listing.stdout.splitlines() if line.count(",") == 1)
    return {index.strip(): uuid.strip() for index, uuid in rows} if listing.returncode == 0 else {}


def gpu_count() -> int:
    """How many jobs `hydra/launcher=gpus` runs at once: one per visible GPU, at least one."""
    return max(1, len(visible_gpus()))


def claim_gpu(poll_seconds: float = 2.0) -> str | None:
    """Claim a GPU no other process holds and make it the only one this process sees; waits while all are held.
    The GPU's name, or None where there is nothing to choose (see the module's docstring) or no lock can be had."""
    if _claim:
        return _claim["gpu"]
    gpus = visible_gpus()
    if len(gpus) < 2:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # too late to narrow what this process sees
        log.warning("CUDA already started in this process: the job uses every GPU it sees, none claimed")
        return None
    uuids = _nvidia_smi()  # a lock per physical GPU, however CUDA_VISIBLE_DEVICES names it
    said = False
    try:
        shared_folder(LOCKS)
        while True:
            for gpu in gpus:
                key = re.sub(r"[^A-Za-z0-9_.-]", "_", uuids.get(gpu, gpu))
                fd = os.open(LOCKS / f"{key}.lock", os.O_RDONLY | os.O_CREAT, 0o444)  # any user may lock it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                _claim.update(gpu=gpu, fd=fd)
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                log.info("GPU %s claimed: this job sees only it (%d GPUs visible)", gpu, len(gpus))
                return gpu
            if not said:
                said = True
                log.info("all %d GPUs are held by other jobs; waiting for one to free up", len(gpus))
            time.sleep(poll_seconds)
    except OSError as exc:  # a folder or file another user made unreadable, a file system without locks
        log.warning("no GPU claimed (%s: %s): the job uses every GPU it sees", type(exc).__name__, exc)
        return None


def shared_folder(folder: Path) -> None:
    """`folder`, writable by every user and sticky (as /tmp is), so anyone's job can add a GPU's lock file."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # made by another user a moment ago
            folder.chmod(0o1777)
