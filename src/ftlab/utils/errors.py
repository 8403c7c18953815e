"""User-facing errors.

An :class:`FtlabError` is a mistake in the user's input (a config value, a file, a column), not a bug. The entry
points print its message as one paragraph and exit with status 2, without a traceback. Each subclass is also the
standard exception a caller would expect (``ValueError``, ``FileNotFoundError``, ``OSError``), so library users can
catch either.
"""

from __future__ import annotations


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
