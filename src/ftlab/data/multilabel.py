"""Multi-label data (``data.task=multilabel``): label sets read from a table, and the ``mnist_pairs`` image set.

A table gives each example's labels either in one column, as a JSON list (``["drama", "comedy"]``, or a real list
in JSONL/Parquet) or as names joined by ``data.label_separator`` (``drama|comedy``), or as several 0/1 columns
(``data.label_columns=[drama, comedy, ...]``). :class:`~ftlab.data.labels.LabelMap` turns the sets into multi-hot
float rows (N, C).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ftlab.utils.errors import ConfigError, DataError

Split = tuple[np.ndarray, np.ndarray]


def parse_label_sets(values: Sequence[object], separator: str, key: str) -> list[list[str]]:
    """Each value as a list of label names: a list/array as is, ``[...]`` as JSON, else split on ``separator``."""
    sets = []
    for value in values:
        if isinstance(value, (list, tuple, np.ndarray)):
            names = [str(v) for v in value]
        else:
            text = str(value).strip()
            if text.startswith("["):
                try:
                    parsed = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{key}: the label list {text[:60]!r} is not valid JSON ({err})."
                    ) from err
                names = [str(v) for v in parsed]
            else:
                names = [part.strip() for part in text.split(separator)] if text else []
        sets.append(sorted({name for name in names if name}))
    return sets


def sets_from_columns(frame: pd.DataFrame, columns: Sequence[str], split: str) -> list[list[str]]:
    """Label sets from 0/1 columns: an example has the label of every column that holds 1 in its row."""
    values = frame[list(columns)]
    bad = [c for c in columns if not values[c].isin([0, 1, True, False]).all()]
    if bad:
        shown = sorted(set(values[bad[0]].astype(str)) - {"0", "1", "True", "False"})[:5]
        raise DataError(
            f"data.label_columns: the {split} column {bad[0]!r} holds {shown}; each label column must hold 0 or 1."
        )
    on = values.to_numpy(dtype=bool)
    names = np.asarray([str(c) for c in columns])
    return [names[row].tolist() for row in on]


def check_multilabel_options(
    task: str, label_columns: Sequence[str] | None, separator: str, examples_per_class: int | None
) -> None:
    """Options that only mean something for one kind of task are refused for the others."""
    if label_columns is not None and task != "multilabel":
        raise ConfigError(
            f"data.label_columns={list(label_columns)} gives several 0/1 label columns, which is multi-label data: "
            "set data.task=multilabel (or use data.label_column for one label per example)."
        )
    if label_columns is not None and len(label_columns) < 2:
        raise ConfigError(f"data.label_columns={list(label_columns)} needs at least two columns.")
    if not separator:
        raise ConfigError("data.label_separator is empty: give the text between label names, e.g. '|'.")
    if task == "multilabel" and examples_per_class is not None:
        raise ConfigError(
            "data.examples_per_class picks examples per class, which multi-label data does not have; use "
            "data.max_train_examples instead."
        )


@functools.lru_cache(maxsize=1)
def load_mnist_pairs() -> dict[str, Split]:
    """2,500 images of two MNIST-5k digits side by side, labelled with the set of both digits.

    Deterministic (a fixed permutation, independent of the run's seed): the 5,000 digits are shuffled once and
    taken two by two, so every MNIST image appears in exactly one pair (no digit image is shared between the
    training and test splits). Each pair is pasted into a 56 x 56 canvas (two 28 x 28 digits side by side,
    vertically centred), so the square crop of the image transforms keeps both digits. About a tenth of the pairs
    show the same digit twice and have a single label.
    """
    from ftlab.data.image_sources import load_embedded

    images, labels = load_embedded("mnist5k")["train"]
    order = np.random.default_rng(0).permutation(len(images))
    left, right = order[0::2], order[1::2]
    canvas = np.zeros((len(left), 56, 56), dtype=np.uint8)
    canvas[:, 14:42, :28] = images[left]
    canvas[:, 14:42, 28:] = images[right]
    sets = np.empty(len(left), dtype=object)
    sets[:] = [sorted({str(a), str(b)}) for a, b in zip(labels[left], labels[right], strict=True)]
    return {"train": (canvas, sets)}


MULTILABEL_IMAGES = {"mnist_pairs": load_mnist_pairs}  # embedded multi-label image sets


def table_labels(
    frame: pd.DataFrame,
    task: str,
    label_column: str | None,
    label_columns: Sequence[str] | None,
    separator: str,
    split: str,
) -> list[object]:
    """A table's labels as :class:`~ftlab.data.labels.LabelMap` takes them: label sets for multi-label data (from
    ``label_columns`` or the parsed ``label_column``), the column's values otherwise."""
    if task != "multilabel":
        return frame[label_column].tolist()
    if label_columns:
        return list(sets_from_columns(frame, label_columns, split))
    return list(
        parse_label_sets(frame[label_column].tolist(), separator, f"data.label_column={label_column!r}")
    )


def load_image_table(
    files: dict[str, str | None],
    root: str | None,
    image_column: str,
    label_column: str | None,
    label_columns: Sequence[str] | None,
    separator: str,
    task: str,
) -> dict[str, Split]:
    """Images listed in tables (``data.labels_file``, optional ``val_labels_file`` / ``test_labels_file``): a path
    column (relative to ``data.root`` unless absolute) and the labels (one class, or a label set as
    :func:`table_labels` reads it). Images stay on disk and are read per item."""
    from pathlib import Path

    from ftlab.data.image_sources import check_readable
    from ftlab.data.sources import read_table

    base = Path(root).expanduser() if root else None
    splits: dict[str, Split] = {}
    for split, (key, path) in zip(("train", "validation", "test"), files.items(), strict=True):
        if not path:
            continue
        frame = read_table(path, f"data.{key}")
        wanted = [image_column, *(label_columns or ([label_column] if label_column else []))]
        absent = [c for c in wanted if c not in frame.columns]
        if absent:
            raise DataError(
                f"data.{key}={path!r} has no column {absent[0]!r} (its columns: {', '.join(map(str, frame.columns))})"
                "; set data.image_column / data.label_column / data.label_columns to its column names."
            )
        paths = [str(p if Path(p).is_absolute() or base is None else base / p) for p in frame[image_column]]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(
                f"data.{key}={path!r} lists {len(missing)} image(s) that do not exist, e.g. {missing[0]}; paths are "
                "relative to data.root unless absolute."
            )
        images = np.asarray(paths, dtype=object)
        check_readable(images)
        labels = np.empty(len(frame), dtype=object)
        labels[:] = table_labels(frame, task, label_column, label_columns, separator, split)
        splits[split] = (images, labels if task == "multilabel" else labels.astype(str))
    return splits
