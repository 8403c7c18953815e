"""Inputs that cannot be read, skipped one by one: the rest is evaluated or predicted, each skipped one reported.

``ftlab-predict`` and ``ftlab-eval`` read user files that may hold a line that is not UTF-8 or an image that is cut
off or a decompression bomb. Training refuses such a file in one paragraph naming it; these two leave the input
out, go on with the rest, write ``(input, reason)`` rows to a ``skipped.csv`` and exit with status 2.

- :func:`skipping`: a block inside which readers record an unreadable input (:func:`skip`) instead of raising;
  :func:`utf8_lines` reads a text file's lines that way (``<file>:<line>`` and the byte that is not UTF-8).
- :class:`SkipUnreadable` / :func:`skipping_loader`: a split's examples read one by one, an example whose reading
  raises a :class:`DataError` (``ImageReadError``) replaced by its (input, reason), dropped from its batch.
- :func:`report_skipped`: the ``skipped.csv`` record and the one paragraph that ends the command (exit status 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from ftlab.utils.errors import DataError

Skipped = list[tuple[str, str]]  # (input, reason)
SKIPPED_KEY = "skipped"  # a batch's list of (input, reason) left out of it

_current: ContextVar[Skipped | None] = ContextVar("ftlab_skipped", default=None)


@contextmanager
def skipping() -> Iterator[Skipped]:
    """Inside the block unreadable inputs are recorded in the yielded list (see :func:`skip`), not raised."""
    skipped: Skipped = []
    token = _current.set(skipped)
    try:
        yield skipped
    finally:
        _current.reset(token)


def is_skipping() -> bool:
    return _current.get() is not None


def skip(item: str, reason: str) -> bool:
    """Record ``(item, reason)`` inside :func:`skipping` and return ``True``; outside, ``False`` (the caller raises)."""
    skipped = _current.get()
    if skipped is None:
        return False
    skipped.append((item, reason))
    return True


def utf8_lines(raw: bytes, path: Path | str) -> list[tuple[int, str]]:
    """``(line number, text)`` of each UTF-8 line; a line that is not UTF-8 is skipped (:func:`skip`) or refused.

    Raises:
        DataError: outside :func:`skipping`, the first line that is not UTF-8, named with its number.
    """
    lines = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            lines.append((number, line.decode("utf-8")))
        except UnicodeDecodeError as err:
            reason = f"{path} line {number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})"
            if not skip(f"{path}:{number}", reason):
                raise DataError(f"{reason}. Save the file as UTF-8.") from None
    return lines


class SkipUnreadable(Dataset):
    """``dataset[i]``, or ``{SKIPPED_KEY: (input, reason)}`` for an example whose reading raises a DataError."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.dataset[index]
        except DataError as err:  # an image that is cut off, or a decompression bomb: named by its path
            return {SKIPPED_KEY: (getattr(err, "path", None) or f"example {index}", str(err))}


class SkippingCollator:
    """The loader's collator over the readable items; the batch carries the others' (input, reason) list."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        kept = [item for item in items if SKIPPED_KEY not in item]
        batch = dict(self.collate(kept)) if kept else {}
        batch[SKIPPED_KEY] = [item[SKIPPED_KEY] for item in items if SKIPPED_KEY in item]
        return batch


def skipping_loader(loader: DataLoader, skipped: Skipped) -> Iterator[dict[str, Any]]:
    """The batches of ``loader`` (the same examples in the same order) without their unreadable examples, which go
    to ``skipped``; a batch whose every example was unreadable is left out."""
    again = DataLoader(
        SkipUnreadable(loader.dataset),
        batch_sampler=loader.batch_sampler,  # the loader's own batching (a custom batch sampler included)
        collate_fn=SkippingCollator(loader.collate_fn),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        multiprocessing_context=loader.multiprocessing_context,
    )
    for batch in again:
        skipped += batch.pop(SKIPPED_KEY)
        if batch:
            yield batch


def report_skipped(skipped: Skipped, record: Path, done: str) -> DataError:
    """Write ``record`` (a CSV: input, reason) and return the one paragraph that names the skipped inputs.

    ``done``: what was done with the others ("6 predicted (written to preds.csv)").
    """
    import pandas as pd

    from ftlab.utils.safe_files import write_frame

    write_frame(record, pd.DataFrame(skipped, columns=["input", "reason"]), index=False)
    shown = " ".join(f"[{reason}]" for _, reason in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    return DataError(
        f"{len(skipped)} input(s) were skipped and {done}; the skipped ones and why are in {record}: {shown}"
    )
