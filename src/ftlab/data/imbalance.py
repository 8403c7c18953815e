"""Class imbalance on the data side: cutting classes down (to build an imbalanced set) and a class-balanced sampler.

``data.class_fraction`` keeps a seeded fraction of some classes of a source's training table, before validation
and test are held out of it, so the held-out splits share the imbalance (as a real imbalanced set would).
``data.sampler=balanced`` draws training examples with replacement, each class equally often on average.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ftlab.utils.errors import ConfigError, DataError

SAMPLERS = ("none", "balanced")


def check_sampler(sampler: str, task: str) -> None:
    """``data.sampler`` is known and applies to the task (balancing needs one class per example)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler={sampler!r} is not one of {', '.join(SAMPLERS)}.")
    if sampler == "balanced" and task != "classification":
        raise ConfigError(
            f"data.sampler=balanced draws classes equally and needs data.task=classification (got {task}); "
            "for multi-label data weight the labels instead (module.pos_weight=balanced)."
        )


def check_class_fraction(fractions: Mapping[str, float] | None, task: str) -> None:
    """Every fraction lies in (0, 1]; only classification has classes to cut."""
    if not fractions:
        return
    if task != "classification":
        raise ConfigError(f"data.class_fraction applies to data.task=classification, not {task}.")
    for name, value in fractions.items():
        if not 0.0 < float(value) <= 1.0:
            raise ConfigError(
                f"data.class_fraction.{name}={value} must be in (0, 1]: the share of that class's examples to keep."
            )


def cut_classes(labels: np.ndarray, fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Sorted indices of ``labels`` that keep ``fractions[c]`` of each named class ``c`` (seeded), all of the others.

    Args:
        labels: class names (compared as strings, so ``{1: 0.1}`` and ``{"1": 0.1}`` mean the same).
        fractions: class name -> share to keep (at least one example is kept).
        seed: the random choice of the examples kept.
    """
    names = np.asarray([str(v) for v in labels])
    unknown = sorted(str(c) for c in fractions if str(c) not in set(names.tolist()))
    if unknown:
        raise DataError(
            f"data.class_fraction names class(es) {unknown} that the training data does not have; its classes "
            f"are {sorted(set(names.tolist()))[:20]}."
        )
    rng = np.random.default_rng(seed)
    keep = np.ones(len(names), dtype=bool)
    for name, fraction in fractions.items():
        members = np.flatnonzero(names == str(name))
        n_keep = max(1, round(float(fraction) * len(members)))
        dropped = rng.permutation(members)[n_keep:]
        keep[dropped] = False
    return np.flatnonzero(keep)


class BalancedClassSampler(DistributedSampler):
    """Training indices drawn with replacement, each with probability ``1 / (C * count(its class))``: every class
    is drawn equally often on average. An epoch has as many draws as the split has examples.

    The draws are a function of (seed, epoch) only (like :class:`~ftlab.data.samplers.SeededShuffleSampler`), so a
    resumed run draws what the uninterrupted run would. It subclasses ``DistributedSampler`` so that Lightning
    leaves it as it is under DDP; the data module passes ``num_replicas`` and ``rank``, and each rank takes every
    ``num_replicas``-th draw of the one global sequence (padded so every rank gets as many).
    """

    def __init__(self, labels: np.ndarray, seed: int, epoch: int = 0, num_replicas: int = 1, rank: int = 0):
        # no super().__init__(): it needs a dataset and an initialised process group; set what it would set
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError("data.sampler=balanced needs one class id per training example.")
        counts = np.bincount(labels)
        present = counts > 0
        # classes absent from the split get no draws (their weight would be infinite)
        per_class = np.where(present, 1.0 / (present.sum() * np.maximum(counts, 1)), 0.0)
        self.weights = torch.as_tensor(per_class[labels], dtype=torch.float64)
        self.seed, self.epoch = seed, epoch
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(len(labels) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last = True, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draws(self) -> torch.Tensor:
        """The epoch's global sequence of ``total_size`` indices (all ranks together)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        yield from self.draws()[self.rank :: self.num_replicas].tolist()

    def __len__(self) -> int:
        return self.num_samples
