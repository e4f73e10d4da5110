"""Errors that are the user's to fix: the entrypoint prints them as one line, without a traceback."""

import difflib


class UserError(Exception):
    """A mistake in the input (config, data, paths, model choice) rather than a bug in adl-llm."""


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
