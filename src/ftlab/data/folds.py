"""k-fold cross-validation splits: ``data.folds=k data.fold=i`` (stratified, grouped by ``data.group_column``).

The test split is held out once, from the seed alone, so it is the same examples for every fold; the rest is cut
into ``k`` folds (scikit-learn's ``StratifiedKFold``, ``GroupKFold`` or ``StratifiedGroupKFold``, shuffled with the
seed), fold ``i`` validates and the other folds train. Every training example is validated by exactly one fold, so
the folds' validation predictions together are out-of-fold predictions for the whole pool
(:mod:`ftlab.crossval`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from ftlab.data import sampling
from ftlab.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def check_folds(folds: int | None, fold: int, group_column: str | None) -> None:
    """Check ``data.folds``/``data.fold``/``data.group_column`` at construction."""
    if folds is None:
        if group_column is not None:
            raise ConfigError(
                f"data.group_column={group_column!r} groups the cross-validation folds, but data.folds is null: "
                "set data.folds=<k> (e.g. 5) too, or remove data.group_column."
            )
        return
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ConfigError(f"data.folds={folds!r} must be a whole number of at least 2 (or null: no folds).")
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < folds:
        raise ConfigError(
            f"data.fold={fold!r} must be one of 0..{folds - 1} with data.folds={folds}; run every fold with "
            f"-m data.fold='range({folds})'."
        )


def _splitter(folds: int, seed: int, stratify: bool, grouped: bool) -> object:
    if grouped:
        if stratify:
            return StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    if stratify:
        return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return KFold(n_splits=folds, shuffle=True, random_state=seed)


def group_values(table: pd.DataFrame, column: str) -> np.ndarray:
    """The ``data.group_column`` values of a table (rows of one group share a fold)."""
    if column not in table.columns:
        raise DataError(
            f"data.group_column={column!r} is not a column of the training table (columns: "
            f"{', '.join(map(str, table.columns))}); name the column that identifies groups (patient, author, ...)."
        )
    return table[column].astype(str).to_numpy()


def fold_indices(
    labels: np.ndarray,
    groups: np.ndarray | None,
    folds: int,
    fold: int,
    seed: int,
    test_fraction: float | None,
    examples_per_class: int | None = None,
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """Indices into the source's training split for ``train``, ``validation`` (fold ``fold`` of ``folds``) and,
    when ``test_fraction`` is given, ``test`` (held out first, the same for every fold; whole groups if grouped).

    ``examples_per_class`` / ``max_examples`` cut the pool that the folds share (train + validation), so the
    validation folds still cover it exactly once.
    """
    labels = np.asarray(labels)
    index = np.arange(len(labels))
    splits: dict[str, np.ndarray] = {}
    if test_fraction is not None:
        if groups is None:
            rest, held = sampling.split_off(labels, test_fraction, seed, "data.test_fraction")
        else:  # whole groups held out: the one fold of round(1 / test_fraction) that a group k-fold puts first
            parts = max(2, round(1 / test_fraction))
            rest, held = next(_splitter(parts, seed, False, True).split(index, labels, groups))  # type: ignore[attr-defined]
        splits["test"], index = np.sort(held), np.sort(rest)
    if examples_per_class is not None:
        index = index[sampling.few_shot(labels[index], examples_per_class, seed)]
    if max_examples is not None:
        index = index[sampling.subsample(labels[index], max_examples, seed)]
    pool_labels = labels[index]
    stratify = pool_labels.dtype.kind not in "fc" and np.unique(pool_labels).size > 1
    if stratify and np.unique(pool_labels, return_counts=True)[1].min() < folds:
        log.warning("Some class has fewer than data.folds=%d examples; folds are not stratified.", folds)
        stratify = False
    pool_groups = None if groups is None else np.asarray(groups)[index]
    if pool_groups is not None and np.unique(pool_groups).size < folds:
        raise DataError(
            f"data.group_column has {np.unique(pool_groups).size} distinct groups outside the test split, fewer "
            f"than data.folds={folds}: lower data.folds or use a column with more groups."
        )
    splitter = _splitter(folds, seed, stratify, pool_groups is not None)
    cuts = list(splitter.split(index, pool_labels, pool_groups))  # type: ignore[attr-defined]
    train, validation = cuts[fold]
    splits["train"], splits["validation"] = index[np.sort(train)], index[np.sort(validation)]
    return splits
