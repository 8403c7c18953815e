"""A Lightning callback for fault injection (scripts/fault_injection.py): SIGKILL while a checkpoint is saved.

``FTLAB_FAULT=checkpoint_epoch<E>_save<N>`` kills the process in the N-th checkpoint save of epoch E (the best and
the last checkpoint are two saves), before that file is written. Without the variable it does nothing, so the
resumed run, which composes the same config, runs to the end.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from ftlab.utils.safe_files import fault_point


class KillAtSave(pl.Callback):
    def __init__(self) -> None:
        self.saves: dict[int, int] = {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        epoch = trainer.current_epoch
        self.saves[epoch] = self.saves.get(epoch, 0) + 1
        fault_point(f"checkpoint_epoch{epoch}_save{self.saves[epoch]}")
