"""Optional features and the pip extra that installs each (``[project.optional-dependencies]``).

``require_extra("onnx", "onnx", "onnxruntime", feature="format=onnx")`` raises a one-line
:class:`MissingExtraError` naming the extra when a package is not installed. It looks the modules up without
importing them, so the CLIs call it while checking the config, before anything heavy is loaded.
"""

from __future__ import annotations

from importlib.util import find_spec

from ftlab.utils.errors import ConfigError


class MissingExtraError(ConfigError):
    """A feature's optional packages are not installed; the message names the extra that installs them."""


def missing_modules(*modules: str) -> list[str]:
    """The names among ``modules`` that cannot be imported (found without importing them)."""
    absent = []
    for name in modules:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # its parent package is missing, or the module is set to None
            found = False
        if not found:
            absent.append(name)
    return absent


def require_extra(extra: str, *modules: str, feature: str | None = None) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``modules`` is installed."""
    absent = missing_modules(*modules)
    if absent:
        raise MissingExtraError(
            f"{feature or 'This feature'} needs {', '.join(absent)}, which is not installed: "
            f"pip install 'ftlab[{extra}]'."
        )
