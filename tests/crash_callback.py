"""A callback that interrupts a run (as Ctrl-C would) in the middle of an epoch: for resume tests."""

import pytorch_lightning as pl


class CrashInEpoch(pl.Callback):
    """Interrupts after the third training batch of ``epoch``; the last checkpoint is from the epoch before."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        if (
            trainer.current_epoch == self.epoch
            and trainer.fit_loop.epoch_loop.batch_progress.current.completed >= 3
        ):
            raise KeyboardInterrupt(f"simulated crash in epoch {self.epoch}")
