"""Seeded, stratified splits and subsets shared by the text and image data modules.

All functions take label arrays and return sorted integer indices, so they work on any table or array. Stratifying
falls back to a plain random split (with a log line) when some class is too small to be split, or for regression.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.model_selection import train_test_split

from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)


def _stratify(labels: np.ndarray, n_split: int) -> np.ndarray | None:
    if labels.dtype.kind == "f":
        return None
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2 or n_split < len(counts) or len(labels) - n_split < len(counts):
        log.warning("Some classes are too small to stratify; splitting without stratification.")
        return None
    return labels


def split_off(labels: np.ndarray, fraction: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held_out) with ``fraction`` held out, stratified by label."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"{key}={fraction} must be between 0 and 1 (exclusive).")
    index = np.arange(len(labels))
    n_split = max(1, round(fraction * len(labels)))
    if n_split >= len(labels):
        raise ConfigError(f"{key}={fraction} leaves no examples out of {len(labels)}; lower it.")
    rest, held = train_test_split(
        index, test_size=n_split, random_state=seed, stratify=_stratify(labels, n_split)
    )
    return np.sort(rest), np.sort(held)


def subsample(
    labels: np.ndarray, max_examples: int, seed: int, key: str = "data.max_train_examples"
) -> np.ndarray:
    """At most ``max_examples`` indices, stratified; all of them if there are fewer."""
    if max_examples <= 0:
        raise ConfigError(f"{key}={max_examples} must be positive (or null for all).")
    if max_examples >= len(labels):
        return np.arange(len(labels))
    _, keep = split_off(labels, max_examples / len(labels), seed, key)
    return keep


def few_shot(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` random indices of every class (all of a class that has fewer, with a warning)."""
    if per_class <= 0:
        raise ConfigError(f"data.examples_per_class={per_class} must be positive (or null for all).")
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        if len(members) < per_class:
            log.warning(
                "Class %s has only %d examples (< examples_per_class=%d).", value, len(members), per_class
            )
        chosen.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def split_train(
    labels: np.ndarray,
    missing: set[str],
    val_fraction: float,
    test_fraction: float,
    examples_per_class: int | None,
    max_train_examples: int | None,
    seed: int,
    split_seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Indices into the source's training split: the held-out splits in ``missing``, then the (subset) train split.

    Fractions are of the whole training source, not of what the previous split left. ``labels`` is what to
    stratify on (class labels; regression targets are not stratified). ``split_seed`` (default ``seed``) seeds the
    held-out splits, ``seed`` the training subsets: one split, several training draws.
    """
    holdout_seed = seed if split_seed is None else split_seed
    total = len(labels)
    index = np.arange(total)
    splits: dict[str, np.ndarray] = {}
    for split, fraction in (("test", test_fraction), ("validation", val_fraction)):
        if split in missing:
            key = "data.test_fraction" if split == "test" else "data.val_fraction"
            rest, held = split_off(labels[index], fraction * total / len(index), holdout_seed, key)
            splits[split], index = index[held], index[rest]
    if examples_per_class is not None:
        index = index[few_shot(labels[index], examples_per_class, seed)]
    if max_train_examples is not None:
        index = index[subsample(labels[index], max_train_examples, seed)]
    splits["train"] = index
    return splits
