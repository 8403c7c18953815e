"""What a run prints: the composed config as a tree at its start, and no advertisements."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# the path of one run first (conf/train.yaml's defaults order), then everything else in the config's order
ORDER = ("data", "model", "finetune", "optimizer", "scheduler", "trainer", "callbacks", "logger", "module")
# Lightning 2.6 logs these through rank_zero_info on every Trainer (its LitLogger / litmodels promotion), with
# no switch to turn them off: a filter on that logger drops exactly these records.
_LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")
_ADVERT = "💡 Tip:"


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERT)


def quiet_lightning() -> None:
    """Drop Lightning's advertisement lines ("💡 Tip: ... litlogger / litmodels"); its other messages stay."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvert) for f in logger.filters):
            logger.addFilter(_NoAdvert())


def _yaml(node: Any) -> str:
    if not isinstance(node, DictConfig):
        return str(node)
    try:
        return OmegaConf.to_yaml(node, resolve=True)
    except OmegaConfBaseException:  # e.g. ${hydra:...} outside a job: show the interpolation itself
        return OmegaConf.to_yaml(node)


def show_config(cfg: DictConfig, title: str = "config") -> None:
    """Print ``cfg`` as a tree: one branch per group (data, model, ... in run order), then the plain keys."""
    from rich.console import Console
    from rich.tree import Tree

    tree = Tree(title, guide_style="dim")
    keys = [k for k in ORDER if k in cfg] + [str(k) for k in cfg if k not in ORDER and k != "hydra"]
    plain: dict[str, Any] = {}
    for key in keys:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none():
            _branch(tree, key, _yaml(cfg[key]).rstrip() or "{}")
        else:
            plain[key] = _value(cfg, key)
    if plain:
        _branch(tree, "run", OmegaConf.to_yaml(plain).rstrip())
    Console(soft_wrap=True).print(tree)


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        value = cfg[key]
    except OmegaConfBaseException:
        return cfg._get_node(key)._value()  # type: ignore[union-attr]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _branch(tree: Any, label: str, text: str) -> None:
    from rich.syntax import Syntax

    syntax = Syntax(text, "yaml", theme="ansi_dark", background_color="default")
    tree.add(label, guide_style="dim").add(syntax)
