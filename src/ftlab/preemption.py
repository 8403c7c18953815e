"""Preemption: on SIGUSR1/SIGUSR2/SIGTERM (SLURM's warning signals) save the exact position, stop, continue later.

The signal only sets a flag. At the end of the current training batch :class:`Preemption` writes
``checkpoints/last.ckpt`` (Lightning saves the loops' mid-epoch progress; :class:`ftlab.callbacks.EpochSeed` adds the
random generators' states) and raises :class:`Preempted`; the job records ``status.json`` ``preempted`` and exits
with :data:`EXIT_PREEMPTED` (under SLURM after ``scontrol requeue``; ``ftlab.runs.jobs``). ``resume=<run folder>``
(or the requeued sweep job, by itself) continues from the next batch: :func:`resume_sampler` makes the training
sampler, a function of (seed, epoch), skip the batches the interrupted epoch had consumed, so the continued run
ends with the weights and metrics of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DistributedSampler, Sampler

from ftlab.runs import folder, jobs
from ftlab.runs.jobs import EXIT_PREEMPTED, Preempted

__all__ = ["EXIT_PREEMPTED", "Preempted", "Preemption", "resume_sampler"]

log = logging.getLogger(__name__)

SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")  # USR2: submitit's warning signal (hydra/launcher=slurm)


class Preemption(Callback):
    """Turn SIGUSR1/SIGTERM into a checkpoint at the next batch boundary and a :class:`Preempted` stop.

    Args:
        signals: the signal names to handle (SLURM sends SIGUSR1 ``--signal`` seconds before the end, SIGTERM
            when it cancels or preempts a job; submitit, behind hydra/launcher=slurm, asks for SIGUSR2).
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = SIGNALS):
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # only a flag: the checkpoint is written between batches, never mid-step; a handler that was there before
        # (submitit's, which requeues the job) is called once the position is saved
        self.received = signum

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before Lightning's signal connector, which then keeps this SIGUSR1 handler (no hpc_ckpt of its own) and
        # calls this SIGTERM handler after its own
        if stage != "fit" or not _main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hooks after an exception

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if restart_cut_epoch(trainer):
            log.info(
                "Resumed mid-epoch: epoch %d continues after its consumed batches.", trainer.current_epoch
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank stops after the same batch, even if one got the signal late
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal to another rank"
        run_dir = trainer.default_root_dir
        trainer.save_checkpoint(os.path.join(run_dir, folder.LAST_CKPT))  # resume after this batch
        log.warning(
            "%s: saved the position (epoch %d, batch %d) to %s; stopping.",
            name,
            trainer.current_epoch,
            trainer.fit_loop.epoch_loop.batch_progress.current.processed,  # type: ignore[attr-defined]
            folder.LAST_CKPT,
        )
        message = f"{name} received; continue with resume={run_dir}"
        previous = self._previous.get(self.received) if self.received is not None else None
        if callable(previous):  # e.g. submitit requeues its job (and exits): record the preemption first
            jobs.write_status(Path(run_dir), "preempted", error=message)
            previous(self.received, None)
        raise Preempted(message)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def consumed_batches(trainer: pl.Trainer | None, num_examples: int, batch_size: int) -> int:
    """Training batches the restored epoch had already consumed (0 unless resuming mid-epoch)."""
    if trainer is None or not trainer.fit_loop.restarting:
        return 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]
    return done if 0 < done * batch_size < num_examples else 0  # a finished epoch starts the next one whole


class _Skip(Sampler[int]):
    """``sampler``'s indices, without those a mid-epoch checkpoint's epoch had consumed on the first pass after
    the restore. Decided when iteration starts, not when the loader is built: Lightning builds the training loader
    (to size step schedules) before it restores the loops' progress."""

    def __init__(self, sampler: Any, trainer: pl.Trainer, batch_size: int, per_rank: int):
        self.sampler, self.trainer, self.batch_size, self.per_rank = sampler, trainer, batch_size, per_rank
        self._skipped = False

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip(self) -> int:
        """Indices to skip now (once per restore)."""
        if self._skipped:
            return 0
        batches = consumed_batches(self.trainer, len(self.sampler), self.batch_size)
        self._skipped = batches > 0
        return batches * self.batch_size * self.per_rank

    def __iter__(self) -> Iterator[int]:
        skip = self.skip()
        for i, index in enumerate(self.sampler):
            if i >= skip:
                yield index

    def __len__(self) -> int:
        return len(self.sampler)


class _SkipDistributed(_Skip, DistributedSampler):
    """A :class:`_Skip` of a ``DistributedSampler`` (one that shards by rank itself), still one for Lightning,
    which would otherwise wrap it in a sampler that re-shards it."""

    def __init__(self, sampler: DistributedSampler, trainer: pl.Trainer, batch_size: int):
        _Skip.__init__(
            self, sampler, trainer, batch_size, 1
        )  # no DistributedSampler.__init__: no process group
        self.num_replicas, self.rank, self.epoch = sampler.num_replicas, sampler.rank, sampler.epoch
        self.num_samples, self.total_size = sampler.num_samples, sampler.total_size
        self.shuffle, self.drop_last, self.seed = (
            sampler.shuffle,
            sampler.drop_last,
            getattr(sampler, "seed", 0),
        )


def resume_sampler(sampler: Any, trainer: pl.Trainer | None, batch_size: int) -> Any:
    """The training sampler, able to skip what a mid-epoch checkpoint's epoch had consumed.

    Exact for one process, and under DDP for samplers that shard by rank themselves (``DistributedSampler``s:
    the text buckets, the balanced sampler); a plain sampler that Lightning shards afterwards resumes the epoch
    approximately (the skipped examples are counted before sharding).
    """
    if trainer is None:
        return sampler
    if isinstance(sampler, DistributedSampler):
        return _SkipDistributed(sampler, trainer, batch_size)
    return _Skip(sampler, trainer, batch_size, trainer.world_size)


def restart_cut_epoch(trainer: pl.Trainer) -> bool:
    """After a mid-epoch restore, start the training iterator again, at the restored epoch and position.

    Lightning's fetcher began iterating the training loader when it was built, before the restore (the epoch and
    position were not known yet); a resumed epoch does not start a new iterator. Returns whether it restarted."""
    loader = trainer.fit_loop._combined_loader
    fetcher = trainer.fit_loop._data_fetcher
    if loader is None or fetcher is None:
        return False
    samplers = [getattr(dl, "sampler", None) for dl in loader.flattened]
    skips = [s for s in samplers if isinstance(s, _Skip)]
    if not skips or not consumed_batches(trainer, len(skips[0]), skips[0].batch_size):
        return False
    # Lightning warns that a loader without state_dict restarts the cut epoch from its start; this one does not
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    for sampler in skips:
        sampler.set_epoch(trainer.current_epoch)
    iter(fetcher)  # a new iterator: the samplers skip the consumed batches now
    return True


def requeue_if_slurm() -> bool:
    """``scontrol requeue`` this SLURM job (array task) when running under SLURM; whether it was requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("Could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
    return done.returncode == 0
