"""Label names <-> ids, built from the training split and checked on the others.

The map is saved next to the run (``labels.json``) and inside checkpoints, so evaluation and prediction give the
same names in the same order as training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ftlab.utils.errors import DataError
from ftlab.utils.safe_files import write_json

TASKS = ("classification", "regression", "multilabel")


def _name(value: object) -> str:
    # 3.0 read from a CSV column with a missing value is the label 3, not "3.0"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


class LabelMap:
    """Ordered label names; ids are positions. ``names`` is ``None`` for regression.

    ``task=multilabel``: values are label sets (lists of names, see :mod:`ftlab.data.multilabel`) and ``encode``
    gives multi-hot float rows (N, C).
    """

    def __init__(self, names: Sequence[str] | None, task: str = "classification"):
        self.task = task
        self.names = list(names) if names is not None else None
        self._ids = {name: i for i, name in enumerate(self.names or [])}

    @classmethod
    def from_train(
        cls, values: Sequence[object], task: str, keep: Sequence[object] | None = None
    ) -> LabelMap:
        """Names sorted as numbers when they all are, else as strings; ``keep`` fixes the set and order."""
        if task == "regression":
            return cls(None, task)
        if keep is not None:
            return cls([_name(v) for v in keep], task)
        if task == "multilabel":  # values are label sets
            unique = {_name(v) for names in values for v in names}  # type: ignore[attr-defined]
        else:
            unique = {_name(v) for v in values}
        try:
            names = sorted(unique, key=float)
        except ValueError:
            names = sorted(unique)
        return cls(names, task)

    @property
    def num_classes(self) -> int:
        return 1 if self.names is None else len(self.names)

    def encode(self, values: Sequence[object], split: str, key: str) -> np.ndarray:
        """Ids of ``values``; a label the training split never had is an error naming it."""
        if self.names is None:
            try:
                return np.asarray(values, dtype=np.float32)
            except (TypeError, ValueError) as err:
                raise DataError(
                    f"{key}: task=regression needs numeric labels in the {split} data ({err})."
                ) from err
        if self.task == "multilabel":
            return self._multi_hot(values, split, key)
        names = [_name(v) for v in values]
        unseen = sorted({n for n in names if n not in self._ids})
        if unseen:
            raise DataError(
                f"The {split} data has label(s) {unseen[:10]} in {key} that the training data does not have "
                f"(training labels: {self.names[:20]}). Fix the labels, or choose the kept labels with data.labels."
            )
        return np.asarray([self._ids[n] for n in names], dtype=np.int64)

    def _multi_hot(self, sets: Sequence[object], split: str, key: str) -> np.ndarray:
        rows = np.zeros((len(sets), self.num_classes), dtype=np.float32)
        for row, names in enumerate(sets):
            ids = [self._ids.get(_name(n), -1) for n in names]  # type: ignore[attr-defined]
            if -1 in ids:
                unseen = sorted(_name(n) for n, i in zip(names, ids, strict=True) if i < 0)  # type: ignore[call-overload]
                raise DataError(
                    f"The {split} data has label(s) {unseen[:10]} in {key} that the training data does not have "
                    f"(training labels: {(self.names or [])[:20]}). Fix the labels, or give the label set with "
                    "data.labels=[...]."
                )
            rows[row, ids] = 1.0
        return rows

    def to_dict(self) -> dict:
        return {"task": self.task, "names": self.names}

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> LabelMap:
        data = json.loads(path.read_text())
        return cls(data["names"], data["task"])
