"""Beyond one process: torchrun data parallelism on CPU (gloo), and the cluster launchers' configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from adl_llm.config import PROJECT_ROOT
from tests.conftest import read_json, run_entrypoint, tiny_overrides


def _train_args(model_dir, run_dir) -> list[str]:
    # Dropout off: its masks are drawn per rank, so with it on the two runs would differ by design.
    return [
        # 17 records: the last step holds one example, so one rank has none
        *tiny_overrides(model_dir, "task=train", "data.n_train=17", "train.batch_size=4", "train.epochs=1"),
        "lora.lora_dropout=0",
        "optim.lr=1e-2",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_two_gloo_processes_train_the_adapter_of_one(tiny_model_dir, tmp_path):
    single = run_entrypoint(*_train_args(tiny_model_dir, tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "-m", "adl_llm.run", *_train_args(tiny_model_dir, tmp_path / "two")]
    double = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr

    one, two = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:  # the same global batch of 4: only float summation order differs
        assert (one[key] - two[key]).norm() / one[key].norm() < 1e-3, key
    m1, m2 = read_json(tmp_path / "one" / "metrics.json"), read_json(tmp_path / "two" / "metrics.json")
    assert m2["run/world_size"] == 2 and m2["train/steps"] == m1["train/steps"] == 5
    assert m2["train/losses"] == pytest.approx(m1["train/losses"], rel=1e-5)
    assert m2["eval/ids"] == m1["eval/ids"]  # perplexity sharded over the ranks, gathered back in file order
    assert m2["eval/perplexities"] == pytest.approx(m1["eval/perplexities"], rel=1e-3)
    assert not list((tmp_path / "two").glob("*rank*"))  # one run folder, written by rank 0


def test_split_of_a_step_is_solved_for_the_world_size():
    from adl_llm.config import TrainConfig

    assert TrainConfig(batch_size=16, micro_batch_size=2, grad_accum=8).examples_per_micro_batch(1) == 2
    assert TrainConfig(batch_size=16, grad_accum=2).examples_per_micro_batch(2) == 4  # 4 x 2 passes x 2 ranks = 16
    assert TrainConfig(batch_size=16).examples_per_micro_batch(4) is None  # automatic: by length, within a token budget


def test_a_steps_examples_are_dealt_to_the_ranks_longest_first(monkeypatch):
    """Each rank's share has about the same longest example (the ranks wait for the slowest at the gradient sum);
    together the shares are the step; one process, or a fixed cut, keeps the data order."""
    from adl_llm import micro_batches
    from adl_llm.encode import Encoded
    from tests.conftest import compose_config

    batch = [Encoded([1] * n, [1] * n, False) for n in (5, 40, 12, 38, 7, 3, 25, 41)]
    auto = compose_config().train
    assert micro_batches.rank_share(batch, auto) == batch
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(micro_batches, "world_size", lambda: 2)
        monkeypatch.setattr(micro_batches, "rank", lambda rank=rank: rank)
        shares[rank] = micro_batches.rank_share(batch, auto)
        fixed = micro_batches.rank_share(batch, compose_config("train.micro_batch_size=2").train)
        assert fixed == batch[rank::2]
    assert sorted(map(id, shares[0] + shares[1])) == sorted(map(id, batch))
    assert [len(ex.input_ids) for ex in shares[0]] == [41, 38, 12, 5]
    assert [len(ex.input_ids) for ex in shares[1]] == [40, 25, 7, 3]


@pytest.mark.parametrize("launcher", ["slurm", "local_parallel"])
def test_cluster_launchers_compose_without_a_cluster(launcher):
    result = run_entrypoint(f"hydra/launcher={launcher}", "--cfg", "hydra", "-p", "hydra.launcher._target_")
    assert result.returncode == 0, result.stderr
    assert {"slurm": "SlurmLauncher", "local_parallel": "JoblibLauncher"}[launcher] in result.stdout


def test_slurm_settings_are_overrides():
    result = run_entrypoint(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30", "--cfg", "hydra"
    )
    assert result.returncode == 0 and "partition: gpu" in result.stdout and "timeout_min: 30" in result.stdout


@pytest.mark.slow
def test_a_chain_under_a_parallel_launcher_is_refused(tiny_model_dir, tmp_path):
    args = tiny_overrides(tiny_model_dir, "task=train", "data.n_train=4", "train.init_from=previous")
    sweep = tmp_path / "sweep"
    parallel = ["-m", "hydra/launcher=local_parallel", f"hydra.sweep.dir={sweep}"]
    result = run_entrypoint(*parallel, *args, "train.epochs=1,1")
    assert result.returncode != 0
    assert "may run them at once" in result.stderr + result.stdout
    assert not list(sweep.glob("*/adapter"))


@pytest.mark.parametrize("tasks,torchrun,refused", [("2", False, True), ("1", False, False), ("4", True, False)])
def test_a_slurm_job_of_several_tasks_is_refused_unless_torchrun_runs_it(monkeypatch, tasks, torchrun, refused):
    from adl_llm.errors import ConfigError
    from adl_llm.run import refuse_repeated_slurm_tasks

    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_NTASKS": tasks, "SLURM_PROCID": "0"}
    for key, value in {**env, "WORLD_SIZE": "4" if torchrun else "1"}.items():
        monkeypatch.setenv(key, value)
    if refused:
        with pytest.raises(ConfigError, match=r"^hydra.launcher: this job runs as 2 slurm tasks"):
            refuse_repeated_slurm_tasks()
    else:
        refuse_repeated_slurm_tasks()
