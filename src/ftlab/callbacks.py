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
    ``last.ckpt`` trains exactly as the uninterrupted run. A checkpoint written mid-epoch (on preemption,
    :mod:`ftlab.preemption`) also holds the generators' states, which the resumed run continues from instead.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._seeded_epoch: int | None = None
        self._restored: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # At the first batch rather than in on_train_epoch_start: Lightning skips that hook for the first epoch
        # of a run resumed from a checkpoint written at the end of the previous epoch.
        if self._seeded_epoch == trainer.current_epoch:
            return
        self._seeded_epoch = trainer.current_epoch
        restored, self._restored = self._restored, None
        if restored is not None and restored["epoch"] == trainer.current_epoch:
            _set_rng_states(restored["rng"])  # resumed mid-epoch: the epoch's random stream goes on
            return
        epoch_seed = (self.seed * 1_000_003 + trainer.current_epoch) % 2**32
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._seeded_epoch, "rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict if "rng" in state_dict else None


def _rng_states() -> dict[str, Any]:
    """The generators' states as tensors and plain values (checkpoints are read with ``weights_only=True``)."""
    state: Any = np.random.get_state()  # the legacy tuple form: (name, keys, pos, has_gauss, cached)
    name, keys, pos, has_gauss, cached = state
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class BestScore(Callback):
    """Tracks the best value of the monitored metric and its epoch (kept in checkpoints, so resume keeps it).

    Under a spawning strategy (``ddp_spawn``, ``trainer=ddp_cpu``) the hooks run in spawned processes, on copies of
    this callback, and the main process's trainer never runs a loop. Lightning sends ``trainer.callback_metrics``
    back to the main process, so the best value and the position where fit ended travel there; :meth:`record`
    (called in the main process after ``fit``) reads them, and the test run's ranks (spawned from the main process)
    log at that position, as a single process does.
    """

    def __init__(self, monitor: str, mode: str = "max"):
        if mode not in ("min", "max"):
            raise ConfigError(f"monitor_mode={mode!r} must be 'min' or 'max'.")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._fit_end: tuple[int, int] | None = None  # (epoch, step) carried from spawned ranks

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        carried: dict[str, Any] = {
            "fit/epoch": trainer.current_epoch,
            "fit/step": trainer.fit_loop.epoch_loop._batches_that_stepped,
        }
        if self.best is not None:
            carried.update({f"best/{self.monitor}": self.best, "best_epoch": self.best_epoch})
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in carried.items()})

    def record(self, trainer: pl.Trainer) -> dict[str, Any]:
        """``best/<monitor>`` and ``best_epoch`` for metrics.json, from this process or the spawned ones."""
        carried = trainer.callback_metrics
        if self.best is None and f"best/{self.monitor}" in carried:  # fit ran in spawned processes
            self.best = float(carried[f"best/{self.monitor}"])
            self.best_epoch = int(carried["best_epoch"])
            self._fit_end = int(carried["fit/epoch"]), int(carried["fit/step"])
        return {f"best/{self.monitor}": self.best, "best_epoch": self.best_epoch}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._fit_end is not None
        ):  # a spawned test rank: the fit loop's end position, for the test's log row
            trainer.fit_loop.epoch_progress.current.completed = self._fit_end[0]
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._fit_end[1]

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]


STEP_LOSS = "train/loss_step"


class StepLoss:
    """Adds the logged training loss to a progress bar's values, read back to the host once per logged value.

    ftlab logs ``train/loss_step`` without ``prog_bar`` (every ``log_every_n_steps``): Lightning converts every
    progress-bar value to a Python number after every step, logged then or not, and on a GPU each conversion waits
    for the device. The bars here take the value from ``callback_metrics`` (still a tensor) and convert a new one
    once."""

    _step_loss: tuple[torch.Tensor, float] | None = None

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        value = trainer.callback_metrics.get(STEP_LOSS)
        if isinstance(value, torch.Tensor):
            if self._step_loss is None or self._step_loss[0] is not value:
                self._step_loss = (value, float(value))
            metrics = {STEP_LOSS: self._step_loss[1], **metrics}
        return metrics


class RichBar(StepLoss, RichProgressBar):
    """Lightning's rich bar with the step loss (:class:`StepLoss`)."""


class TQDMBar(StepLoss, TQDMProgressBar):
    """Lightning's tqdm bar with the step loss (:class:`StepLoss`)."""


class LogProgress(StepLoss, ProgressBar):
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
        metrics = {
            k: v for k, v in self.get_metrics(trainer, trainer.lightning_module).items() if k != "v_num"
        }
        shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        log.info("%s %s (%.0f s)", prefix, shown, time.perf_counter() - self._start)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":  # validate() alone (a zero-shot run): no training epoch set the clock
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
        return RichBar()
    if kind == "tqdm":
        return TQDMBar()
    if kind == "log":
        return LogProgress(every_n_steps)
    raise ConfigError(f"callbacks.progress_bar.kind={kind!r} is not one of auto, rich, tqdm, log.")
