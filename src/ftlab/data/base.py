"""What the text and image data modules share: the label map, the loaders and the checkpointed state."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ftlab.data import folds as folds_module
from ftlab.data import sampling
from ftlab.data.imbalance import BalancedClassSampler
from ftlab.data.labels import LabelMap
from ftlab.data.samplers import SeededShuffleSampler
from ftlab.preemption import resume_sampler
from ftlab.utils.devices import check_loader_settings, loader_settings
from ftlab.utils.errors import ConfigError


class TensorDictDataModule(pl.LightningDataModule):
    """A data module whose batches are flat dicts of tensors, moved to the device directly.

    Lightning's default ``transfer_batch_to_device`` walks any collection generically (~0.5 ms of Python per step,
    most of a step when a head trains on cached features); here it is one dict comprehension. (A data-module hook
    rather than a LightningModule one: Lightning warns when the module overrides it and a data module is passed.)
    """

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and all(isinstance(v, torch.Tensor) for v in batch.values()):
            non_blocking = device.type == "cuda"
            return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


class ClassificationDataModule(TensorDictDataModule):
    """Base of the data modules: subclasses fill ``label_map`` and ``datasets`` (train/validation/test) in ``setup``.

    The public API that training, prediction and the feature cache all use: ``train_sampler(dataset)``,
    ``collator(cuda)``, ``encode(raw inputs)``, ``modality`` (``text`` or ``image``: what raw inputs are), ``task``,
    ``num_classes``, ``label_names``, ``class_counts()``. Training batches come in an order that is a function of
    (seed, epoch) (``train_sampler``), so a resumed run sees the batches the uninterrupted run would.
    """

    modality = "text"
    task = "classification"
    # k-fold cross-validation (ftlab.data.folds): set by the subclasses' folds/fold/group_column arguments
    folds: int | None = None
    fold = 0
    group_column: str | None = None
    fold_index: Any = None  # the validation fold's rows in the source's (cleaned) training table
    split_seed: int | None = None  # data.split_seed: seeds the held-out splits (null: data.seed)
    sampler = "none"  # data.sampler: none (seeded shuffle) or balanced (ftlab.data.imbalance)

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int | str,
        seed: int,
        pin_memory: bool | str,
    ):
        super().__init__()
        check_loader_settings(num_workers, pin_memory)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.label_map: LabelMap | None = None
        self.datasets: dict[str, Any] = {}
        self.collate: Any = None

    def _set_split(
        self,
        val_fraction: float,
        test_fraction: float,
        max_train_examples: int | None,
        examples_per_class: int | None,
        max_eval_examples: int | None = None,
        split_seed: int | None = None,
    ) -> None:
        """Check and keep how held-out splits are cut from a source's training split (see ``_split_indices``).
        ``split_seed``: what seeds the held-out splits (and their ``max_eval_examples`` subsets, and a
        ``class_fraction`` cut before them) instead of ``seed``, so runs of several seeds test on the same examples
        while their training subsets, order and initialisation still vary (null: ``seed``)."""
        if max_eval_examples is not None and max_eval_examples <= 0:
            raise ConfigError(
                f"data.max_eval_examples={max_eval_examples} must be positive (or null for all)."
            )
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"data.{key}={value} must be between 0 and 1 (exclusive).")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training data."
            )
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_examples, self.examples_per_class = max_train_examples, examples_per_class
        self.max_eval_examples = max_eval_examples
        self.split_seed = split_seed

    @property
    def holdout_seed(self) -> int:
        """The seed of the held-out splits: ``data.split_seed``, or ``data.seed`` when that is null."""
        return self.seed if self.split_seed is None else int(self.split_seed)

    def _set_folds(self, folds: int | None, fold: int, group_column: str | None) -> None:
        folds_module.check_folds(folds, fold, group_column)
        if folds is not None and self.max_eval_examples is not None:  # after _set_split
            raise ConfigError(
                f"data.max_eval_examples={self.max_eval_examples} cannot be used with data.folds={folds}: the "
                "out-of-fold predictions must cover every example. Set data.max_eval_examples=null, or drop "
                "data.folds and use data.val_fraction."
            )
        if folds is not None and self.split_seed is not None:
            raise ConfigError(
                f"data.split_seed={self.split_seed} cannot be used with data.folds={folds}: the folds (and the "
                "test split held out before them) follow data.seed, and data.fold chooses the validation fold. "
                "Set data.split_seed=null, or drop data.folds."
            )
        self.folds, self.fold, self.group_column = folds, fold, group_column

    def _eval_subset(self, split: str, labels: Any) -> Any:
        """Indices of a stratified, seeded subset of a validation or test split longer than
        ``data.max_eval_examples`` (cut or the source's own), or None to keep it whole (and for ``train``)."""
        limit = self.max_eval_examples
        if limit is None or split not in ("validation", "test") or len(labels) <= limit:
            return None
        return sampling.subsample(np.asarray(labels), limit, self.holdout_seed, "data.max_eval_examples")

    def _split_indices(self, labels: Any, missing: set[str], groups: Any = None) -> dict[str, Any]:
        """``sampling.split_train`` with this module's fractions, subset sizes and seed; with ``folds``, the
        training pool's fold ``fold`` validates (``ftlab.data.folds``; a source's own validation split is unused)."""
        if self.folds is not None:
            splits = folds_module.fold_indices(
                labels,
                groups,
                self.folds,
                self.fold,
                self.seed,
                self.test_fraction if "test" in missing else None,
                self.examples_per_class,
                self.max_train_examples,
            )
            self.fold_index = splits["validation"]
            return splits
        return sampling.split_train(
            labels,
            missing,
            self.val_fraction,
            self.test_fraction,
            self.examples_per_class,
            self.max_train_examples,
            self.seed,
            self.holdout_seed,
        )

    @property
    def num_classes(self) -> int:
        self.setup("fit")  # idempotent in the subclasses: the first call reads the data
        assert self.label_map is not None
        return self.label_map.num_classes

    def class_counts(self) -> list[int] | None:
        """Training examples per class (for ``module.class_weights=balanced``); ``None`` where counts do not apply."""
        self.setup("fit")
        assert self.label_map is not None
        if self.label_map.names is None:
            return None
        labels = np.asarray(self.datasets["train"].labels)
        if labels.ndim == 2:  # multi-hot: positives per label
            return labels.sum(0).astype(int).tolist()
        return np.bincount(labels, minlength=self.label_map.num_classes).tolist()

    @property
    def label_names(self) -> list[str] | None:
        self.setup("fit")
        assert self.label_map is not None
        return self.label_map.names

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_sampler(self, dataset: Dataset) -> Sampler[int]:
        if self.sampler == "balanced":
            trainer = self.trainer  # under DDP each rank takes its share of one global draw
            return BalancedClassSampler(
                np.asarray(dataset.labels),  # type: ignore[attr-defined]
                self.seed,
                self._epoch(),
                num_replicas=trainer.world_size if trainer is not None else 1,
                rank=trainer.global_rank if trainer is not None else 0,
            )
        return SeededShuffleSampler(len(dataset), self.seed, self._epoch())  # type: ignore[arg-type]

    def collator(self, cuda: bool | None = None) -> Any:
        """The collator the loaders use (subclasses may adapt it to a CUDA device or not; default: the trainer's)."""
        return self.collate

    def feature_cache_blocker(self) -> str | None:
        """Why a frozen backbone's outputs on this data cannot be cached (inputs that change between epochs, or
        datasets without a ``digest``), or ``None`` when they can."""
        return f"feature caching has no key for {type(self).__name__} data"

    def encode(self, inputs: list[Any], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """Raw inputs (texts, text pairs, image paths) as items the :meth:`collator` batches, encoded exactly as
        training encodes its examples; each item keeps its raw input under ``"input"``. Works without ``setup``:
        prediction needs the preprocessing, not the training data."""
        raise NotImplementedError(f"{type(self).__name__} does not encode raw inputs")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup("fit")
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            # resumed mid-epoch (ftlab.preemption): without the batches the interrupted epoch had consumed
            sampler=resume_sampler(self.train_sampler(dataset), self.trainer, self.batch_size)
            if shuffle
            else None,
            collate_fn=self.collator(),
            **loader_settings(self.num_workers, self.pin_memory, self.trainer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.label_map.to_dict() if self.label_map else None}
