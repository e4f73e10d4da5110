"""Run outputs: atomic writes (temporary name, then rename), strict JSON, permissions that follow the umask, one
process per run folder, temporaries of killed writers cleaned up, and the provenance kept beside results."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from adl_llm.conf_files import PROJECT_ROOT
from adl_llm.errors import ResourceError, UserError

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "hydra-core", "omegaconf", "adl-llm")
# Temporary names of atomic writes: `.<name>.tmp-<pid>`, `.<name>.old-<pid>`, `.<name>.building-<pid>`.
TEMPORARY = re.compile(r"^\..+\.(tmp|old|building)-(\d+)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def share_as_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes a plain `open` would: a teammate on a shared
    cluster reads results, as the umask allows. tempfile and some libraries create files 0600."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~UMASK)


def write_text(path: Path, text: str) -> None:
    """Write `text` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        share_as_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(work: Path, final: Path) -> None:
    """Move the finished folder `work` to `final`, replacing an older `final` only once `work` is complete."""
    share_as_umask(work)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries that a killed or failed writer left in `folder` (its pid no longer runs)."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = TEMPORARY.match(path.name)
        if match and not _running(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def claimed(folder: Path) -> Iterator[None]:
    """Hold `folder` for this process: a second run in the same folder is refused while this one runs.

    An advisory lock on the folder itself (flock), so it leaves no file behind and dies with the process, even
    one killed with SIGKILL. Where flock is missing (not POSIX) the folder is not locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise UserError(
            f"{folder}: another adl-llm run is using this folder; wait for it to end, or choose another folder "
            "with hydra.run.dir=..."
        ) from None
    try:
        yield
    finally:
        os.close(fd)


def check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ResourceError(
            f"{folder}: cannot write there (read-only); choose another output folder with hydra.run.dir=... "
            "(hydra.sweep.dir=... for a multirun)"
        )


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (RFC 8259): NaN and infinities, which it cannot hold, become null."""
    text = json.dumps(_finite(obj), ensure_ascii=False, indent=2, default=_jsonable, allow_nan=False)
    write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def provenance() -> dict[str, Any]:
    """Package versions, the project's git commit and the machine, recorded with every run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "python": platform.python_version(),
        "packages": versions,
        "machine": platform.node(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # a sweep job's claimed GPU (adl_llm/gpus.py)
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return _finite(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
