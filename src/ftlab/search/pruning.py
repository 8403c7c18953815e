"""The Lightning callback that feeds an Optuna trial the monitored metric and stops the run when it is pruned.

Not optuna-integration's ``PyTorchLightningPruningCallback``: version 5.0 subclasses the ``lightning`` package's
``Callback`` (``lightning.pytorch``), which a ``pytorch_lightning.Trainer`` does not accept, and it reports at
``step=epoch``, so a second validation in one epoch (``val_check_interval < 1``) would be dropped. Here the step is
the number of validations so far (kept in checkpoints, so a resumed job counts on).
"""

from __future__ import annotations

from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from optuna.trial import Trial, TrialState
from pytorch_lightning.callbacks import Callback

from ftlab.search.study import tell


class Pruned(optuna.TrialPruned):
    """The job's trial was pruned; ``record`` goes into ``status.json``."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(
            f"trial {record['trial']} pruned at validation {record['step']} (epoch {record['epoch']}): "
            f"{record['monitor']}={record['value']:.6g}"
        )
        self.record = record


class OptunaPruning(Callback):
    """Report ``monitor`` to ``trial`` after every validation; end the run at once when the pruner says so.

    In one process the run stops inside the validation hook (no further step, no test). Under a multi-process
    strategy rank 0 decides, every rank stops at the end of that validation, and :meth:`check` (called after
    ``fit``, in the launching process for ``ddp_spawn``) raises.
    """

    def __init__(self, trial: Trial, monitor: str):
        self.trial, self.monitor = trial, monitor
        self.validations = 0
        self.record: dict[str, Any] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.validations += 1
        value = float(trainer.callback_metrics[self.monitor])
        prune = False
        if trainer.is_global_zero:
            self.trial.report(value, step=self.validations)
            prune = self.trial.should_prune()
        if not trainer.strategy.broadcast(prune):
            return
        self.record = {
            "trial": self.trial.number,
            "step": self.validations,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "monitor": self.monitor,
            "value": value,
        }
        if trainer.world_size > 1:
            trainer.should_stop = True
            return
        self._raise(rank_zero=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.record is not None
        ):  # carried to the launching process of a spawning strategy, as BestScore does
            trainer.callback_metrics.update({f"optuna/{k}": torch.tensor(float(v)) for k, v in self.record.items()
                                             if isinstance(v, int | float)})  # fmt: skip

    def check(self, trainer: pl.Trainer) -> None:
        """After ``fit``: raise :class:`Pruned` if this trial was pruned here or in spawned ranks."""
        carried = trainer.callback_metrics
        if self.record is None and "optuna/step" in carried:
            self.record = {
                k: float(carried[f"optuna/{k}"]) for k in ("step", "epoch", "global_step", "value")
            }
            self.record.update(trial=self.trial.number, monitor=self.monitor)
            for k in ("step", "epoch", "global_step"):
                self.record[k] = int(self.record[k])
        if self.record is not None:
            self._raise(rank_zero=trainer.is_global_zero)

    def _raise(self, rank_zero: bool) -> None:
        assert self.record is not None
        if rank_zero:  # one process tells the study
            tell(self.trial.study, self.trial, state=TrialState.PRUNED)
        raise Pruned(self.record)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
