"""A callback that sends this process a real signal in the middle of an epoch: for preemption tests."""

import os
import signal

import pytorch_lightning as pl


class SignalInEpoch(pl.Callback):
    """Sends ``signal_name`` to its own process at the start of training batch ``batch`` of ``epoch``."""

    def __init__(self, epoch: int, batch: int, signal_name: str = "SIGUSR1"):
        self.epoch, self.batch, self.signum = epoch, batch, getattr(signal, signal_name)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)
