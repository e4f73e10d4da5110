"""Turn the exceptions of a user's mistake (config, data, model choice) into one readable line."""

from __future__ import annotations

import errno
import re

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from adl_llm.errors import UserError, unknown_key


def one_line_error(exc: BaseException) -> str | None:
    """One line naming the key, file or record at fault; None for an exception that is a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        return _missing_option(exc)
    cause = exc if isinstance(exc, OmegaConfBaseException) else exc.__cause__
    if isinstance(cause, OmegaConfBaseException):
        return _omegaconf(cause)
    if isinstance(exc, HydraException):
        return _first_line(str(exc))
    if isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE:
        return (
            f"{exc.filename}: cannot write there ({exc.strerror}); choose another output folder with "
            "hydra.run.dir=... (hydra.sweep.dir=... for a multirun)"
        )
    return None


# Errors of a folder that cannot be written: no permission, a file in the way, a read-only or full disk.
_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EEXIST}


def _omegaconf(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    message = _first_line(getattr(err, "msg", None) or str(err))
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return str(unknown_key(key, _known_keys(err)))
    if isinstance(err, ValidationError):
        return f"{key}: {message}"
    return f"{key}: {message}" if key else message


def _known_keys(err: OmegaConfBaseException) -> list[str]:
    parent = getattr(err, "parent_node", None)
    try:
        return [str(k) for k in parent] if parent is not None else []
    except Exception:
        return []


def _missing_option(exc: MissingConfigException) -> str:
    options = getattr(exc, "options", None) or []
    match = re.search(r"Could not find '([^']+)'", str(exc))
    wanted = match.group(1) if match else _first_line(str(exc))
    group, _, option = wanted.rpartition("/")
    if group and options:
        return f"{group}={option}: unknown option; choose one of: {', '.join(sorted(options))}"
    return _first_line(str(exc))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
