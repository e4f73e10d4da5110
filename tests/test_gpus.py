"""A sweep over the GPUs of one machine: which GPUs a process sees, one claim per GPU, and a sweep whose jobs each
ran on their own. Fake GPU names stand in for GPUs: the claims are files and CUDA_VISIBLE_DEVICES, not CUDA."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import uuid

import pytest

from adl_llm import gpus
from adl_llm.config import PROJECT_ROOT
from tests.conftest import gpus_sweep, read_json

# Claims a GPU, prints its name, and holds it until its stdin closes.
CLAIM = "import sys; from adl_llm.gpus import claim_gpu; print(claim_gpu(0.05), flush=True); sys.stdin.read()"


@pytest.mark.parametrize(
    "listed,expected",
    [
        ("0,1", ["0", "1"]),
        (" GPU-1a2b , GPU-3c4d", ["GPU-1a2b", "GPU-3c4d"]),
        ("2,-1,3", ["2"]),  # CUDA stops at the first entry it cannot use
        ("-1", []),
        ("", []),
    ],
)
def test_the_gpus_a_process_sees(monkeypatch, listed, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert gpus.visible_gpus() == expected


def test_without_nvidia_smi_there_are_none(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpus.visible_gpus() == []
    assert gpus.gpu_count() == 1  # the gpus launcher still runs the sweep, one job at a time


def test_one_gpu_leaves_nothing_to_claim(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(gpus, "_claim", {})
    assert gpus.claim_gpu() is None
    assert gpus.visible_gpus() == ["0"]


def _claimer(names: str) -> subprocess.Popen:
    env = {"CUDA_VISIBLE_DEVICES": names, "PATH": "/usr/bin:/bin"}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    return subprocess.Popen([sys.executable, "-c", CLAIM], cwd=PROJECT_ROOT, env=env, **pipes)


def test_each_process_gets_a_gpu_of_its_own_and_the_next_waits_for_one_to_free_up():
    names = [f"fake-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    first, second = _claimer(",".join(names)), _claimer(",".join(names))
    held = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert held == set(names)

    third = _claimer(",".join(names))
    with pytest.raises(subprocess.TimeoutExpired):  # both held: it waits
        third.communicate(timeout=3)
    freed = first
    freed.communicate("")  # its process ends, and with it the claim
    assert third.stdout.readline().strip() in held
    for proc in (second, third):
        proc.communicate("")


@pytest.mark.slow
def test_a_sweep_under_the_gpus_launcher_runs_each_job_on_its_own_gpu(tiny_model_dir, tmp_path):
    names = [f"fake-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    sweep = tmp_path / "sweep"
    gpus_sweep(tiny_model_dir, sweep, names, "prompt=zero_shot,few_shot")  # the summary written too
    seen = [read_json(sweep / job / "run.json")["provenance"]["cuda_visible_devices"] for job in ("0", "1")]
    assert sorted(seen) == sorted(names)  # two workers, each with its own GPU


def test_the_lock_is_the_physical_gpus_whatever_name_the_job_was_given(monkeypatch):
    uuids = {"0": f"GPU-{uuid.uuid4()}", "1": f"GPU-{uuid.uuid4()}"}
    monkeypatch.setattr(gpus, "_nvidia_smi", lambda: uuids)
    monkeypatch.setattr(gpus, "_claim", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpus.claim_gpu() == "0"
    try:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        other = os.open(gpus.LOCKS / f"{uuids['0']}.lock", os.O_RDONLY)  # named by UUID: another name, same lock
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    finally:
        os.close(gpus._claim["fd"])


def test_no_lock_to_be_had_runs_the_job_unclaimed_and_says_so(monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(gpus.fcntl, "flock", no_locks)
    monkeypatch.setattr(gpus, "_claim", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"fake-{uuid.uuid4().hex[:8]}-0,fake-{uuid.uuid4().hex[:8]}-1")
    before = os.environ["CUDA_VISIBLE_DEVICES"]
    assert gpus.claim_gpu() is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == before
    assert "no GPU claimed (OSError" in caplog.text
