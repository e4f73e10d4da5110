"""The one entrypoint: compose the config, check it, run the selected task.

python -m adl_llm.run task=eval prompt=few_shot
python -m adl_llm.run -m task=eval prompt=zero_shot,few_shot
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from adl_llm.artifacts import write_text
from adl_llm.config import PROJECT_ROOT, TaskName, run_stamp, to_typed
from adl_llm.distributed import broadcast_object, init_from_env, launched_by_torchrun, shutdown
from adl_llm.messages import one_line_error
from adl_llm.report import SweepSummary

log = logging.getLogger(__name__)

# Hydra prints its own multi-line report unless told to raise; the user's HYDRA_FULL_ERROR=1 keeps tracebacks.
_SHOW_TRACEBACKS = os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def _run(raw: DictConfig) -> float | None:
    try:
        cfg = to_typed(raw)
        # Heavy imports (torch, transformers) wait until the config has passed its checks.
        from adl_llm import tasks
        from adl_llm.modeling import attention_kernels

        runners = {
            TaskName.eval: tasks.run_eval,
            TaskName.train: tasks.run_train,
            TaskName.generate: tasks.run_generate,
            TaskName.pipeline: tasks.run_pipeline,
        }
        with attention_kernels(cfg.model.cudnn_attention):
            return runners[cfg.task.name](cfg)
    except Exception as exc:
        if _in_multirun():
            _record_failed_job(exc)
            return None
        _exit_if_users_mistake(exc)
        raise


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN


def _record_failed_job(exc: Exception) -> None:
    """A failed job of a sweep leaves error.txt (its row in the summary says failed) and lets the others run."""
    from hydra.core.hydra_config import HydraConfig

    job_dir = Path(HydraConfig.get().runtime.output_dir)
    message = one_line_error(exc) or f"{type(exc).__name__}: {exc}".splitlines()[0]
    write_text(job_dir / "error.txt", message + "\n\n" + "".join(traceback.format_exception(exc)))
    (job_dir / "metrics.json").unlink(missing_ok=True)  # nothing that looks like a finished result
    log.error("job failed, the sweep goes on: %s (traceback in %s)", message, job_dir / "error.txt")


def _exit_if_users_mistake(exc: Exception) -> None:
    message = one_line_error(exc)
    if message is not None and not _SHOW_TRACEBACKS:
        print(f"adl-llm: error: {message}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Run with Hydra; a mistake in the config or the data is one line on stderr and exit status 2."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of Hydra's report
    # Batches of varying length fragment CUDA's caching allocator: measured, it reserved 4x what it used.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if launched_by_torchrun():
        init_from_env()
        run_stamp(broadcast_object(run_stamp()))  # one run folder for all ranks
    try:
        _run()
    except Exception as exc:
        _exit_if_users_mistake(exc)
        raise
    # Only after success: leaving the group waits for the other ranks, which would hang a rank that failed alone.
    shutdown()
    if SweepSummary.failed:  # the sweep went on past its failed jobs; its exit status still says they failed
        print("adl-llm: error: " + "; ".join(SweepSummary.failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
