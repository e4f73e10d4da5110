"""Stage chains: which adapter a training stage starts from (`train.init_from`), and the lineage it records.

`train.init_from=<folder>` starts from a saved adapter; `train.init_from=previous` chains the jobs of a multirun,
each from the adapter the job before it saved, which only works when the jobs run one after another.
"""

from __future__ import annotations

from pathlib import Path

from adl_llm.artifacts import read_json
from adl_llm.config import Config
from adl_llm.errors import UserError


def init_adapter_dir(cfg: Config) -> Path | None:
    """The adapter a stage starts from: none, a folder, or `previous`, the adapter of the job before in a sweep."""
    if cfg.train.init_from is None:
        return None
    if cfg.train.init_from != "previous":
        return Path(cfg.train.init_from)  # tasks check the folder before any model loads
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode is not RunMode.MULTIRUN:
        raise UserError("train.init_from=previous chains the jobs of a multirun (-m); give an adapter folder")
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if not launcher.endswith("BasicLauncher"):
        raise UserError(
            f"train.init_from=previous: the stages of a chain run one after another, but hydra/launcher "
            f"({launcher.rsplit('.', 1)[-1]}) may run them at once; run the chain with the default launcher, "
            "inside one cluster job (README: From one GPU to a cluster)"
        )
    job = hydra_cfg.job.num
    if job == 0:
        return None  # the chain's first stage starts from scratch
    previous = Path(cfg.output_dir).parent / str(job - 1) / "adapter"
    if not (previous / "adapter_config.json").is_file():
        raise UserError(
            f"train.init_from=previous: job {job - 1} left no adapter at {previous}; a chain's stages must run "
            "one after another (the basic launcher), each after the one before succeeded"
        )
    return previous


def lineage(init_dir: Path | None) -> dict:
    """The `training.json` of the adapter a stage starts from (cumulative epochs, stages), or {} for a fresh one."""
    record = init_dir / "training.json" if init_dir else None
    return read_json(record) if record and record.is_file() else {}


def stage_record(cfg: Config, before: dict, run_dir: Path, epochs: float) -> dict:
    """The `training.json` of a finished stage: the base model, the cumulative epochs, every stage so far."""
    return {
        "base_model": cfg.model.name_or_path,
        "cumulative_epochs": before.get("cumulative_epochs", 0) + epochs,
        "stages": [*before.get("stages", []), {"run_dir": str(run_dir), "epochs": epochs}],
    }
