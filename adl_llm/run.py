"""The one entrypoint: compose the config, check it, run the task.

    python -m adl_llm.run task=eval prompt=few_shot
    python -m adl_llm.run -m task=eval prompt=zero_shot,few_shot

How a run fails, in one place:
- a mistake of the user's (a config value, a data record, a model or adapter that cannot be used): one line
  `adl-llm: error: ...` on stderr and exit status 2;
- a job of a multirun, for any reason: `error.txt` in its folder, and the sweep goes on; at its end the summary
  marks the job failed and the sweep exits with status 1, naming it;
- anything else is a bug: the traceback. `HYDRA_FULL_ERROR=1` shows the traceback in every case.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from adl_llm.artifacts import write_text
from adl_llm.config import CONF_DIR, run_stamp, to_typed
from adl_llm.distributed import broadcast_object, init_from_env, launched_by_torchrun, shutdown
from adl_llm.errors import ConfigError, failure_report, one_line_error
from adl_llm.gpus import claim_gpu, gpu_count
from adl_llm.report import failed_jobs, job_rows, write_summary

log = logging.getLogger(__name__)
# The user's HYDRA_FULL_ERROR, kept here: main() sets Hydra's own to 1 so that every exception reaches this module.
TRACEBACKS = "ADL_LLM_TRACEBACKS"
OmegaConf.register_new_resolver("adl_llm_gpus", gpu_count, replace=True)  # hydra/launcher=gpus: jobs at once


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(raw: DictConfig) -> float | None:
    try:
        cfg = to_typed(raw)
        refuse_repeated_slurm_tasks()
        if HydraConfig.get().mode is RunMode.MULTIRUN and not launched_by_torchrun():
            claim_gpu()  # before CUDA starts: a sweep's job sees one GPU, which no other job holds
        # Heavy imports (torch, transformers) wait until the config has passed its checks.
        from adl_llm.modeling import attention_kernels
        from adl_llm.tasks import run_task

        with attention_kernels(cfg.model.cudnn_attention):
            return run_task(cfg)
    except KeyboardInterrupt:
        _exit_interrupted(Path(HydraConfig.get().runtime.output_dir))
    except Exception as exc:
        if not (HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN):
            with contextlib.suppress(OSError):  # the folder Hydra made for a run that did nothing: only if empty
                Path(HydraConfig.get().runtime.output_dir).rmdir()
            _exit_if_users_mistake(exc)  # here, before Hydra reports the job as failed with its own lines
            raise
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        report = failure_report(exc)
        job_dir.mkdir(parents=True, exist_ok=True)
        from adl_llm.run_folder import write_hydra_files

        write_hydra_files(job_dir, None)  # the summary reads each job's overrides, failed or not
        write_text(job_dir / "error.txt", report)
        (job_dir / "metrics.json").unlink(missing_ok=True)  # nothing that looks like a finished result
        log.error("job failed, the sweep goes on: %s (traceback in %s)", report.splitlines()[0], job_dir / "error.txt")
        return None


def refuse_repeated_slurm_tasks() -> None:
    """A sweep job that hydra/launcher=slurm runs as several Slurm tasks (tasks_per_node or nodes above 1) would run
    whole in every task, each writing the same folder: refused, pointing at torchrun for data parallelism."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if launched_by_torchrun() or not executor:
        return
    try:
        import submitit

        tasks = submitit.JobEnvironment().num_tasks
    except (ImportError, RuntimeError):  # the variable without a submitit job around it
        return
    if tasks > 1:
        raise ConfigError(
            "hydra.launcher",
            f"this job runs as {tasks} {executor} tasks, and each would run all of it into one folder; keep "
            "hydra.launcher.tasks_per_node=1 and nodes=1, and for one job over several GPUs or nodes run torchrun "
            "inside one Slurm job (README: From one GPU to a cluster)",
        )


class SweepEnd(Callback):
    """At the end of a multirun (in the launching process, whichever launcher ran the jobs): the summary, and
    exit status 1 naming the jobs that failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from adl_llm.html_report import write_html_report

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = job_rows(sweep_dir)
        table = write_summary(sweep_dir, rows)
        if table:
            page = write_html_report(sweep_dir, [sweep_dir], f"adl-llm sweep {sweep_dir.name}")
            print(f"\n{sweep_dir}/summary.md\n{table}\n{page}", flush=True)
        if failed_jobs(rows):  # SystemExit passes Hydra's callback guard, which turns exceptions into warnings
            raise SystemExit("adl-llm: error: " + "; ".join(failed_jobs(rows)))


def _exit_if_users_mistake(exc: Exception) -> None:
    message = one_line_error(exc)
    if message is not None and os.environ.get(TRACEBACKS) != "1":
        print(f"adl-llm: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_status", 2))


def _exit_interrupted(folder: Path) -> None:
    """Ctrl-C: say how to continue, exit 130 as a shell does."""
    checkpoints = sorted((folder / "checkpoints").glob("step-*"))
    hint = (
        f"; rerun the same command with hydra.run.dir={folder} to continue from {checkpoints[-1].name}"
        if checkpoints
        else ""
    )
    print(f"\nadl-llm: interrupted{hint}", file=sys.stderr)
    sys.exit(130)


def main() -> None:
    """Run with Hydra, under the failure policy of this module's docstring."""
    os.environ.setdefault(TRACEBACKS, os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let every exception reach the policy here instead of Hydra's report
    # Batches of varying length fragment CUDA's caching allocator: measured, it reserved 4x what it used.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if launched_by_torchrun():
        init_from_env()
        run_stamp(broadcast_object(run_stamp()))  # one run folder for all ranks
    try:
        _run()
    except Exception as exc:  # composition errors, before any job
        _exit_if_users_mistake(exc)
        raise
    # Only after success: leaving the group waits for the other ranks, which would hang a rank that failed alone.
    shutdown()


if __name__ == "__main__":
    main()
