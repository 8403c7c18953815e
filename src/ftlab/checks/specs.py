"""Does a config value fit a type spec (``ftlab.checks.signatures``), and the spec in a person's words."""

from __future__ import annotations

from typing import Any

from ftlab.checks.signatures import Spec

_WORDS = {
    "any": "anything",
    "none": "null",
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "dict": "a mapping ({key: value, ...})",
    "object": "a config node with its own _target_",
}


def fits(value: Any, spec: Spec) -> bool:
    """Whether ``value`` (plain Python: a resolved config value) fits ``spec``."""
    kind = spec["kind"]
    if kind == "any":
        return True
    if kind == "union":
        return any(fits(value, option) for option in spec["options"])
    if kind == "none":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":  # an integer is a fine number (lr=1); true/false is not
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "choice":
        return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in spec["values"])
    if kind == "list":
        return isinstance(value, list | tuple) and all(fits(item, spec["item"]) for item in value)
    if kind in (
        "dict",
        "object",
    ):  # an object comes from a nested node (its own _target_, checked on its own)
        return isinstance(value, dict)
    return True  # a kind written by a newer generator: accept rather than refuse a valid config


def describe(spec: Spec) -> str:
    """``an integer or null``, ``one of 'cls', 'mean', 'pooler'``, ``a list of strings`` ..."""
    kind = spec["kind"]
    if kind == "union":
        # an object option (a tensor, a strategy instance) is not what a person types: named only if alone
        options = [o for o in spec["options"] if o["kind"] != "object"] or spec["options"]
        options = sorted(options, key=lambda s: s["kind"] == "none")  # "or null" reads best last
        return " or ".join(describe(option) for option in options)
    if kind == "choice":
        return "one of " + ", ".join(_show(v) for v in spec["values"])
    if kind == "list":
        item = spec["item"]
        return "a list" if item["kind"] == "any" else f"a list, each item {describe(item)}"
    return _WORDS.get(kind, str(kind))


def describe_value(value: Any) -> str:
    """``'abc' (a string)``, ``3 (an integer)``, ``[1, 'a'] (a list)``."""
    kinds = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    kind = kinds.get(type(value), "a list" if isinstance(value, list | tuple) else "a mapping")
    return f"{_show(value)} ({kind})"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)
