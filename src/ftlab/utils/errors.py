"""User-facing errors.

An :class:`FtlabError` is a mistake in the user's input (a config value, a file, a column), not a bug. The entry
points print its message as one paragraph and exit with status 2, without a traceback. Each subclass is also the
standard exception a caller would expect (``ValueError``, ``FileNotFoundError``, ``OSError``), so library users can
catch either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


class FtlabError(Exception):
    """Base class for errors caused by user input; the message says what is wrong and how to fix it."""


class ConfigError(FtlabError, ValueError):
    """A config key has a bad value, or two values do not fit together."""


class DataError(FtlabError, ValueError):
    """The data does not fit the config: a missing column, an unseen label, an empty split."""


class DataFileError(FtlabError, FileNotFoundError):
    """A data or run file is missing or cannot be read."""


class ModelLoadError(FtlabError, OSError):
    """A pretrained model or tokenizer could not be loaded (most often: no internet and no local copy)."""


def options_for(cls: type, value: Any, key: str, example: str) -> dict[str, Any] | None:
    """The keyword arguments of dataclass ``cls`` from the config node ``key`` (``data.mix``, ...): ``None`` for
    ``null`` or ``{}``; a ConfigError naming ``key`` for anything but a mapping of ``cls``'s fields."""
    if value is None or (isinstance(value, Mapping) and not value):
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={value!r} must be a mapping such as {example}, or null.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{key} has unknown keys {unknown}; the keys are: {sorted(known)}.")
    return dict(value)
