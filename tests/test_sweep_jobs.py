"""hydra/launcher=gpus: a free worker takes the job its process has compiled for (adl_llm/sweep_jobs.py)."""

from __future__ import annotations

import uuid

import pytest

from adl_llm.sweep_jobs import JobBoard, compile_key, next_job
from tests.conftest import gpus_sweep, read_json

# The lr x r sweep of docs/BENCHMARKS.md, in Hydra's order: r alternates
GRID = [["task=train", f"optim.lr={lr}", f"lora.r={r}"] for lr in ("3e-5", "1e-4") for r in (16, 64)]


def test_the_compile_key_keeps_what_changes_the_compiled_code():
    overrides = [
        "optim.lr=1e-4",
        "lora.r=64",
        "model=llama7b",
        "+model.liger=true",
        "gen.beams=3",
        "task=train",
        "train.compile_mode=max-autotune",
        "train.epochs=2",
        "lora/target=all",
    ]
    assert compile_key(overrides) == sorted(
        [
            "lora.r=64",
            "model=llama7b",
            "+model.liger=true",
            "task=train",
            "train.compile_mode=max-autotune",
            "lora/target=all",
        ]
    )
    assert compile_key(["train.compiled_extra=1", "models.x=1"]) == []  # a prefix of a name is not its group
    assert compile_key(["lora@peft=small", "~gen.static_cache", "++gen.nf4_graph=false"]) == sorted(
        ["lora@peft=small", "~gen.static_cache", "++gen.nf4_graph=false"]
    )


@pytest.mark.parametrize(
    "waiting,mine,others,expected",
    [
        ([1, 2, 3], ["r=16"], [["r=64"]], 2),  # its own key first, though job 1 waits longer
        ([1, 2, 3], None, [["r=16"]], 1),  # a new worker: a key nobody holds
        ([2, 3], None, [["r=16"]], 3),
        ([3], ["r=16"], [["r=64"]], 3),  # only another worker's key waits: taken, a free GPU never idles
        ([2, 3], ["r=32"], [["r=16"], ["r=64"]], 2),
    ],
)
def test_a_free_worker_takes_its_own_key_then_one_nobody_holds_then_the_first(waiting, mine, others, expected):
    keys = [["r=16"], ["r=64"], ["r=16"], ["r=64"]]
    assert next_job(waiting, keys, mine, others) == expected


@pytest.mark.parametrize("first_free", ["w0", "w1"])
def test_each_lora_rank_of_the_grid_is_compiled_by_one_worker_whichever_finishes_first(first_free, tmp_path):
    board = JobBoard.post(GRID, folder=tmp_path)
    try:
        ran = {}
        for worker in ("w0", "w1"):  # both start at once
            job, _ = board.take(worker)
            ran[worker] = [job]
        other = "w1" if first_free == "w0" else "w0"
        for worker in (first_free, other):
            job, _ = board.take(worker)  # the board holds the key of the worker's last job
            ran[worker].append(job)
        assert sorted(ran.values()) == [[0, 2], [1, 3]]  # joblib's order would give the first free worker job 2
        with pytest.raises(RuntimeError, match="no job left"):
            board.take("w0")
    finally:
        board.remove()
    assert not board.path.exists()


def _sweep(tiny_model_dir, sweep, gpus: list[str]) -> str:
    """4 jobs in Hydra's order (prompt, then LoRA rank): ranks 4, 8, 4, 8."""
    return gpus_sweep(tiny_model_dir, sweep, gpus, "prompt=zero_shot,few_shot", "lora.r=4,8")


@pytest.mark.slow
def test_one_worker_runs_the_jobs_of_its_compile_key_first(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    said = _sweep(tiny_model_dir, sweep, [f"fake-{uuid.uuid4().hex[:8]}"])  # one GPU: one worker, in order
    started = [int(line.rsplit("/", 1)[1]) for line in said.splitlines() if f"run folder: {sweep}/" in line]
    assert started == [0, 2, 1, 3]  # joblib's order would be 0, 1, 2, 3: a second compile before job 2


@pytest.mark.slow
def test_two_workers_run_every_job_once_and_say_which_shared_a_worker(tiny_model_dir, tmp_path):
    names = [f"fake-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    sweep = tmp_path / "sweep"
    said = _sweep(tiny_model_dir, sweep, names)
    line = next(line for line in said.splitlines() if "jobs by worker: " in line)
    workers = [[int(job) for job in group.split("#")[1:]] for group in line.split("jobs by worker: ")[1].split(";")]
    assert sorted(job for jobs in workers for job in jobs) == [0, 1, 2, 3]
    for jobs in workers:  # a worker holds its GPU for life: its jobs all ran on one
        seen = {read_json(sweep / str(job) / "run.json")["provenance"]["cuda_visible_devices"] for job in jobs}
        assert len(seen) == 1 and seen <= set(names)
