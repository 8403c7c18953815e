"""Callbacks ftlab adds to Lightning's own (checkpointing, early stopping and LR monitoring come from Lightning)."""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ProgressBar, RichProgressBar, TQDMProgressBar

from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)


class EpochSeed(Callback):
    """Reseed torch/numpy/random at every training epoch from (seed, epoch).

    Dropout masks and augmentation of an epoch then do not depend on what ran before it, so a run resumed from
    ``last.ckpt`` trains exactly as the uninterrupted run (checkpoints do not hold RNG states).
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch_seed = (self.seed * 1_000_003 + trainer.current_epoch) % 2**32
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        # Lightning creates the epoch's DataLoader iterator (one draw from the global RNG) before the epoch-start
        # hook in the first epoch of a run, resumed or not, but after it in later epochs: reseed once more here so
        # that dropout in a resumed epoch draws exactly what it draws in the uninterrupted run.
        if idx == 0:
            self.on_train_epoch_start(trainer, pl_module)


class BestScore(Callback):
    """Tracks the best value of the monitored metric and its epoch (kept in checkpoints, so resume keeps it)."""

    def __init__(self, monitor: str, mode: str = "max"):
        if mode not in ("min", "max"):
            raise ConfigError(f"monitor_mode={mode!r} must be 'min' or 'max'.")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]


class LogProgress(ProgressBar):
    """One log line per epoch (and every ``every_n_steps`` steps): readable in files, CI logs and SLURM output."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer: pl.Trainer, prefix: str) -> None:
        metrics = {k: v for k, v in self.get_metrics(trainer, trainer.lightning_module).items() if k != "v_num"}
        shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        log.info("%s %s (%.0f s)", prefix, shown, time.perf_counter() - self._start)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if self._enabled and self.every_n_steps and step % self.every_n_steps == 0:
            self._line(trainer, f"epoch {trainer.current_epoch} step {step}/{self.total_train_batches}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            self._line(trainer, f"epoch {trainer.current_epoch} validated:")


def progress_bar(kind: str = "auto", every_n_steps: int = 50) -> ProgressBar:
    """``rich`` in a terminal, ``log`` lines otherwise (``auto``); ``tqdm`` on request."""
    if kind == "auto":
        kind = "rich" if sys.stdout.isatty() else "log"
    if kind == "rich":
        return RichProgressBar()
    if kind == "tqdm":
        return TQDMProgressBar()
    if kind == "log":
        return LogProgress(every_n_steps)
    raise ConfigError(f"callbacks.progress_bar.kind={kind!r} is not one of auto, rich, tqdm, log.")
