"""Samplers whose order is a function of (seed, epoch), so a resumed run sees the batches an uninterrupted run would.

Lightning calls ``set_epoch`` on a sampler that has it before every training epoch; the data module also starts the
sampler at the trainer's current epoch, which matters when a resumed run builds its loader.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
