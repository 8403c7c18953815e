"""Resuming with the command a run was started with: its config-group choices are checked, not applied as values.

``resume=<run>`` composes the run's saved ``.hydra/config.yaml``; a group choice on the command line
(``model=tiny_bert``) would then replace the composed ``model`` node by the string ``"tiny_bert"``. Restating the
run's own choice is dropped here; a different one is refused (a resumed run keeps its data, model and strategy).
A resumed sweep composes each job afresh from the command line, so there the group choices must be the sweep's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ftlab.utils.errors import ConfigError

HYDRA_FILE = ".hydra/hydra.yaml"  # the run's Hydra record: its runtime group choices


def _split(arg: str) -> tuple[str, str, str] | None:
    """``(prefix, key, value)`` of an override (prefix ``+``, ``++``, ``~`` or empty); ``None`` for a flag."""
    if arg.startswith("-"):
        return None
    prefix = "++" if arg.startswith("++") else arg[:1] if arg[:1] in "+~" else ""
    body = arg[len(prefix) :]
    key, sep, value = body.partition("=")
    if not sep and prefix != "~":
        return None
    return prefix, key, value


def _groups() -> set[str]:
    """Every config group of the installed config tree (``model``, ``hydra/launcher``, ...)."""
    from ftlab.runs.folder import conf_path

    root = conf_path()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and not p.name.startswith("_")}


def _same(a: Any, b: str) -> bool:
    """A recorded choice (``None`` for ``null``) against a command-line value; sweep lists compare as sets."""
    recorded = "null" if a is None else str(a)
    return sorted(recorded.split(",")) == sorted(b.split(","))


def run_choices(run_dir: Path) -> dict[str, Any]:
    """The group choices the run was composed with (``.hydra/hydra.yaml``), ``{}`` if it has no record."""
    path = run_dir / HYDRA_FILE
    if not path.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices", default=None)
    return dict(OmegaConf.to_container(choices)) if choices is not None else {}  # type: ignore[arg-type]


def resume_run_overrides(run_dir: Path, config: Path, rest: list[str]) -> list[str]:
    """``rest`` without the run's own group choices; a ``+key`` that the saved config already has becomes ``key``.

    Raises:
        ConfigError: a group choice that is not the run's.
    """
    saved = OmegaConf.load(config)
    choices = run_choices(run_dir)
    groups = _groups() | set(choices)
    kept: list[str] = []
    for arg in rest:
        parts = _split(arg)
        if parts is None:
            kept.append(arg)
            continue
        prefix, key, value = parts
        if key in groups and prefix != "~":
            if key in choices and _same(choices[key], value):
                continue  # restating the run's own choice
            raise _changed(f"resume={run_dir}", key, choices.get(key), value)
        if prefix in ("+", "++") and OmegaConf.select(saved, key, default=None) is not None:
            kept.append(f"{key}={value}")  # the original +key=value, already in the saved config
        elif prefix == "~" and OmegaConf.select(saved, key, default=None) is None:
            continue  # the original ~key: already gone from the saved config
        else:
            kept.append(arg)
    return kept


def check_sweep_choices(sweep_dir: Path, multirun_file: Path, rest: list[str]) -> None:
    """A resumed sweep must make the same group choices as its first command (``multirun.yaml``'s overrides).

    Raises:
        ConfigError: a group choice changed, added or left out.
    """
    recorded = OmegaConf.select(OmegaConf.load(multirun_file), "hydra.overrides.task", default=None) or []
    groups = _groups()

    def chosen(args: list[str]) -> dict[str, str]:
        out = {}
        for arg in args:
            parts = _split(str(arg))
            if parts and parts[1] in groups and parts[0] != "~":
                out[parts[1]] = parts[2]
        return out

    before, now = chosen(list(recorded)), chosen(rest)
    for key in sorted(set(before) | set(now)):
        if key not in now or key not in before or not _same(before[key], now[key]):
            raise _changed(
                f"resume={sweep_dir}", key, before.get(key, "its default"), now.get(key, "nothing")
            )


def _changed(what: str, key: str, was: Any, given: str) -> ConfigError:
    return ConfigError(
        f"{what}: {key}={given} is not the choice the run was started with ({key}={'null' if was is None else was})."
        " A resumed run keeps its data, model, fine-tuning strategy and the other config-group choices; restating "
        "the original command is fine, and value overrides (trainer.max_epochs=5) apply. To change a group, start "
        "a new run (without resume=)."
    )
