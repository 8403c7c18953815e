"""Random draws that are a function of (seed, epoch, example index) only, so a resumed run augments exactly as the
uninterrupted one, whatever the loader workers, their order, or the global random state.

The epoch reaches the dataset through the indices themselves: :func:`tag_epochs` wraps the training sampler so
that it yields ``epoch * size + index`` (``size``: the dataset's length), and the dataset splits a tagged index
back with :func:`untag`. A dataset attribute would not do: persistent loader workers keep the copy of the dataset
they were started with, while the sampler runs in the main process, where Lightning calls ``set_epoch``. A plain
index (``< size``: evaluation, or any caller that indexes the dataset directly) reads as epoch 0.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch.utils.data import Dataset, DistributedSampler, Sampler


def example_rng(seed: int, epoch: int, index: int, stream: str = "") -> random.Random:
    """A ``random.Random`` for one (seed, epoch, index); ``stream`` separates independent uses."""
    # a str seed is hashed with SHA-512 by random.Random: the same in every process (no PYTHONHASHSEED)
    return random.Random(f"ftlab/{stream}/{seed}/{epoch}/{index}")


def batch_seed(seed: int, epoch: int, indices: Iterable[int], stream: str = "") -> int:
    """A 63-bit torch seed for one batch: a function of (seed, epoch, the batch's example indices)."""
    text = f"ftlab/{stream}/{seed}/{epoch}/" + ",".join(str(int(i)) for i in indices)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def untag(tagged: int, size: int) -> tuple[int, int]:
    """``(epoch, index)`` of an index yielded by a :func:`tag_epochs` sampler over a dataset of ``size``."""
    epoch, index = divmod(int(tagged), size)
    return epoch, index


class EpochTagged(Sampler[int]):
    """``sampler``'s indices as ``epoch * size + index``; ``set_epoch`` is passed on.

    ``epoch_of``: the trainer's current epoch (the data module's). Under DDP Lightning wraps a sampler that does not
    shard by rank in a ``DistributedSamplerWrapper`` and calls ``set_epoch`` on the wrapper only, so this one would
    keep the epoch it was built with; the later of the two is used.
    """

    def __init__(self, sampler: Any, size: int, epoch: int = 0, epoch_of: Callable[[], int] | None = None):
        self.sampler, self.size, self.epoch_of = sampler, size, epoch_of
        self.epoch = getattr(sampler, "epoch", epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch = max(self.epoch, self.epoch_of()) if self.epoch_of is not None else self.epoch
        offset = epoch * self.size
        for index in self.sampler:
            yield offset + int(index)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochTaggedDistributed(EpochTagged, DistributedSampler):
    """An :class:`EpochTagged` ``DistributedSampler`` (one that shards by rank itself) stays one, so that Lightning
    does not wrap it in a sampler that shards it again (see ``ftlab.preemption._SkipDistributed``)."""

    def __init__(
        self,
        sampler: DistributedSampler,
        size: int,
        epoch: int = 0,
        epoch_of: Callable[[], int] | None = None,
    ):
        EpochTagged.__init__(
            self, sampler, size, epoch, epoch_of
        )  # no DistributedSampler.__init__: no process group
        self.num_replicas, self.rank = sampler.num_replicas, sampler.rank
        self.num_samples, self.total_size = sampler.num_samples, sampler.total_size
        self.shuffle, self.drop_last, self.seed = (
            sampler.shuffle,
            sampler.drop_last,
            getattr(sampler, "seed", 0),
        )


def tag_epochs(sampler: Any, size: int, epoch_of: Callable[[], int] | None = None) -> EpochTagged:
    """Wrap a training sampler so that its indices carry the epoch (see the module docstring); ``epoch_of``: the
    trainer's current epoch."""
    if isinstance(sampler, DistributedSampler):
        return EpochTaggedDistributed(sampler, size, epoch_of=epoch_of)
    return EpochTagged(sampler, size, epoch_of=epoch_of)


class EpochIndexed(Dataset):
    """``dataset`` read with tagged indices; each item also carries its ``epoch`` and ``index`` (for a collator
    that draws per batch, :class:`~ftlab.augment.mix.MixCollator`)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    @property
    def labels(self) -> Any:  # class counts and the balanced sampler read them
        return self.dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged: int) -> dict[str, Any]:
        epoch, index = untag(tagged, len(self.dataset))
        return {**self.dataset[index], "epoch": epoch, "index": index}
