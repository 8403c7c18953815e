"""``tune.lr=true``: Lightning's learning-rate range test on the run's own module, policy and parameter groups.

The search is :meth:`pytorch_lightning.tuner.Tuner.lr_find` (Smith 2017: a short run with the learning rate
rising exponentially from ``tune.min_lr`` to ``tune.max_lr``; the suggestion is the steepest fall of the loss). It
runs on exactly what training will run: frozen groups stay frozen (they are not in the optimizer's groups with a
gradient), and the policy's LR multipliers (head x100, layer-wise decay, ...) hold during the search, because
Lightning sets every group to one learning rate and :meth:`FinetuneModule.on_before_optimizer_step` scales each
group by its ``lr_scale`` while ``lr_search`` is on. So the suggestion is the base ``optimizer.lr``, and the
multipliers apply on top of it as in any run.

Written into the run folder: ``lr_find.png`` (the curve, the suggestion marked) and ``lr_find.json`` (learning
rates, losses, suggestion). A resumed run reads its ``lr_find.json`` instead of searching again (the search
belongs to the run's start), so ``resume=<run>`` continues with the learning rate the run started with.
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import atomic_write

log = logging.getLogger(__name__)

CURVE_FILE = "lr_find.json"
PLOT_FILE = "lr_find.png"


def tuned_lr(
    cfg: DictConfig, trainer: pl.Trainer, module: Any, datamodule: Any, output_dir: Path, resumed: bool
) -> float | None:
    """Search (or, for a resumed run, read back) the learning rate and give it to ``module``; ``None``: not asked."""
    options = cfg.get("tune") or {}
    if not options.get("lr"):
        return None
    record = output_dir / CURVE_FILE
    if resumed and record.is_file():
        lr = json.loads(record.read_text())["suggestion"]  # null: the search found none, optimizer.lr kept
        log.info("tune.lr: the run's learning-rate search chose %s (%s); resumed with it.", lr, record)
    else:
        lr = _search(options, trainer, module, datamodule, output_dir)
    if lr is not None:
        set_base_lr(module, lr)
    return lr


def set_base_lr(module: Any, lr: float) -> None:
    """Replace ``optimizer.lr`` in the module's optimizer factory (a partial); multipliers apply on top of it."""
    factory = module.optimizer_factory
    module.optimizer_factory = partial(factory.func, *factory.args, **{**factory.keywords, "lr": lr})


def _search(
    options: Any, trainer: pl.Trainer, module: Any, datamodule: Any, output_dir: Path
) -> float | None:
    from pytorch_lightning.tuner import Tuner

    # under ddp_spawn the search would run (and its result stay) in the child processes
    if trainer.world_size > 1:
        raise ConfigError(
            f"tune.lr=true searches on one process, and this trainer has {trainer.world_size} "
            f"(trainer.strategy={type(trainer.strategy).__name__}). Search with trainer.devices=1, then give the "
            "suggestion (lr_find.json in that run folder) to the multi-process run as optimizer.lr=<value>."
        )
    steps = int(options.get("num_training", 100))
    module.lr_search = True
    # Lightning's search stops at the trainer's max_epochs too: a small set would end it after one epoch's steps
    # (every epoch has at least one step, so `steps` epochs are enough; the finder replaces the schedule)
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = max(steps, max_epochs if max_epochs is not None and max_epochs > 0 else 1)
    try:
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=datamodule,
            min_lr=float(options.get("min_lr", 1e-7)),
            max_lr=float(options.get("max_lr", 1.0)),
            num_training=steps,
            early_stop_threshold=options.get("early_stop_threshold", 4.0),
            update_attr=False,  # the suggestion goes into the optimizer factory below (set_base_lr)
        )
    finally:
        module.lr_search = False
        trainer.fit_loop.max_epochs = max_epochs
    if finder is None:  # fast_dev_run: Lightning skips the search
        return None
    suggestion = finder.suggestion()
    if suggestion is None or not math.isfinite(suggestion):
        log.warning(
            "tune.lr: the search found no steepest fall of the loss in %d steps; training keeps optimizer.lr. "
            "Give it more steps (tune.num_training) or a wider range (tune.min_lr, tune.max_lr).",
            steps,
        )
    if trainer.is_global_zero:
        _write(finder, suggestion, output_dir)
    log.info(
        "tune.lr: learning-rate search suggests %.3g (curve: %s).", suggestion or float("nan"), PLOT_FILE
    )
    return suggestion if suggestion is not None and math.isfinite(suggestion) else None


def _write(finder: Any, suggestion: float | None, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, CI)
    import matplotlib.pyplot as plt

    record = {
        "suggestion": suggestion,
        "lr": [float(x) for x in finder.results["lr"]],
        "loss": [float(x) for x in finder.results["loss"]],
    }
    atomic_write(output_dir / CURVE_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    figure = finder.plot(suggest=suggestion is not None, show=False)
    figure.axes[0].set_title(f"learning-rate search: suggestion {suggestion:.3g}" if suggestion else "")
    atomic_write(output_dir / PLOT_FILE, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
