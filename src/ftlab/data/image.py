"""Image classification data: read a source, split, sample, transform per the backbone's preprocessing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ftlab.augment.mix import Mix, MixCollator
from ftlab.augment.seeding import EpochIndexed, tag_epochs
from ftlab.data.base import ClassificationDataModule
from ftlab.data.image_files import read_image
from ftlab.data.image_size import auto_input_size
from ftlab.data.image_sources import (
    EMBEDDED_IMAGES,
    IMAGE_SOURCES,
    Split,
    load_embedded,
    load_image_folder,
    load_torchvision,
)
from ftlab.data.imbalance import check_class_fraction, check_sampler, cut_classes
from ftlab.data.labels import LabelMap
from ftlab.data.multilabel import MULTILABEL_IMAGES, check_multilabel_options, load_image_table
from ftlab.data.sources import SPLITS
from ftlab.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# auto: the safe default, light (a mild random crop: no flips, no strong zoom; digits and text stay readable)
AUGMENTATIONS = ("none", "auto", "light", "basic", "randaugment", "trivialaugment")


@dataclass(frozen=True)
class ImagePreprocessing:
    """What the data side needs from an image backbone: square input size, channels, normalisation."""

    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resolved: bool = False  # input_size was chosen for a run's data already (data.input_size: auto): keep it


def _to_tensor(image: Any) -> torch.Tensor:
    """A uint8 array (H, W) / (H, W, C) or a PIL image -> uint8 tensor (C, H, W)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class Channels(torch.nn.Module):
    """Grayscale -> ``channels`` copies; RGB(A) -> 3 channels, or luminance when 1 channel is wanted."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (C, H, W) uint8
        if image.shape[0] == 4:
            image = image[:3]
        if image.shape[0] == self.channels:
            return image
        if image.shape[0] == 1:
            return image.expand(self.channels, -1, -1).contiguous()
        return v2.functional.rgb_to_grayscale(image, num_output_channels=self.channels)


def build_transform(preprocessing: ImagePreprocessing, augment: str, train: bool) -> v2.Compose:
    """uint8 (C, H, W) -> normalised float (channels, size, size); train-time augmentation when ``train``."""
    size = preprocessing.input_size
    steps: list[torch.nn.Module] = [Channels(preprocessing.channels)]
    if train and augment in ("auto", "light"):
        steps.append(v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True))
    elif train and augment != "none":
        steps += [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if augment == "randaugment":
            steps.append(v2.RandAugment())
        elif augment == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
    else:  # resize the short side, then centre-crop: a square image is simply resized
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(preprocessing.mean), list(preprocessing.std)),
    ]
    return v2.Compose(steps)


class ImageDataset(Dataset):
    """Images in memory (uint8 array) or on disk (object array of paths) with class ids."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def _read(self, index: int) -> torch.Tensor:
        item = self.images[index]
        if not isinstance(item, str):
            return _to_tensor(item)
        return read_image(item)  # upright, 8-bit, first frame; ImageReadError (a DataError) names the file

    def digest(self, digest: Any) -> None:
        """Feed pixels (or the files' paths, sizes and times), labels and the transform into a hashlib ``digest``."""
        import os

        if self.images.dtype == object:  # paths: a changed file changes its size or modification time
            for path in self.images:
                stat = os.stat(path)
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        else:
            digest.update(str(self.images.shape).encode())
            digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.asarray(self.labels).tobytes())
        digest.update(repr(self.transform).encode())  # input size, resize/crop, normalisation

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.transform(self._read(index))
        # class ids (int64), or multi-hot float rows for multi-label data
        return {"pixel_values": pixels, "labels": torch.as_tensor(self.labels[index])}


