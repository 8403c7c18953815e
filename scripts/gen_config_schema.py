"""Write src/ftlab/checks/schema.json: the signature of every ``_target_`` in conf/, and ftlab's own keys.

    make schema                                    # = python scripts/gen_config_schema.py
    python scripts/gen_config_schema.py --check    # exit 1 when schema.json is stale (tests/test_config_check.py)

Run it after changing a constructor that a config targets, or a config's own keys. ftlab's config check
(``ftlab.checks``) reads this file instead of importing torch, Lightning and transformers, so a typo is reported
in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from ftlab.checks.signatures import Spec, _union, spec_of, target_spec
from ftlab.utils.devices import COMPILE_MODES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCHEMA = ROOT / "src" / "ftlab" / "checks" / "schema.json"
APPS = ("train", "eval", "predict", "export", "serve")
DEVICE = Literal["cpu", "cuda", "auto"]

# ftlab's own keys of conf/<app>.yaml (dotted) and their types; a key of the file not listed takes anything.
# A string "module:NAME" is that constant's values as the choices (kept in step with the code that checks them).
OWN_KEYS: dict[str, dict[str, Any]] = {
    "train": {
        "name": str,
        "seed": int,
        "monitor": str,
        "monitor_mode": Literal["min", "max"],
        "save_backbone": bool,
        "resume": str | bool | None,  # true: the sweep variant (ftlab.runs.jobs)
        "compile": bool | Literal[COMPILE_MODES],  # type: ignore[valid-type]
        "auto_epochs.min_steps": int,
        "auto_epochs.min": int,
        "auto_epochs.max": int,
        "malloc_tuning": bool,
        "feature_cache": bool | Literal["prefix"],
        "required": list[str],
    },
    "eval": {
        "run": str,
        "ckpt": str | None,
        "split": "ftlab.evaluate:SPLITS",
        "device": DEVICE,
        "output_dir": str | None,
    },
    "predict": {
        "run": str,
        "ckpt": str | None,
        "inputs": str | list[str],
        "column": str | None,
        "pair_column": str | None,
        "output": str | None,
        "top_k": int,
        "batch_size": int,
        "device": DEVICE,
    },
    "export": {
        "run": str,
        "ckpt": str | None,
        "format": "ftlab.deploy.formats:FORMATS",
        "output_dir": str | None,
        "verify_examples": int,
        "tolerance": float,
        "compress": ("ftlab.deploy.compress:METHODS", None),
        "prune.fraction": float,
        "prune.finetune_epochs": int,
        "benchmark.batch_size": int,
        "benchmark.repeats": int,
        "device": DEVICE,
    },
    "serve": {
        "run": str | None,
        "export": str | None,
        "ckpt": str | None,
        "model_file": str | None,
        "host": Literal["127.0.0.1", "0.0.0.0", "::"],
        "port": int,
        "device": Literal["cpu", "cuda"],
        "workers": int,
        "api_servers": int,
        "threads": int,
        "batching.max_batch_size": int,
        "batching.max_wait_ms": float,
        "max_items": int,
        "max_body_mb": float,
        "top_k": int,
        "timeout_s": float,
        "log_level": Literal["critical", "error", "warning", "info", "debug", "trace"],
    },
}
# Parameters typed ``str`` whose constructor accepts only some values: the choices, for the check to name them.
CHOICES: dict[str, dict[str, Any]] = {
    "ftlab.models.backbones.HFTextBackbone": {"pooling": "ftlab.models.backbones.text:POOLING"},
    "ftlab.models.backbones.TorchvisionResNet": {"arch": "ftlab.models.backbones.vision:RESNETS"},
    "ftlab.data.TextClassificationDataModule": {
        "padding": "ftlab.data.text:PADDING",
        "num_workers": ("auto",),
        "pin_memory": ("auto",),
        "pad_to_multiple_of": ("auto",),
    },
    "ftlab.data.ImageClassificationDataModule": {
        "augment": "ftlab.data.image:AUGMENTATIONS",
        "num_workers": ("auto",),
        "pin_memory": ("auto",),
    },
    "ftlab.finetuning.PeftAdapter": {"method": "ftlab.finetuning.adapters:METHODS"},
    "ftlab.models.schedules.warmup_schedule": {"name": "ftlab.models.schedules:WARMUP_SCHEDULES"},
    "ftlab.callbacks.progress_bar": {"kind": ("auto", "rich", "tqdm", "log")},
    "pytorch_lightning.Trainer": {"max_epochs": ("auto",)},  # ftlab.utils.budget
}
# module.* are the options of the task that data.task picks (ftlab.tasks); these its constructors get from code
TASK_ARGS_FROM_CODE = ("self", "num_labels", "label_names", "class_counts")


def _locate(path: str) -> Any:
    module, _, name = path.rpartition(".")
    obj: Any = importlib.import_module(module)
    return getattr(obj, name)


def _choices(ref: Any) -> list[Any]:
    """Values from ``"module:CONSTANT"`` (a tuple, or a dict's keys), or a literal tuple (None = also null)."""
    values: list[Any] = []
    for part in ref if isinstance(ref, tuple) and ":" in str(ref[0]) else [ref]:
        if isinstance(part, str) and ":" in part:
            module, _, name = part.partition(":")
            values += list(getattr(importlib.import_module(module), name))
        elif isinstance(part, tuple):
            values += list(part)
        else:
            values.append(part)
    return values


def _choice_spec(spec: Spec, ref: Any) -> Spec:
    """``spec`` with its ``str`` option narrowed to the choices of ``ref`` (other options kept)."""
    values = _choices(ref)
    choice = {"kind": "choice", "values": [v for v in values if v is not None]}
    options = spec["options"] if spec["kind"] == "union" else [spec]
    kept = [o for o in options if o["kind"] not in ("str", "any")]
    return _union([*kept, choice, *([{"kind": "none"}] if None in values else [])])


def _targets_in(node: Any, found: set[str]) -> None:
    if isinstance(node, DictConfig):
        for key in node:
            if key == "_target_" and isinstance(node._get_node(key)._value(), str):
                found.add(node._get_node(key)._value())
            else:
                _targets_in(node._get_node(key), found)
    elif isinstance(node, ListConfig):
        for item in node._iter_ex(resolve=False):
            _targets_in(item, found)


def _canonical(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def targets() -> tuple[dict[str, Spec], dict[str, str]]:
    """Every config ``_target_``'s parameters (by its canonical name), and the config spellings -> canonical."""
    found: set[str] = set()
    for path in sorted(CONF.rglob("*.yaml")):
        if "local" not in path.relative_to(CONF).parts:
            _targets_in(OmegaConf.load(path), found)
    specs: dict[str, Spec] = {}
    aliases: dict[str, str] = {}
    choices = {_canonical(_locate(name)): table for name, table in CHOICES.items()}
    for name in sorted(found):
        obj = _locate(name)
        canonical = _canonical(obj)
        spec = target_spec(obj)
        for param, ref in choices.get(canonical, {}).items():
            if param in spec["params"]:
                spec["params"][param] = _choice_spec(spec["params"][param], ref)
        specs[canonical] = spec
        if name != canonical:
            aliases[name] = canonical
    return specs, aliases


def _module_node() -> Spec:
    """``module.*``: every task's options (null = the task's default), from ``ftlab.tasks.TASKS``."""
    from ftlab.tasks import TASKS

    params: dict[str, Spec] = {}
    for cls in TASKS.values():
        for name, spec in target_spec(cls, skip=TASK_ARGS_FROM_CODE)["params"].items():
            params[name] = _union([params.get(name, spec), spec, {"kind": "none"}])
    return {"target": "ftlab.tasks", "params": params, "var_keyword": False}


def _leaves(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in node:
        child = node._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(child, DictConfig) and "_target_" not in child and len(child):
            out += _leaves(child, path + ".")
        else:
            out.append(path)
    return out


def app(name: str) -> dict[str, Any]:
    """The keys of ``conf/<name>.yaml`` with their specs, its config groups and its own target-like nodes."""
    primary = OmegaConf.load(CONF / f"{name}.yaml")
    groups = []
    for entry in primary.get("defaults", []):
        key = next(iter(entry)) if isinstance(entry, DictConfig) else str(entry)
        group = key.replace("optional ", "").replace("override ", "").split("/")[0]
        if group != "_self_" and group not in groups:
            groups.append(group)
    nodes = {"module": _module_node()} if name == "train" else {}
    keys: dict[str, Spec] = {}
    for dotted in _leaves(primary):
        top = dotted.split(".")[0]
        if top in ("defaults", "hydra", *groups, *nodes):
            continue
        annotation = OWN_KEYS.get(name, {}).get(dotted, Any)
        keys[dotted] = (
            _choice_spec({"kind": "str"}, annotation)
            if isinstance(annotation, str | tuple)
            else spec_of(annotation)
        )
    return {"keys": keys, "groups": groups, "nodes": nodes}


def build() -> str:
    specs, aliases = targets()
    schema = {
        "generated_by": "scripts/gen_config_schema.py (make schema)",
        "targets": specs,
        "aliases": aliases,
        "apps": {name: app(name) for name in APPS},
    }
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if schema.json differs from a fresh build"
    )
    args = parser.parse_args()
    text = build()
    if args.check:
        if not SCHEMA.is_file() or SCHEMA.read_text() != text:
            sys.exit(
                f"{SCHEMA.relative_to(ROOT)} is stale: a constructor that a config targets, or a config's own keys, "
                "changed since it was written. Regenerate it with `make schema` (python scripts/gen_config_schema.py) "
                "and commit it."
            )
        print(f"{SCHEMA.relative_to(ROOT)} is up to date")
        return
    SCHEMA.write_text(text)
    print(f"wrote {SCHEMA.relative_to(ROOT)}: {len(specs_count(text))} targets")


def specs_count(text: str) -> dict[str, Any]:
    return json.loads(text)["targets"]


if __name__ == "__main__":
    main()
