"""Samplers whose order is a function of (seed, epoch), so a resumed run sees the batches an uninterrupted run would.

Lightning calls ``set_epoch`` on a sampler that has it before every training epoch; the data module also starts the
sampler at the trainer's current epoch, which matters when a resumed run builds its loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


class SeededShuffleSampler(Sampler[int]):
    """A random permutation of ``range(num_examples)`` drawn from ``seed`` and the epoch."""

    def __init__(self, num_examples: int, seed: int, epoch: int = 0):
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.num_examples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_examples


class LengthBucketSampler(DistributedSampler):
    """Shuffled batches of similar length: less padding per batch, the same examples per epoch.

    Each epoch: a seeded permutation of the examples, cut into pools of ``pool_batches`` batches; each pool sorted
    by length and cut into batches; the batches shuffled (seeded), the one short batch last. The order is a
    function of (seed, epoch) only, like :class:`SeededShuffleSampler`, so resume sees the same batches.

    Yields example indices (use it as a ``DataLoader`` *sampler* with the same ``batch_size``, not as a batch
    sampler): every ``batch_size`` consecutive indices are one bucket. It subclasses ``DistributedSampler`` on
    purpose: Lightning (``use_distributed_sampler=True``) wraps any other sampler in a ``DistributedSamplerWrapper``
    that re-shuffles the indices across positions and would break the buckets. Under DDP the data module passes
    ``num_replicas`` and ``rank``; then the sampler builds batches of ``batch_size * num_replicas`` similar-length
    examples and gives each rank its own ``batch_size`` slice of every one, so the ranks step through batches of
    similar shape together. The last short batch is padded by repeating examples so that every rank gets the
    same number (as ``DistributedSampler`` does); with one process every example comes exactly once.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        pool_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        # no super().__init__(): it needs a dataset and an initialised process group; set what it would set
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.epoch, self.pool_batches = batch_size, seed, epoch, pool_batches
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(len(self.lengths) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last = True, False

    def _global_batches(self) -> list[np.ndarray]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        width = self.batch_size * self.num_replicas
        pool = width * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + width] for i in range(0, len(chunk), width)]
        full = [b for b in batches if len(b) == width]
        short = [b for b in batches if len(b) < width]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if (
            short
        ):  # at most one pool is not a multiple of the batch: merge its remainders into the last batches
            rest = np.concatenate(short)
            rest = np.concatenate([rest, order[: (-len(rest)) % self.num_replicas]])  # equal share per rank
            shuffled.append(rest)
        return shuffled

    def __iter__(self) -> Iterator[int]:
        for batch in self._global_batches():
            share = len(batch) // self.num_replicas
            yield from batch[self.rank * share : (self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return self.num_samples