class ImageCollator:
    """Stacks ``pixel_values`` (and ``labels`` when the items have them); other item keys are not batched."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items])}
        if "labels" in items[0]:
            batch["labels"] = torch.stack([torch.as_tensor(item["labels"]) for item in items])
        return batch


class ImageClassificationDataModule(ClassificationDataModule):
    """Images with one class each, from an embedded set, an image folder tree or a torchvision dataset.

    Args:
        preprocessing: the backbone's :class:`ImagePreprocessing` (input size, channels, mean/std).
        source: ``mnist5k``, ``digits``, ``lfw_faces`` (embedded), ``image_folder`` or ``torchvision``; for
            ``task=multilabel``: ``mnist_pairs`` (embedded, :func:`~ftlab.data.multilabel.load_mnist_pairs`).
            ``image_table`` (either task): images listed in ``labels_file`` (and optional ``val_labels_file`` /
            ``test_labels_file``) with an ``image_column`` of paths (relative to ``root``) and the labels in
            ``label_column`` (a class; for multi-label a JSON list or names joined by ``label_separator``) or in 0/1
            ``label_columns``.
        task: ``classification`` or ``multilabel`` (a set of labels per image).
        root, val_root, test_root: folders for ``image_folder`` (``<root>/<class>/<image>``); ``root`` is also
            where a ``torchvision`` dataset lies (or is downloaded to).
        name, download: the ``torchvision.datasets`` class name and whether it may be downloaded.
        options: other arguments of that torchvision class (e.g. ``{partition: 3}`` for DTD).
        classes: keep only these classes, re-indexed in this order (e.g. digits 5-9 become ids 0-4).
        val_fraction, test_fraction: held out from train, seeded and stratified, when the source has no such split.
        max_train_examples: a stratified subset of the training split. examples_per_class: few-shot sampling.
        max_eval_examples: a stratified, seeded subset of the validation and test splits (faster evaluation).
        split_seed: seeds the held-out validation/test splits (and their subsets) in place of ``seed``: runs of
            several seeds test on the same images (null: ``seed``).
        augment: train-time augmentation: ``none``, ``auto`` / ``light`` (a mild random crop, 85-100% of the
            image, no flip: safe for digits and text), ``basic`` (random resized crop 60-100% + horizontal flip),
            ``randaugment`` or ``trivialaugment`` (basic plus that policy).
        input_size: ``null`` (the backbone's, ``model.backbone.input_size``), a number, or ``auto``: chosen from
            the training images' median size (:mod:`ftlab.data.image_size`), saved with the run.
        batch_size, eval_batch_size, num_workers: loader settings. seed: for splits, subsets and shuffling.
        pin_memory: page-locked batches for asynchronous host-to-GPU copies. ``num_workers`` and ``pin_memory``
            ``auto``: workers and pinning on a CUDA device, neither on CPU (``ftlab.utils.devices``).
        folds, fold: k-fold cross-validation (:mod:`ftlab.data.folds`): fold ``fold`` of ``folds`` validates.
        sampler: ``none`` (seeded shuffle) or ``balanced`` (classes drawn equally; ``ftlab.data.imbalance``).
        class_fraction: keep this share of the named classes of the source's training split, e.g. ``{"3": 0.1}``.
        mix: MixUp / CutMix on training batches, e.g. ``{mode: mixup, alpha: 1.0}`` (:class:`~ftlab.augment.mix.Mix`;
            soft targets); ``null``: none. Applies after ``augment``.
    """

    modality = "image"
    task = "classification"

    def __init__(
        self,
        preprocessing: ImagePreprocessing,
        source: str = "mnist5k",
        root: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        name: str | None = None,
        download: bool = False,
        options: dict[str, Any] | None = None,
        classes: list[Any] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_examples: int | None = None,
        examples_per_class: int | None = None,
        max_eval_examples: int | None = None,
        split_seed: int | None = None,
        augment: str = "none",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        seed: int = 0,
        pin_memory: bool | str = "auto",
        folds: int | None = None,
        fold: int = 0,
        task: str = "classification",
        sampler: str = "none",
        class_fraction: dict[str, float] | None = None,
        labels_file: str | None = None,
        val_labels_file: str | None = None,
        test_labels_file: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        label_columns: list[str] | None = None,
        label_separator: str = "|",
        mix: dict[str, Any] | None = None,
        input_size: int | str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, seed, pin_memory)
        self.mix = Mix.from_config(mix, task)
        sources = {
            "classification": (*IMAGE_SOURCES, "image_table"),
            "multilabel": (*MULTILABEL_IMAGES, "image_table"),
        }
        if task not in sources:
            raise ConfigError(
                f"data.task={task!r} is not supported for images; use one of {', '.join(sources)}."
            )
        if source not in sources[task]:
            raise ConfigError(
                f"data.source={source!r} is not supported for data.task={task}; use one of "
                f"{', '.join(sources[task])}."
            )
        check_sampler(sampler, task)
        check_class_fraction(class_fraction, task)
        check_multilabel_options(task, label_columns, label_separator, examples_per_class)
        if source == "image_table" and not labels_file:
            raise ConfigError(
                "data.source=image_table needs data.labels_file: a CSV/TSV/JSONL/Parquet table with an image path "
                "column (data.image_column) and the labels (data.label_column, or 0/1 data.label_columns)."
            )
        self.table_args: dict[str, Any] = dict(
            files={
                "labels_file": labels_file,
                "val_labels_file": val_labels_file,
                "test_labels_file": test_labels_file,
            },
            image_column=image_column,
            label_column=label_column,
            label_columns=label_columns,
            separator=label_separator,
        )
        self.task, self.sampler = task, sampler
        self.class_fraction = {str(k): v for k, v in class_fraction.items()} if class_fraction else None
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"data.augment={augment!r} is not one of {', '.join(AUGMENTATIONS)}.")
        if OmegaConf.is_config(preprocessing):  # Hydra's instantiate passes the dataclass on as a DictConfig
            preprocessing = OmegaConf.to_object(preprocessing)  # type: ignore[assignment]
        self.preprocessing, self.source = preprocessing, source
        self.source_args: dict[str, Any] = dict(
            root=root, val_root=val_root, test_root=test_root, name=name, download=download, options=options
        )
        self.keep_classes = [str(c) for c in classes] if classes is not None else None
        self._set_split(
            val_fraction, test_fraction, max_train_examples, examples_per_class, max_eval_examples, split_seed
        )
        self._set_folds(folds, fold, None)
        self.augment = augment
        if not (
            input_size is None or input_size == "auto" or (isinstance(input_size, int) and input_size > 0)
        ):
            raise ConfigError(
                f"data.input_size={input_size!r}: give a positive number of pixels (the square side), auto (from "
                "the training images' size) or null (the backbone's model.backbone.input_size)."
            )
        self.input_size = input_size
        self.collate = ImageCollator()

    def feature_cache_blocker(self) -> str | None:
        if self.mix is not None:
            return f"data.mix={self.mix.mode} blends the training images every batch"
        if self.augment != "none":
            return f"data.augment={self.augment} changes the frozen layers' input every epoch"
        return None

    def encode(self, inputs: list[Any], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """Image files read and transformed as the validation/test images are (no augmentation)."""
        transform = build_transform(self.preprocessing, "none", train=False)
        paths = [str(path) for path in inputs]
        dataset = ImageDataset(
            np.asarray(paths, dtype=object), np.zeros(len(paths), dtype=np.int64), transform
        )
        return [{"pixel_values": dataset[i]["pixel_values"], "input": path} for i, path in enumerate(paths)]

    def _load(self) -> dict[str, Split]:
        args = self.source_args
        if self.source == "image_table":
            return load_image_table(root=args["root"], task=self.task, **self.table_args)
        if self.source in MULTILABEL_IMAGES:
            return MULTILABEL_IMAGES[self.source]()
        if self.source in EMBEDDED_IMAGES:
            return load_embedded(self.source)
        if self.source == "image_folder":
            return load_image_folder(args["root"], args["val_root"], args["test_root"])
        return load_torchvision(args["name"], args["root"], bool(args["download"]), args["options"])

    def _keep(self, split: str, images: np.ndarray, labels: np.ndarray) -> Split:
        if (
            self.keep_classes is None or self.task == "multilabel"
        ):  # multi-label: data.classes fixes the order
            return images, labels
        mask = np.isin(labels, self.keep_classes)
        if not mask.any():
            found = sorted(set(labels.tolist()))[:20]
            raise DataError(
                f"data.classes={self.keep_classes} keeps no {split} images; the classes in the data are {found}."
            )
        return images[mask], labels[mask]

    def _split(self, splits: dict[str, Split]) -> dict[str, Split]:
        """Hold out validation/test from train when the source lacks them; then subset the training split."""
        images, labels = splits["train"]
        if self.class_fraction:
            kept = cut_classes(labels, self.class_fraction, self.holdout_seed)
            images, labels = images[kept], labels[kept]
        missing = {s for s in ("validation", "test") if s not in splits}
        # label sets are not stratified (a seeded random split)
        indices = self._split_indices(labels if self.task != "multilabel" else np.zeros(len(labels)), missing)
        splits = {**splits, **{split: (images[index], labels[index]) for split, index in indices.items()}}
        for split in ("validation", "test"):  # data.max_eval_examples
            split_images, split_labels = splits[split]
            stratify_on = split_labels if self.task != "multilabel" else np.zeros(len(split_labels))
            keep = self._eval_subset(split, stratify_on)
            if keep is not None:
                splits[split] = (split_images[keep], split_labels[keep])
        return splits

    def _choose_input_size(self, train_images: Any) -> None:
        """Apply ``data.input_size`` (a rebuilt run's preprocessing already holds the size it trained with)."""
        if self.input_size is None or self.preprocessing.resolved:
            return
        native = self.preprocessing.input_size
        size = auto_input_size(train_images, native) if self.input_size == "auto" else int(self.input_size)
        self.preprocessing = replace(self.preprocessing, input_size=size, resolved=True)
        log.info(
            "data.input_size=%s: images are fed at %d px (the backbone's: %d).", self.input_size, size, native
        )

    def setup(self, stage: str | None = None) -> None:
        if self.label_map is not None:
            return
        splits = {split: self._keep(split, *pair) for split, pair in self._load().items()}
        splits = self._split(splits)
        self._choose_input_size(splits["train"][0])
        self.label_map = LabelMap.from_train(splits["train"][1].tolist(), self.task, self.keep_classes)
        for split in SPLITS:
            images, labels = splits[split]
            ids = self.label_map.encode(labels.tolist(), split, "the class names")
            transform = build_transform(self.preprocessing, self.augment, train=split == "train")
            self.datasets[split] = ImageDataset(images, ids, transform)
            if (
                split == "train" and self.mix is not None
            ):  # items carry (epoch, index): MixCollator seeds from them
                self.datasets[split] = EpochIndexed(self.datasets[split])
        sizes = ", ".join(f"{s}={len(d)}" for s, d in self.datasets.items())
        log.info("Image data %s: %s; %d classes.", self.source, sizes, self.label_map.num_classes)

    def train_sampler(self, dataset: Dataset) -> Any:
        sampler = super().train_sampler(dataset)
        if not isinstance(dataset, EpochIndexed):
            return sampler
        return tag_epochs(sampler, len(dataset), self._epoch)  # the indices carry the epoch (mix's seed)

    def collator(self, cuda: bool | None = None) -> Any:
        """Stacks items; with ``mix``, training batches are mixed (:class:`~ftlab.augment.mix.MixCollator`)."""
        if self.mix is None:
            return self.collate
        return MixCollator(self.collate, self.mix, self.num_classes, self.seed)
