"""Type specs from Python signatures: the JSON form the config check compares values with.

A spec is a small dict, ``{"kind": ...}``: ``any``, ``none``, ``bool``, ``int``, ``float``, ``str``, ``dict``,
``list`` (with ``item``), ``choice`` (with ``values``: a ``Literal`` or an ``Enum``), ``union`` (with ``options``)
and ``object`` (an instance of a class, which a config can only give as a node with its own ``_target_``).
Anything a config value cannot express, or that cannot be read, is ``any``: the check never guesses.
"""

from __future__ import annotations

import collections.abc as abc
import enum
import inspect
import os
import types
import typing
from typing import Any

Spec = dict[str, Any]
ANY: Spec = {"kind": "any"}
_SCALARS = {bool: "bool", int: "int", float: "float", str: "str", type(None): "none"}
_LISTS = {
    list,
    tuple,
    set,
    frozenset,
    abc.Sequence,
    abc.MutableSequence,
    abc.Iterable,
    abc.Collection,
    abc.Set,
}
_DICTS = {dict, abc.Mapping, abc.MutableMapping}


def spec_of(annotation: Any) -> Spec:
    """The spec of one annotation (already evaluated: a type or a ``typing`` construct)."""
    if annotation is None:
        return {"kind": "none"}
    if annotation in _SCALARS:
        return {"kind": _SCALARS[annotation]}
    if annotation is inspect.Parameter.empty or annotation is Any:
        return ANY
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return spec_of(args[0])
    if origin is typing.Literal:
        return _choice(list(args))
    if origin in (typing.Union, types.UnionType):
        return _union([spec_of(a) for a in args])
    if annotation in _LISTS or origin in _LISTS:
        homogeneous = origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)
        return {"kind": "list", "item": spec_of(args[0]) if args and homogeneous else ANY}
    if annotation in _DICTS or origin in _DICTS:
        return {"kind": "dict"}
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return _choice(list(annotation))
        if issubclass(annotation, os.PathLike):  # pathlib.Path and friends: a config gives a string
            return {"kind": "str"}
        if annotation.__module__ != "builtins":
            return {"kind": "object", "class": f"{annotation.__module__}.{annotation.__qualname__}"}
    return ANY


def _choice(values: list[Any]) -> Spec:
    plain = [v.value if isinstance(v, enum.Enum) else v for v in values]
    if not all(isinstance(v, str | int | float | bool) or v is None for v in plain):
        return ANY
    return {"kind": "choice", "values": plain}


def _union(options: list[Spec]) -> Spec:
    flat: list[Spec] = []
    choices: list[Any] = []  # Literal[64, 32] | Literal["32-true", ...]: one choice of every value
    for option in options:
        for one in option["options"] if option["kind"] == "union" else [option]:
            if one["kind"] == "any":
                return ANY
            if one["kind"] == "choice":
                choices += [
                    v for v in one["values"] if not any(v == c and type(v) is type(c) for c in choices)
                ]
            elif one not in flat:
                flat.append(one)
    if choices:
        flat.insert(0, {"kind": "choice", "values": choices})
    return flat[0] if len(flat) == 1 else {"kind": "union", "options": flat}


def _hints(fn: Any) -> dict[str, Any]:
    """Evaluated annotations of ``fn``; one that cannot be evaluated (a name imported only for type checkers) is
    left out, so its parameter accepts anything."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # any failure: evaluate them one by one below
        pass
    hints: dict[str, Any] = {}
    namespace = getattr(fn, "__globals__", {})
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
        except Exception:
            continue
    return hints


def target_spec(target: Any, skip: tuple[str, ...] = ()) -> Spec:
    """The parameters a config node may set on ``target`` (a class or a function), with their specs.

    ``var_keyword``: the target takes ``**kwargs``, so unknown keys cannot be told from valid ones.
    """
    fn = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    signature = inspect.signature(target)
    if isinstance(target, type) and all(
        p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in signature.parameters.values()
    ):  # a generic __new__ (e.g. one that picks a subclass) hides __init__'s parameters: read those
        parameters = list(inspect.signature(fn).parameters.values())[1:]  # without self
        signature = signature.replace(parameters=parameters)
    hints = _hints(fn)
    params: dict[str, Spec] = {}
    var_keyword = False
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL and name not in skip:
            params[name] = spec_of(hints.get(name, inspect.Parameter.empty))
    return {"params": params, "var_keyword": var_keyword}
