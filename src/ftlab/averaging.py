"""Weight averaging (``callbacks=ema``, ``callbacks=swa``) through Lightning 2.6's ``WeightAveraging`` callbacks.

What Lightning's callback does, and ftlab relies on: the averaged copy (``torch.optim.swa_utils.AveragedModel``,
parameters and buffers) is updated after optimizer steps; validation runs on the averaged weights (swapped in at
validation start, back at its end); every checkpoint's ``state_dict`` holds the averaged weights, the training
weights go to ``current_model_state`` and the averager's counter to ``averaging_state``; resuming ``fit`` loads the
three back, so training and averaging continue exactly; at the end of ``fit`` the model holds the averaged weights.
So ``best.ckpt`` is chosen on, and holds, the averaged weights, and ``ftlab-eval``/``ftlab-export``/
``ftlab-predict``, which load ``state_dict``, use them.

What ftlab changes (:class:`AveragingFixes`):

- ``trainer.test(ckpt_path="best")`` after ``fit`` calls the callback's ``on_load_checkpoint`` too, and Lightning's
  version then loads ``current_model_state`` (the training weights) into the model: test would not run on the
  averaged weights. Outside ``fit`` the checkpoint's ``state_dict`` is kept.
- Before the first update (SWA starting at a later epoch) the averaged copy still holds the initial weights:
  validation, checkpoints and the end of training use the training weights until then.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

from ftlab.utils.errors import ConfigError


class AveragingFixes(WeightAveraging):
    """Test on the averaged weights, and use the training weights until the first update (see the module doc)."""

    def _averaging(self) -> bool:
        model = self._average_model
        return model is not None and int(model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swapped = (
            self._averaging()
        )  # n_averaged does not change during validation: swap back if swapped
        if self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(self, "_swapped", False):
            self._swap_models(pl_module)
            self._swapped = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._averaging():
            self._copy_average_to_current(pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._averaging():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # else: the training weights alone; a resumed run starts the average from them (n_averaged = 0)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING or self._average_model is None:
            return  # test/validate/predict: state_dict holds the averaged weights, the ones to evaluate
        if "current_model_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        else:  # saved before the first update: the average starts over from the training weights
            self._average_model.module.load_state_dict(checkpoint["state_dict"], strict=False)


class EMAUpdate:
    """``decay * average + (1 - decay) * current``: torch's ``get_ema_avg_fn`` as a picklable object (its closure is
    not, and ``trainer=ddp_cpu``'s ``ddp_spawn`` pickles the callbacks into the worker processes)."""

    def __init__(self, decay: float):
        self.decay = decay

    @torch.no_grad()
    def __call__(self, average: torch.Tensor, current: torch.Tensor, num_averaged: Any) -> torch.Tensor:
        return self.decay * average + (1 - self.decay) * current


class EMA(AveragingFixes, EMAWeightAveraging):
    """Exponential moving average of the weights (Lightning's ``EMAWeightAveraging``, with ftlab's fixes).

    Args:
        decay: the EMA decay per update (0.99: a horizon of ~100 steps, for fine-tuning runs of hundreds of steps).
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch: when to update (Lightning's).
        device: where the averaged copy lives (``cpu`` to spare GPU memory); ``null``: with the model.
        use_buffers: also average buffers (BatchNorm statistics).
    """

    def __init__(
        self,
        decay: float = 0.99,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: str | None = None,
        use_buffers: bool = True,
    ):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay} must be in (0, 1), e.g. 0.99 or 0.999.")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
        )
        self._kwargs["avg_fn"] = EMAUpdate(decay)  # the same update, picklable (Lightning stores a closure)


class SWA(AveragingFixes):
    """Stochastic weight averaging (Izmailov et al. 2018): the equal average of the weights after every optimizer
    step from epoch ``start_epoch`` on (Lightning's ``WeightAveraging`` with its default average).

    Lightning's older ``StochasticWeightAveraging`` callback is not used: it validates and checkpoints the training
    weights until the end of fit, so the best checkpoint would not hold averaged weights.

    Args:
        start_epoch: the first epoch whose steps are averaged (0-based); before it validation sees the training
            weights.
        device, use_buffers: as for :class:`EMA`.
    """

    def __init__(self, start_epoch: int = 0, device: str | None = None, use_buffers: bool = True):
        if start_epoch < 0:
            raise ConfigError(f"callbacks.swa.start_epoch={start_epoch} must be >= 0.")
        super().__init__(device=device, use_buffers=use_buffers)
        self.start_epoch = start_epoch
        self._epoch = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._epoch = (
            trainer.current_epoch
        )  # Lightning skips the epoch-start hook of a resumed run's first epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self._epoch >= self.start_epoch
