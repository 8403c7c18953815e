"""Check a composed config before anything heavy is imported or loaded.

Every node with a ``_target_`` is checked against its target's signature (unknown keys, with the closest valid
one; values of the wrong type for the annotation), and ftlab's own keys (``seed``, ``monitor_mode``, ``module.*``,
``split``, ...) against their declared types. The signatures come from ``schema.json``, generated from the real
targets by ``scripts/gen_config_schema.py`` (``make schema``), so checking needs neither torch, Lightning nor
transformers. A ``_target_`` the schema does not know (a user's own class) is imported and read live.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import re
from collections.abc import Collection, Iterator
from importlib.resources import files
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftlab.checks.signatures import Spec, target_spec
from ftlab.checks.specs import _show, describe, describe_value, fits
from ftlab.utils.errors import ConfigError

RESERVED = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
_UNRESOLVED = object()  # a value that only resolves inside a Hydra job (${hydra:...}): not checked here
_LISTED_ARGS = 16  # name every valid argument when there are at most this many
_SAME_AS = re.compile(r"^\$\{[\w.]+\}$")  # a plain reference to another key
_KEY = re.compile(r"[\w.\-]*")  # a problem's first word: its key


@functools.cache
def load_schema() -> dict[str, Any]:
    return json.loads(files("ftlab.checks").joinpath("schema.json").read_text())


def check_config(
    cfg: DictConfig, app: str, schema: dict[str, Any] | None = None, skip: Collection[str] = ()
) -> None:
    """Raise a :class:`ConfigError` (one paragraph per problem) if ``cfg`` of ``ftlab-<app>`` has any."""
    problems = find_problems(cfg, app, schema, skip)
    if problems:
        raise ConfigError("\n\n".join(problems))


def find_problems(
    cfg: DictConfig, app: str, schema: dict[str, Any] | None = None, skip: Collection[str] = ()
) -> list[str]:
    """Every problem of ``cfg`` as one paragraph each (it starts with the key): missing values, ftlab's own keys,
    then target nodes. Keys in ``skip`` and below them are left out (a sweep's swept keys: each job checks its own).
    """
    problems = _problems(cfg, app, schema or load_schema())
    return [p for p in problems if not any(_under(_KEY.match(p).group(0), s) for s in skip)]  # type: ignore[union-attr]


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _problems(cfg: DictConfig, app: str, schema: dict[str, Any]) -> list[str]:
    own = schema["apps"].get(app, {"keys": {}, "nodes": {}, "groups": []})
    problems = [
        f"{path} is not set (??? in the config): give it, e.g. {path}=<value>." for path in _missing(cfg)
    ]
    problems += required_problems(cfg)
    problems += _own_keys(cfg, own, app)
    for key, entry in own["nodes"].items():
        if isinstance(cfg.get(key), DictConfig) and "_target_" not in cfg[key]:
            problems += _check_node(key, cfg[key], f"ftlab's {key} ({entry['target']})", entry)
    for path, node in _target_nodes(cfg, ""):
        target = _resolved(node, "_target_")
        if isinstance(target, str):
            entry, error = _entry(target, schema)
            problems += (
                [f"{path}._target_={target}: {error}"] if error else _check_node(path, node, target, entry)
            )
    return problems


def required_problems(cfg: DictConfig) -> list[str]:
    """The keys that ``required`` (set by an experiment) names but the composed config leaves null or unset.

    ``???`` in an experiment cannot mark a key that a config group already sets (OmegaConf keeps the group's value
    when merging a missing one), so experiments list such keys in ``required`` instead.
    """
    keys = cfg.get("required") or []
    if not isinstance(keys, ListConfig | list):
        return [
            f"required={keys!r} must be a list of dotted keys, e.g. required=[model.backbone.checkpoint]."
        ]
    name = cfg.get("name", "this config")
    problems = []
    for key in keys:
        try:
            value = OmegaConf.select(cfg, str(key), throw_on_missing=False)
        except OmegaConfBaseException:
            value = None
        if value is None or value == "???":
            problems.append(
                f"{key} is not set, and {name} needs it (its required list): give it on the command line, "
                f"e.g. {key}=<value>."
            )
    return problems


def _entry(target: str, schema: dict[str, Any]) -> tuple[Spec, str | None]:
    known = schema["targets"].get(schema["aliases"].get(target, target))
    if known is not None:
        return known, None
    try:  # not one of ftlab's configs' targets (e.g. the user's own class): read its signature live
        return target_spec(_locate(target)), None
    except (ImportError, AttributeError, ValueError) as err:
        return {}, (
            f"cannot be imported ({type(err).__name__}: {err}). Check the dotted name; for your own code, make "
            "sure its package is importable (installed, or on PYTHONPATH)."
        )
    except TypeError:  # no signature to read (a builtin): nothing to check against
        return {"params": {}, "var_keyword": True}, None


def _locate(path: str) -> Any:
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def _check_node(path: str, node: DictConfig, owner: str, entry: Spec) -> list[str]:
    problems = []
    params: dict[str, Spec] = entry["params"]
    for key in node:
        key = str(key)
        full = f"{path}.{key}"
        if key in RESERVED:
            continue
        if key not in params:
            if not entry["var_keyword"]:
                problems.append(_unknown(full, _resolved(node, key), owner, list(params), path))
            continue
        if _SAME_AS.match(str(getattr(node._get_node(key), "_value", lambda: None)())):
            continue  # ${seed}: a bad value there is reported once, at its own key
        value = _resolved(node, key)
        if value is not _UNRESOLVED and not fits(value, params[key]):
            problems.append(_wrong(full, value, f"{owner}'s {key}", params[key]))
    return problems


def _own_keys(cfg: DictConfig, own: dict[str, Any], app: str) -> list[str]:
    problems = []
    for dotted, spec in own["keys"].items():
        parent, _, key = dotted.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and key in node:
            value = _resolved(node, key)
            if value is not _UNRESOLVED and not fits(value, spec):
                problems.append(_wrong(dotted, value, f"ftlab-{app}'s {dotted}", spec))
    top = {k.split(".")[0] for k in own["keys"]} | set(own["groups"]) | set(own["nodes"])
    for key in (str(k) for k in cfg if k != "hydra"):
        close = difflib.get_close_matches(key, sorted(top), n=1, cutoff=0.8)
        if key not in top and close:  # an extra top-level key may be the user's own (for interpolation)
            shown = _show(_resolved(cfg, key)) if _resolved(cfg, key) is not _UNRESOLVED else "..."
            problems.append(f"{key}={shown}: ftlab-{app} has no setting {key!r}. Did you mean {close[0]}?")
    for parent in {k.rpartition(".")[0] for k in own["keys"] if "." in k}:
        node = OmegaConf.select(cfg, parent)
        valid = [k.rpartition(".")[2] for k in own["keys"] if k.rpartition(".")[0] == parent]
        for key in node if isinstance(node, DictConfig) else []:
            if key not in valid:
                full = f"{parent}.{key}"
                problems.append(
                    _unknown(full, _resolved(node, key), f"ftlab-{app}'s {parent}", valid, parent)
                )
    return problems


def _unknown(full: str, value: Any, owner: str, valid: list[str], parent: str) -> str:
    key = full.rpartition(".")[2]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {parent}.{close[0]}?" if close else ""
    listed = f" Valid keys: {', '.join(sorted(valid))}." if len(valid) <= _LISTED_ARGS else ""
    shown = "" if value is _UNRESOLVED else f"={_show(value)}"
    return f"{full}{shown}: {owner} has no argument {key!r}.{hint}{listed} Remove or rename the key."


def _wrong(full: str, value: Any, owner: str, spec: Spec) -> str:
    return (
        f"{full}={_show(value)}: {owner} takes {describe(spec)}, not {describe_value(value)}. "
        f"Give it as {full}=<value> on the command line or fix the config file that sets it."
    )


def _resolved(node: DictConfig, key: str) -> Any:
    try:
        value = node[key]
        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
        return value
    except OmegaConfBaseException:  # ${hydra:...}, ${now:...} outside a job, or a missing value (reported)
        return _UNRESOLVED


def _children(cfg: DictConfig | ListConfig, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, key, node) of each child, the top-level ``hydra`` node left out; nodes are never resolved."""
    keys: list[Any] = list(range(len(cfg))) if isinstance(cfg, ListConfig) else list(cfg)
    for key in keys:
        if key == "hydra" and not prefix:
            continue
        yield (f"{prefix}.{key}" if prefix else str(key)), key, cfg._get_node(key)


def _is_container(node: Any) -> bool:
    return isinstance(node, DictConfig | ListConfig) and not node._is_none() and not node._is_interpolation()


def _missing(cfg: DictConfig | ListConfig, prefix: str = "") -> Iterator[str]:
    for path, key, child in _children(cfg, prefix):
        if OmegaConf.is_missing(cfg, key):
            yield path
        elif _is_container(child):
            yield from _missing(child, path)


def _target_nodes(cfg: DictConfig | ListConfig, prefix: str) -> Iterator[tuple[str, DictConfig]]:
    if isinstance(cfg, DictConfig) and "_target_" in cfg and prefix:
        yield prefix, cfg
    for path, _, child in _children(cfg, prefix):
        if _is_container(child):
            yield from _target_nodes(child, path)
