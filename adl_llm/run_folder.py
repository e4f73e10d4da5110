"""A run's folder: held by one process, cleaned of what killed writers left, written only once the run's checks
passed (`.hydra/` and `run.json`), and marked with `error.txt` if the run then fails.

conf/config.yaml sets `hydra.output_subdir` to null and delays Hydra's log file, so Hydra writes nothing into the
folder itself: a run refused in a finished run's folder leaves that run's files untouched, and a run that fails
before doing anything leaves no folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

from adl_llm.artifacts import check_writable, claimed, provenance, remove_stale_temporaries, write_json, write_text
from adl_llm.config import Config, as_plain
from adl_llm.devices import default_device
from adl_llm.distributed import is_main
from adl_llm.errors import failure_report
from adl_llm.memory import reset_peak_memory
from adl_llm.modeling import tokenizer_fingerprint

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunFolder:
    path: Path
    recorded: bool = False  # the run passed its checks and run.json describes it


@contextlib.contextmanager
def run_folder(cfg: Config) -> Iterator[RunFolder]:
    """The run folder, held by this process for the run (the main process, under torchrun), cleaned of what killed
    writers left; nothing is written to it here.

    If the run fails after its checks passed (run.json written), the folder gets error.txt with the reason; if it
    fails before, a folder that holds nothing (Hydra made it for this run) is removed and any other left as it was.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out)
    reset_peak_memory(default_device())  # a multirun's jobs share one process: each job's peak is its own
    with claimed(out) if is_main() else contextlib.nullcontext():
        if is_main():
            for folder in (out, out / "checkpoints"):
                for path in remove_stale_temporaries(folder):
                    log.warning("removed %s, left by a run that was killed while writing it", path)
        run = RunFolder(out)
        try:
            yield run
        except BaseException as exc:
            if is_main() and run.recorded:
                write_text(out / "error.txt", failure_report(exc))
            elif is_main():
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if empty
            raise


def record_run(cfg: Config, run: RunFolder, tokenizer) -> None:
    """The checks passed: write what describes the run (Hydra's .hydra/ files, run.json) and say where it is."""
    run.recorded = True
    out = run.path
    if not is_main():
        return
    write_hydra_files(out, as_plain(cfg))
    record = {"provenance": provenance(), "tokenizer": tokenizer_fingerprint(tokenizer)}
    write_json(out / "run.json", {**record, "config": as_plain(cfg)})
    (out / "error.txt").unlink(missing_ok=True)  # an earlier attempt's failure, now being retried
    log.info("run folder: %s", out)


def write_hydra_files(out: Path, config: dict | None) -> None:
    """Hydra's record of the run (conf/config.yaml sets hydra.output_subdir to null, so that a refused run never
    overwrites an earlier run's): the config (when it could be read), Hydra's own and the overrides."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    files = {
        "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_cfg}),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }
    if config is not None:
        files["config.yaml"] = OmegaConf.to_yaml(config)
    for name, text in files.items():
        write_text(out / ".hydra" / name, text)
