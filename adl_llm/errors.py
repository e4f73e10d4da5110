"""Errors that are the user's to fix, and the one line the entrypoint prints for each, without a traceback."""

from __future__ import annotations

import difflib
import errno
import re
import traceback

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class UserError(Exception):
    """A mistake in the input (config, data, paths, model choice) rather than a bug in adl-llm: exit status 2."""

    exit_status = 2


class ConfigError(UserError):
    """A config value that composes but makes no sense, named by its full key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(UserError):
    """A data file that cannot be used, named with the record index where one is at fault."""


class ModelError(UserError):
    """A model or adapter that cannot be loaded as asked."""


class ResourceError(UserError):
    """The machine cannot do what the settings ask (GPU memory, an output folder), named with what to change."""


class RunFailed(UserError):
    """The run produced no result worth keeping (nothing to train or score, a loss that went non-finite): exit
    status 1, one line saying why and what to change."""

    exit_status = 1


def unknown_key(key: str, known: list[str]) -> ConfigError:
    """`lora.rank: unknown key (did you mean lora.r?)`."""
    parent, _, name = key.rpartition(".")
    close = (
        difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        or [k for k in known if name.startswith(k) or k.startswith(name)]
        or difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    )
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    return ConfigError(key, f"unknown key{hint}")


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
        return first_line(str(exc))
    if isinstance(exc, ValueError) and isinstance(exc.__cause__, OSError):  # logging's "Unable to configure handler"
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE:
        return (
            f"{exc.filename}: cannot write there ({exc.strerror}); choose another output folder with "
            "hydra.run.dir=... (hydra.sweep.dir=... for a multirun)"
        )
    return None


def failure_report(exc: BaseException) -> str:
    """What error.txt holds: the one line (or the exception's first line), then the traceback."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)\n"
    message = one_line_error(exc) or f"{type(exc).__name__}: {exc}".splitlines()[0]
    return message + "\n\n" + "".join(traceback.format_exception(exc))


# Errors of a folder that cannot be written: no permission, a file in the way, a read-only or full disk.
_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EEXIST}


def _omegaconf(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    message = first_line(getattr(err, "msg", None) or str(err))
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
    wanted = match.group(1) if match else first_line(str(exc))
    group, _, option = wanted.rpartition("/")
    if group and options:
        return f"{group}={option}: unknown option; choose one of: {', '.join(sorted(options))}"
    return first_line(str(exc))


def first_line(text: str) -> str:
    """The first non-blank line of `text`, stripped (`text` itself when it has none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
