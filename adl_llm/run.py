"""The one entrypoint: compose the config, check it, run the selected task.

python -m adl_llm.run task=eval prompt=few_shot
python -m adl_llm.run -m task=eval prompt=zero_shot,few_shot
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from adl_llm.config import PROJECT_ROOT, TaskName, to_typed
from adl_llm.errors import UserError
from adl_llm.messages import one_line_error

# Hydra prints its own multi-line report unless told to raise; the user's HYDRA_FULL_ERROR=1 keeps tracebacks.
_SHOW_TRACEBACKS = os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def _run(raw: DictConfig) -> float | None:
    try:
        cfg = to_typed(raw)
        # Heavy imports (torch, transformers) wait until the config has passed its checks.
        from adl_llm import tasks

        runners = {TaskName.eval: tasks.run_eval}
        if cfg.task.name not in runners:
            raise UserError(f"task={cfg.task.name.value} is not available yet; choose task=eval")
        return runners[cfg.task.name](cfg)
    except Exception as exc:
        _exit_if_users_mistake(exc)
        raise


def _exit_if_users_mistake(exc: Exception) -> None:
    message = one_line_error(exc)
    if message is not None and not _SHOW_TRACEBACKS:
        print(f"adl-llm: error: {message}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Run with Hydra; a mistake in the config or the data is one line on stderr and exit status 2."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of Hydra's report
    try:
        _run()
    except Exception as exc:
        _exit_if_users_mistake(exc)
        raise


if __name__ == "__main__":
    main()
