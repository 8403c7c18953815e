"""The data side of knowledge distillation (:mod:`ftlab.distill`): training batches that carry the teacher's
cached logits (``teacher_logits``, (B, C)), and a transfer set of unlabelled texts appended to the training split
(label -1; the batch's ``labelled`` mask tells the loss and the metrics which rows have a label)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ftlab.data.base import TensorDictDataModule
from ftlab.preemption import resume_sampler
from ftlab.utils.devices import loader_settings
from ftlab.utils.errors import ConfigError


class TeacherLogitsDataset(Dataset):
    """The training split's examples, each with its cached teacher logits under ``teacher_logits``."""

    def __init__(self, base: Any, logits: torch.Tensor):
        self.base, self.logits = base, logits

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.base[index], "teacher_logits": self.logits[index]}


class TeacherCollator:
    """The data module's collator, plus the items' ``teacher_logits`` stacked to (B, C)."""

    def __init__(self, inner: Any, transfer: bool = False):
        self.inner, self.transfer = inner, transfer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner([{k: v for k, v in item.items() if k != "teacher_logits"} for item in items])
        batch["teacher_logits"] = torch.stack([item["teacher_logits"] for item in items])
        if self.transfer:  # transfer-set rows carry label -1: no label loss, no training metrics
            batch["labelled"] = batch["labels"] >= 0
        return batch


class DistillDataModule(TensorDictDataModule):
    """``source`` with its training batches carrying the teacher's cached logits; everything else is the source's
    (same sampler, same batches, so a run matches its undistilled twin's data order)."""

    def __init__(self, source: Any, logits: torch.Tensor, train: Any = None):
        super().__init__()
        # train: the training split plus a transfer set's unlabelled texts (labels -1), else the source's own
        self.source, self.logits, self.train = source, logits, train

    def __getattr__(self, name: str) -> Any:
        if name == "source" or "source" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["source"], name)

    def feature_cache_blocker(self) -> str | None:
        return "distillation serves the teacher's logits with the training examples"

    def train_dataloader(self) -> DataLoader:
        source = self.source
        source.trainer = self.trainer  # the sampler reads the epoch and DDP rank from it
        dataset = source.datasets["train"] if self.train is None else self.train
        sampler = resume_sampler(source.train_sampler(dataset), self.trainer, source.batch_size)
        return DataLoader(
            TeacherLogitsDataset(dataset, self.logits),
            batch_size=source.batch_size,
            sampler=sampler,
            collate_fn=TeacherCollator(source.collator(), transfer=self.train is not None),
            **loader_settings(source.num_workers, source.pin_memory, self.trainer),
        )

    def val_dataloader(self) -> DataLoader:
        self.source.trainer = self.trainer
        return self.source.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        self.source.trainer = self.trainer
        return self.source.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()


def read_transfer(path: str | Path, column: str = "text") -> list[str]:
    """The transfer set's texts: a ``.txt`` file (one text per line, blank lines skipped) or a CSV / JSONL /
    Parquet table's ``column``."""
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"distill.transfer={path}: no such file. Give a .txt file (one text per line) or a table."
        )
    if file.suffix == ".txt":
        return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    readers = {
        ".csv": pd.read_csv,
        ".jsonl": lambda f: pd.read_json(f, lines=True),
        ".parquet": pd.read_parquet,
    }
    if file.suffix not in readers:
        raise ConfigError(f"distill.transfer={path}: use a .txt, .csv, .jsonl or .parquet file.")
    table = readers[file.suffix](file)
    if column not in table.columns:
        raise ConfigError(
            f"distill.transfer={path} has no column {column!r} (columns: {', '.join(map(str, table.columns))}); "
            "name the text column with distill.transfer_column=<name>."
        )
    return table[column].dropna().astype(str).tolist()


def with_transfer(datamodule: Any, texts: list[str]) -> Any:
    """The training split followed by the transfer texts (student-tokenized, label -1), one ``TokenizedText``, so
    the data module's own sampler (length buckets included) draws from both."""
    from ftlab.data.text import TokenizedText, tokenize_cached

    train = datamodule.datasets["train"]
    if type(train) is not TokenizedText or train.type_ids is not None or np.asarray(train.labels).ndim != 1:
        raise ConfigError(
            "distill.transfer adds single unlabelled texts to a single-text, single-label training split "
            f"({type(train).__name__}{', text pairs' if getattr(train, 'type_ids', None) is not None else ''}); "
            "text pairs, multi-label data and data.text_augment are not supported with it."
        )
    extra = tokenize_cached(datamodule.tokenizer, texts, None, datamodule.max_length, None)
    arrays = {
        "input_ids": np.concatenate([train.ids, extra["input_ids"].astype(train.ids.dtype)]),
        "offsets": np.concatenate([train.offsets, extra["offsets"][1:] + train.offsets[-1]]),
    }
    labels = np.concatenate(
        [np.asarray(train.labels), np.full(len(texts), -1, dtype=np.asarray(train.labels).dtype)]
    )
    return TokenizedText(arrays, labels)
