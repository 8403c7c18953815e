"""``trainer.max_epochs=auto``: a run's length in optimizer steps rather than epochs.

Two epochs, the fixed default, are ~90 updates on sklearn's 1,797 digits and ~200 on 4,000 sentences: on both
datasets of the defaults panel (docs/defaults.md) a default run was still improving at its end and a higher rate
than the family's preset won the rate sweep, while ten epochs of the same defaults reached 0.989 on digits. With
``auto`` a small set gets as many updates as a large one: enough epochs for at least ``auto_epochs.min_steps``
optimizer steps, never fewer than ``auto_epochs.min`` nor more than ``auto_epochs.max`` epochs; early stopping (on
by default) still ends a run that has stopped improving.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig, open_dict

from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"


def auto_epochs(steps_per_epoch: int, min_steps: int, least: int, most: int) -> int:
    """Epochs for at least ``min_steps`` steps of ``steps_per_epoch``, within ``[least, most]``."""
    if steps_per_epoch < 1:
        raise ConfigError("trainer.max_epochs=auto: the training split has no batch; it needs at least one.")
    return max(least, min(most, math.ceil(min_steps / steps_per_epoch)))


def _settings(cfg: DictConfig) -> tuple[int, int, int]:
    node = cfg.get("auto_epochs") or {}
    values = [node.get(k) for k in ("min_steps", "min", "max")]
    numbers = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 1]
    if len(numbers) < 3 or numbers[1] > numbers[2]:
        shown = dict(zip(("min_steps", "min", "max"), values, strict=True))
        raise ConfigError(
            f"auto_epochs={shown}: min_steps, min and max must be positive whole numbers with min <= max "
            "(conf/train.yaml: min_steps 600, min 2, max 50)."
        )
    return numbers[0], numbers[1], numbers[2]


def steps_per_epoch(batches: int, trainer: Any) -> int:
    """Optimizer steps in one epoch of ``batches`` training batches on ``trainer`` (its devices share the batches,
    ``limit_train_batches`` cuts them, ``accumulate_grad_batches`` groups them)."""
    per_device = math.ceil(batches / max(1, trainer.world_size))
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        per_device = min(per_device, limit)
    elif limit is not None:
        per_device = int(per_device * float(limit))
    return math.ceil(per_device / max(1, trainer.accumulate_grad_batches))


def deferred(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments for building ``cfg.trainer``: with ``max_epochs=auto`` none yet (:func:`resolve_max_epochs`
    sets them once the trainer knows its devices; a run that does not train keeps none)."""
    return {"max_epochs": None} if cfg.trainer.get("max_epochs") == AUTO else {}


def resolve_max_epochs(cfg: DictConfig, trainer: Any, datamodule: Any) -> int | None:
    """With ``trainer.max_epochs=auto``: choose the epochs, set them on ``trainer`` and in ``cfg``; else None."""
    if cfg.trainer.get("max_epochs") != AUTO:
        return None
    min_steps, least, most = _settings(cfg)
    per_epoch = steps_per_epoch(len(datamodule.train_dataloader()), trainer)
    epochs = auto_epochs(per_epoch, min_steps, least, most)
    trainer.fit_loop.max_epochs = epochs
    with open_dict(cfg):
        cfg.trainer.max_epochs = epochs
    log.info(
        "trainer.max_epochs=auto: %d epochs of %d steps (at least %d steps; between %d and %d epochs)",
        epochs,
        per_epoch,
        min_steps,
        least,
        most,
    )
    return epochs


def short_run_hint(cfg: DictConfig, trainer: Any, best_epoch: int | None) -> str | None:
    """A fixed number of epochs that ended while the run was still improving, after fewer optimizer steps than
    ``auto_epochs.min_steps``: what to set instead (the defaults panel's misses, docs/defaults.md). None otherwise:
    with ``max_epochs=auto``, a step budget (``max_steps``), an earlier best epoch, or enough steps."""
    epochs = cfg.trainer.get("max_epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1 or best_epoch is None:
        return None
    if (cfg.trainer.get("max_steps") or -1) > 0 or best_epoch != epochs - 1:
        return None
    try:
        min_steps = _settings(cfg)[0]
    except ConfigError:
        return None
    steps = trainer.global_step  # 0 in the parent of spawned ranks (ddp_spawn): nothing to judge from there
    if not 0 < steps < min_steps:
        return None
    return (
        f"The best validation score came in the last epoch ({epochs} of trainer.max_epochs={epochs}), after "
        f"{steps} optimizer steps: the run had not stopped improving. Small datasets usually need more updates "
        f"than {epochs} epochs give; trainer.max_epochs=auto trains for at least {min_steps} steps (early stopping "
        "still ends it sooner), or set trainer.max_epochs higher (docs/defaults.md)."
    )
