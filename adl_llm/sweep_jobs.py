"""Which job of a sweep a worker of `hydra/launcher=gpus` runs next: one its process has already compiled for.

A training job compiles its decoder layers (train.compile, 20 to 60 s on an H200), a decoding job its step
(gen.compile), and a process keeps what it compiled for the later jobs it runs. Joblib hands the next job to
whichever worker frees up first, so on two GPUs a 4-job lr x r sweep could give one worker both LoRA ranks and the
other one rank: three compiles, where two would do. In lease F that worker took 85 s to compile its second rank, and
the other GPU sat idle for its last 61 s (docs/BENCHMARKS.md, issue 18).

So the launcher sends each worker "the next job" rather than a fixed one, and the worker chooses, at the moment it
is free, from a board of waiting jobs (a JSON file under a lock):

1. the first waiting job with the same compile key as the last job this worker ran (its overrides of task, model,
   LoRA, adapter and the compile settings: COMPILE_KEYS), which reuses the worker's compiled code;
2. else the first waiting job whose compile key no other worker has, so each key is compiled by one worker;
3. else the first waiting job: a free GPU never waits while a job does.

The jobs keep their numbers, folders and order of results, as under joblib.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from adl_llm.gpus import LOCKS, shared_folder

log = logging.getLogger(__name__)

# Overrides that change what a job's process compiles; the rest (lr, epochs, beams, prompt, seed) reuse it.
COMPILE_KEYS = (
    "task", "experiment", "model", "lora", "adapter",
    "train.compile", "train.compile_mode", "gen.compile", "gen.static_cache", "gen.nf4_graph",
)  # fmt: skip

def compile_key(overrides: Sequence[str]) -> list[str]:
    """The overrides of a job that decide what it compiles, sorted: jobs with equal keys reuse a process's work."""
    kept = []
    for override in overrides:
        name = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]  # `+x=`, `~x`, `x@package=` name x
        if any(name == key or name.startswith((key + ".", key + "/")) for key in COMPILE_KEYS):
            kept.append(override)
    return sorted(kept)


def next_job(waiting: Sequence[int], keys: Sequence[list[str]], mine: list[str] | None, others: list[list[str]]) -> int:
    """The job a free worker takes (the rules of the module's docstring): `waiting` in order, `keys` of every job,
    `mine` the key of this worker's last job (None before its first), `others` the keys the other workers hold."""
    same = [job for job in waiting if keys[job] == mine]
    unheld = [job for job in waiting if keys[job] not in others]
    return (same or unheld or list(waiting))[0]


class JobBoard:
    """The sweep's waiting jobs and what each worker last took, in a JSON file that one worker at a time changes
    (an exclusive flock; the file lives on this machine, where the workers are)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def post(cls, job_overrides: Sequence[Sequence[str]], folder: Path = LOCKS) -> JobBoard:
        """A new board holding every job, waiting, in a node-local folder (as gpus.py's locks)."""
        try:
            shared_folder(folder)
            fd, name = tempfile.mkstemp(prefix="sweep-", suffix=".json", dir=folder)
        except OSError:  # a folder another user made unwritable: the temporary folder, local on most machines
            fd, name = tempfile.mkstemp(prefix="adl-llm-sweep-", suffix=".json")
        with os.fdopen(fd, "w") as file:
            jobs = [list(overrides) for overrides in job_overrides]
            keys = [compile_key(overrides) for overrides in jobs]
            json.dump({"jobs": jobs, "keys": keys, "waiting": list(range(len(jobs))), "workers": {}}, file)
        return cls(Path(name))

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "r+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
            state = json.load(file)
            yield state
            file.seek(0)
            file.truncate()
            json.dump(state, file)

    def take(self, worker: str) -> tuple[int, list[str]]:
        """The job `worker` runs next (its index and overrides), off the board; its key is noted as the worker's
        (the key of its last job, which its next take prefers)."""
        with self._state() as state:
            if not state["waiting"]:
                raise RuntimeError(f"the sweep's job board {self.path} has no job left for a worker")
            keys, workers = state["keys"], state["workers"]
            others = [key for name, key in workers.items() if name != worker]
            job = next_job(state["waiting"], keys, workers.get(worker), others)
            state["waiting"].remove(job)
            state["workers"][worker] = keys[job]
            return job, state["jobs"][job]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def take_and_run(board_path: str, first_index: int, *job_context: Any) -> tuple[int, int, Any]:
    """A worker's task: take the job it should run next off the board, run it as Hydra's joblib launcher runs one,
    and return (its index, this worker's pid, Hydra's JobReturn)."""
    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    job, overrides = JobBoard(Path(board_path)).take(str(os.getpid()))
    return job, os.getpid(), execute_job(first_index + job, overrides, *job_context)


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """Hydra's joblib launch (hydra_joblib_launcher._core.launch) with each worker choosing its next job: the
    JobReturns in the jobs' order, and a log line saying which jobs shared a worker."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    options = dict(launcher.joblib, backend="loky")  # as Hydra's: its other backends cannot run Hydra jobs
    process_joblib_cfg(options)
    log.info(
        "%d jobs, up to %s at once (a worker takes a job it has compiled for first)",
        len(job_overrides),
        options.get("n_jobs"),
    )
    log.info("Launching jobs, sweep output dir : %s", sweep_dir)
    for index, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + index, " ".join(filter_overrides(overrides)))
    board = JobBoard.post(job_overrides)
    context = (launcher.hydra_context, launcher.config, launcher.task_function, Singleton.get_state())
    try:
        done = Parallel(**options)(
            delayed(take_and_run)(str(board.path), initial_job_idx, *context) for _ in job_overrides
        )
    finally:
        board.remove()
    workers: dict[int, list[int]] = {}
    done.sort(key=lambda item: item[0])
    for job, pid, _ in done:
        workers.setdefault(pid, []).append(initial_job_idx + job)
    log.info("jobs by worker: %s", "; ".join(" ".join(f"#{job}" for job in jobs) for jobs in workers.values()))
    return [result for _, _, result in done]
