"""Text classification data: read a source, split, sample, tokenize once (cached on disk), pad per batch."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ftlab.augment.seeding import tag_epochs
from ftlab.augment.text import AugmentedText, TextAugment
from ftlab.data.base import ClassificationDataModule
from ftlab.data.folds import group_values
from ftlab.data.imbalance import check_class_fraction, check_sampler, cut_classes
from ftlab.data.labels import TASKS, LabelMap
from ftlab.data.multilabel import check_multilabel_options, table_labels
from ftlab.data.samplers import LengthBucketSampler
from ftlab.data.sources import SPLITS, load_text_source, require_columns
from ftlab.utils.devices import check_auto_or_count, on_cuda, pad_multiple, padded_width
from ftlab.utils.errors import ConfigError, DataError, ModelLoadError
from ftlab.utils.safe_files import atomic_write, read_cached_arrays

log = logging.getLogger(__name__)
PADDING = ("longest", "max_length")


@dataclass(frozen=True)
class TextPreprocessing:
    """What the data side needs from a text backbone: its tokenizer and the longest input it accepts."""

    tokenizer: str
    max_length: int


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"The tokenizer of {name_or_path!r} could not be loaded: {err}. Offline, a hub name works only from a warm "
            "HF cache; pass a local model folder (model.backbone.name_or_path=/path/to/model) or use model=minilm."
        ) from err


def check_text_settings(
    preprocessing: TextPreprocessing,
    max_length: int,
    pad_to_multiple_of: int | str,
    task: str,
    tasks: tuple[str, ...],
) -> None:
    """The settings every text data module checks alike (text, token tags, instructions)."""
    if task not in tasks:
        serves = f"serves task={tasks[0]} only" if len(tasks) == 1 else f"supports {', '.join(tasks)}"
        raise ConfigError(f"data.task={task!r} is not supported: this data module {serves}.")
    if max_length > preprocessing.max_length:
        raise ConfigError(
            f"data.max_length={max_length} is longer than the backbone accepts ({preprocessing.max_length})."
        )
    check_auto_or_count("data.pad_to_multiple_of", pad_to_multiple_of, 1, " (1: no rounding)")


class TokenizerOwner:
    """The backbone's tokenizer, loaded once on first use (text data modules mix this in)."""

    preprocessing: TextPreprocessing
    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.preprocessing.tokenizer)
        return self._tokenizer


class TokenizedText(Dataset):
    """Variable-length token ids stored flat (``ids[offsets[i]:offsets[i+1]]``) with their labels."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray):
        self.ids, self.offsets = arrays["input_ids"], arrays["offsets"]
        self.type_ids = arrays.get("token_type_ids")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self, digest: Any) -> None:
        """Feed the token ids, token types and labels into a hashlib ``digest`` (the feature cache's key)."""
        for array in (self.ids, self.offsets, self.type_ids, self.labels):
            if array is not None:
                digest.update(np.ascontiguousarray(array).tobytes())

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = self.offsets[index], self.offsets[index + 1]
        item = {"input_ids": self.ids[start:end], "labels": self.labels[index]}
        if self.type_ids is not None:
            item["token_type_ids"] = self.type_ids[start:end]
        return item


class PadCollator:
    """Pads a batch to its longest sequence (dynamic padding) and builds the attention mask.

    Written here rather than ``transformers.DataCollatorWithPadding``: that one goes through ``tokenizer.pad``
    example by example in Python, which costs more than a forward pass of a small model on these CPUs.
    """

    def __init__(self, pad_id: int, width: int | None = None, multiple: int = 1, cap: int | None = None):
        self.pad_id, self.width = pad_id, width  # width: pad every batch to it (static shapes), else longest
        self.multiple, self.cap = multiple, cap  # longest rounded up to a multiple, at most cap

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = self.width or padded_width(
            max(len(item["input_ids"]) for item in items), self.multiple, self.cap
        )
        ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, item in enumerate(items):
            ids[row, : len(item["input_ids"])] = item["input_ids"]
            mask[row, : len(item["input_ids"])] = 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if "token_type_ids" in items[0]:
            types = np.zeros((len(items), width), dtype=np.int64)
            for row, item in enumerate(items):
                types[row, : len(item["token_type_ids"])] = item["token_type_ids"]
            batch["token_type_ids"] = torch.from_numpy(types)
        if "labels" in items[0]:  # items of raw inputs to predict have none
            batch["labels"] = torch.as_tensor(np.asarray([item["labels"] for item in items]))
        return batch


def _fingerprint(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def _tokenizer_id(tokenizer: Any) -> str:
    """The tokenizer's full definition, without the truncation/padding state that calling it leaves behind."""
    if not tokenizer.is_fast:
        return repr(tokenizer)
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return json.dumps(definition, sort_keys=True)


def tokenize_cached(
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    cache_dir: Path | None,
    prompt: Any = None,
) -> dict[str, np.ndarray]:
    """Token ids of ``texts`` (and ``pairs``), read from or written to ``cache_dir``.

    The cache key covers everything the ids depend on: the full tokenizer definition (vocab, normalizer, special
    tokens: ``backend_tokenizer.to_str()``), ``max_length``, every text and the ``prompt``
    (:class:`~ftlab.prompting.PromptFormat`, ``prompt=verbalizer``: each text put into its template, the text cut
    to fit, never the template), so a stale entry is never used.
    """
    path = None
    if cache_dir is not None:  # the key serializes the whole tokenizer (~ms): only when a cache is used
        key = _fingerprint(
            _tokenizer_id(tokenizer),
            str(max_length),
            "\x01".join(texts),
            "\x01".join(pairs) if pairs else "-",
            *([prompt.key()] if prompt is not None else []),
        )
        path = cache_dir / "tokens" / f"{key}.npz"
    cached = read_cached_arrays(path) if path is not None else None  # allow_pickle=False; damaged: recomputed
    if cached is not None:
        return cached
    if prompt is not None:
        encoded = {"input_ids": prompt.encode(tokenizer, texts, max_length, pairs)}
    else:
        encoded = tokenizer(
            texts,
            pairs,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=pairs is not None,
        )
    lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(texts))
    arrays = {
        "input_ids": np.concatenate([np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]]),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]),
    }
    if pairs is not None and prompt is None:  # a prompt holds both texts in one segment
        arrays["token_type_ids"] = np.concatenate(
            [np.asarray(t, dtype=np.int8) for t in encoded["token_type_ids"]]
        )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: concurrent jobs of a sweep may write the same entry
        atomic_write(path, lambda tmp: _save_npz(tmp, arrays), point="tokens")
    return arrays


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add .npz to a name
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle


class TextClassificationDataModule(TokenizerOwner, ClassificationDataModule):
    """Single texts or text pairs with a class (or a number, ``task=regression``) each.

    Args:
        preprocessing: the backbone's :class:`TextPreprocessing` (tokenizer location, longest input).
        source: an embedded dataset (``rotten_tomatoes``, ``debates_2016``), ``files`` or ``hf_hub``.
        train_file, validation_file, test_file: tables for ``source=files`` (CSV/TSV/JSONL/Parquet).
        hub_name, hub_config, hub_splits: an HF hub dataset for ``source=hf_hub`` (needs internet or a warm cache).
        text_column, text_pair_column, label_column: columns of the tables.
        label_columns: several 0/1 columns, one per label (``task=multilabel``; instead of ``label_column``).
        label_separator: between label names in ``label_column`` for ``task=multilabel`` (``a|b``; a JSON list
            ``["a", "b"]`` or a list in JSONL/Parquet is read as it is).
        labels: keep only these labels, in this order (default: all labels of the training split, sorted).
        task: ``classification``, ``regression`` or ``multilabel`` (:mod:`ftlab.data.multilabel`).
        val_fraction, test_fraction: held out from train, seeded and stratified, when the source has no such split.
        max_train_examples: a stratified subset of the training split. examples_per_class: few-shot sampling.
        max_eval_examples: a stratified, seeded subset of the validation and test splits (faster evaluation).
        folds, fold, group_column: k-fold cross-validation (:mod:`ftlab.data.folds`): fold ``fold`` of ``folds``
            validates; rows sharing a ``group_column`` value stay in one fold; the test split is the same for all.
        max_length: truncation length in tokens (at most the backbone's limit).
        batch_size, eval_batch_size, num_workers: loader settings. seed: for splits, subsets and shuffling.
        split_seed: seeds the held-out validation/test splits (and their ``max_eval_examples`` subsets) in place
            of ``seed``: runs of several seeds test on the same examples (null: ``seed``).
        cache_dir: where tokenized splits are cached (``null``: no cache).
        bucketing: training batches of similar length (:class:`~ftlab.data.samplers.LengthBucketSampler`):
            less padding, same examples per epoch; ``false``: a plain seeded shuffle.
        padding: ``longest`` pads each batch to its longest example; ``max_length`` pads to ``max_length``
            (static shapes, e.g. for ``torch.compile`` or to measure what dynamic padding saves).
        pin_memory: page-locked batches for faster, asynchronous host-to-GPU copies. ``num_workers`` and
            ``pin_memory`` ``auto``: workers and pinning on a CUDA device, neither on CPU (``ftlab.utils.devices``).
        pad_to_multiple_of: round each dynamically padded batch's width up to a multiple of this (at most
            ``max_length``); ``auto``: 8 on a CUDA device (few distinct shapes, tensor-core friendly), 1 on CPU.
        sampler: ``none`` (length buckets or a seeded shuffle) or ``balanced`` (classes drawn equally; replaces
            the buckets; :class:`~ftlab.data.imbalance.BalancedClassSampler`).
        class_fraction: keep this share of the named classes of the source's training table, e.g.
            ``{rotten: 0.1}``, before validation/test are held out of it (an imbalanced set; seeded).
        text_augment: training-time EDA / character noise, e.g. ``{ops: [eda], n_aug: 1}``
            (:class:`~ftlab.augment.text.TextAugment`); ``null``: none.
        masking, exclude_eval_texts: ``task=masked_lm`` only: unlabelled text, masked per example; the module
            built is then a :class:`~ftlab.data.masking.MaskedTextDataModule` (see there for these options).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # data.task=masked_lm: every text source serves masked-LM adaptation, unlabelled (ftlab.data.masking)
        if cls is TextClassificationDataModule and kwargs.get("task") == "masked_lm":
            from ftlab.data.masking import MaskedTextDataModule

            cls = MaskedTextDataModule
        return super().__new__(cls)

    def __init__(
        self,
        preprocessing: TextPreprocessing,
        source: str = "rotten_tomatoes",
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        hub_name: str | None = None,
        hub_config: str | None = None,
        hub_splits: dict[str, str] | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        labels: list[Any] | None = None,
        task: str = "classification",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_examples: int | None = None,
        examples_per_class: int | None = None,
        max_eval_examples: int | None = None,
        folds: int | None = None,
        fold: int = 0,
        group_column: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        seed: int = 0,
        split_seed: int | None = None,
        cache_dir: str | None = None,
        bucketing: bool = True,
        padding: str = "longest",
        pin_memory: bool | str = "auto",
        pad_to_multiple_of: int | str = "auto",
        sampler: str = "none",
        class_fraction: dict[str, float] | None = None,
        label_columns: list[str] | None = None,
        label_separator: str = "|",
        text_augment: dict[str, Any] | None = None,
        masking: dict[str, Any] | None = None,
        exclude_eval_texts: bool = False,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, seed, pin_memory)
        for key, value in (("masking", masking), ("exclude_eval_texts", exclude_eval_texts or None)):
            if value is not None:
                raise ConfigError(f"data.{key} applies to data.task=masked_lm only (data.task={task}).")
        self.text_augment = TextAugment.from_config(text_augment)
        if padding not in PADDING:
            raise ConfigError(f"data.padding={padding!r} is not one of {', '.join(PADDING)}.")
        check_text_settings(preprocessing, max_length, pad_to_multiple_of, task, TASKS)
        check_sampler(sampler, task)
        check_class_fraction(class_fraction, task)
        check_multilabel_options(task, label_columns, label_separator, examples_per_class)
        self.label_columns = [str(c) for c in label_columns] if label_columns else None
        self.label_separator = label_separator
        self.sampler, self.class_fraction = sampler, dict(class_fraction) if class_fraction else None
        self._set_split(
            val_fraction, test_fraction, max_train_examples, examples_per_class, max_eval_examples, split_seed
        )
        self._set_folds(folds, fold, group_column)
        self.preprocessing = preprocessing
        self.source_args: dict[str, Any] = dict(
            source=source,
            train_file=train_file,
            validation_file=validation_file,
            test_file=test_file,
            hub_name=hub_name,
            hub_config=hub_config,
            hub_splits=hub_splits,
            cache_dir=cache_dir,
        )
        self.columns = {
            "text_column": text_column,
            "text_pair_column": text_pair_column,
            "label_column": None if label_columns else label_column,
        }
        self.keep_labels, self.task = labels, task
        self.max_length = max_length
        self.bucketing, self.padding = bucketing, padding
        self.pad_to_multiple_of = pad_to_multiple_of
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        # split -> (texts, pairs) in dataset order: raw_inputs()
        self._raw: dict[str, tuple[list[str], list[str] | None]] = {}

    def _base_collate(self) -> PadCollator:
        if self.collate is None:
            width = self.max_length if self.padding == "max_length" else None
            self.collate = PadCollator(self.tokenizer.pad_token_id or 0, width, cap=self.max_length)
        return self.collate

    def _prompt(self) -> Any:
        """The template texts are put into (``prompt=verbalizer``: the backbone's preprocessing says), or None."""
        return getattr(self.preprocessing, "prompt", None)

    def feature_cache_blocker(self) -> str | None:
        if self.text_augment is not None:
            return "data.text_augment changes the training texts every epoch"
        return None  # tokenized once: the same ids every epoch

    def encode(self, inputs: list[Any], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """Texts (and second texts of pairs) tokenized as training tokenizes: same tokenizer, truncation at
        ``max_length``, token types for pairs; :meth:`collator` pads them as training batches are padded."""
        texts = [str(text) for text in inputs]
        arrays = tokenize_cached(self.tokenizer, texts, pairs, self.max_length, None, self._prompt())
        dataset = TokenizedText(arrays, np.zeros(len(texts), dtype=np.int64))
        items = []
        for i, text in enumerate(texts):
            item = dataset[i]
            del item["labels"]
            item["input"] = text
            if pairs is not None:
                item["pair"] = pairs[i]
            items.append(item)
        return items

    def raw_inputs(self, split: str) -> tuple[list[str], list[str] | None]:
        """The raw texts (and second texts of pairs) of ``split`` in its dataset's order (text attacks perturb them
        and :meth:`encode` them again: ``ftlab.robustness``)."""
        self.setup("fit")
        return self._raw[split]

    def _split(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """Hold out validation/test from train when the source lacks them; then subset the training split."""
        train = tables["train"].reset_index(drop=True)
        if self.class_fraction:
            labels = train[self.columns["label_column"]].to_numpy()
            kept = cut_classes(labels, self.class_fraction, self.holdout_seed)
            train = train.iloc[kept].reset_index(drop=True)
        missing = {s for s in ("validation", "test") if s not in tables}
        groups = group_values(train, self.group_column) if self.group_column else None
        indices = self._split_indices(self._stratify_on(train), missing, groups)
        tables = {
            **tables,
            **{split: train.iloc[index].reset_index(drop=True) for split, index in indices.items()},
        }
        for split in ("validation", "test"):  # data.max_eval_examples
            frame = tables[split]
            keep = self._eval_subset(split, self._stratify_on(frame))
            if keep is not None:
                tables[split] = frame.iloc[keep].reset_index(drop=True)
        return tables

    def _stratify_on(self, frame: pd.DataFrame) -> np.ndarray:
        """What splits and subsets of ``frame`` are stratified by: the class (regression targets fall back to a
        random split in ``sampling``); label sets are not stratified (a seeded random split)."""
        if self.task == "multilabel":
            return np.zeros(len(frame))
        label = frame[self.columns["label_column"]]
        return label.astype(str).to_numpy() if self.task == "classification" else label.to_numpy()

    def _clean(self, frame: pd.DataFrame, split: str) -> pd.DataFrame:
        text, pair, label = (self.columns[k] for k in ("text_column", "text_pair_column", "label_column"))
        require_columns(frame, self.columns, split)
        require_columns(
            frame, {f"label_columns[{i}]": c for i, c in enumerate(self.label_columns or [])}, split
        )
        used = [c for c in (text, pair, label, *(self.label_columns or [])) if c is not None]
        clean = frame.dropna(subset=used)
        if len(clean) < len(frame):
            log.warning(
                "Dropped %d %s rows with an empty %s.", len(frame) - len(clean), split, "/".join(used)
            )
        if self.keep_labels is not None and self.task == "classification":
            wanted = {str(v) for v in self.keep_labels}
            clean = clean[clean[label].astype(str).isin(wanted)]
        if clean.empty:
            raise DataError(
                f"The {split} data is empty after dropping rows without {'/'.join(used)}"
                + (
                    f" and keeping data.labels={list(self.keep_labels)}"
                    if self.keep_labels is not None
                    else ""
                )
                + ". Check the file and the column names."
            )
        return clean

    def setup(self, stage: str | None = None) -> None:
        if self.label_map is not None:
            return
        tables = load_text_source(**self.source_args)
        tables = {split: self._clean(frame, split) for split, frame in tables.items()}
        tables = self._split(tables)
        label = self.columns["label_column"]
        keep = self.keep_labels if self.keep_labels is not None else self.label_columns

        def values(frame: pd.DataFrame, split: str) -> list[Any]:
            args = (self.task, label, self.label_columns, self.label_separator, split)
            return table_labels(frame, *args)

        self.label_map = LabelMap.from_train(values(tables["train"], "train"), self.task, keep)
        tokenizer = self.tokenizer
        self._base_collate()
        for split in SPLITS:
            frame = tables[split]
            key = f"data.label_column={label!r}" if label else "data.label_columns"
            labels = self.label_map.encode(values(frame, split), split, key)
            pair_column = self.columns["text_pair_column"]
            texts = frame[self.columns["text_column"]].astype(str).tolist()
            pairs = frame[pair_column].astype(str).tolist() if pair_column else None
            arrays = tokenize_cached(tokenizer, texts, pairs, self.max_length, self.cache_dir, self._prompt())
            self.datasets[split] = TokenizedText(arrays, labels)
            if split == "train" and self.text_augment is not None:
                # clean ids from the cache; augmented copies tokenized when read (ftlab.augment.text)
                self.datasets[split] = AugmentedText(
                    self.datasets[split],
                    texts,
                    pairs,
                    tokenizer,
                    self.max_length,
                    self.text_augment,
                    self.seed,
                )
            self._raw[split] = (texts, pairs)
        sizes = ", ".join(f"{s}={len(d)}" for s, d in self.datasets.items())
        log.info(
            "Text data %s: %s; %d classes.", self.source_args["source"], sizes, self.label_map.num_classes
        )

    def collator(self, cuda: bool | None = None) -> PadCollator:
        """``self.collate`` with ``pad_to_multiple_of`` resolved for a CUDA device or not (default: the attached
        trainer's device)."""
        multiple = pad_multiple(self.pad_to_multiple_of, on_cuda(self.trainer) if cuda is None else cuda)
        collate = self._base_collate()
        if multiple == collate.multiple:
            return collate
        return PadCollator(collate.pad_id, collate.width, multiple, collate.cap)

    def train_sampler(self, dataset: TokenizedText) -> Sampler[int]:  # type: ignore[override]
        sampler = self._order(dataset)
        # augmented copies are drawn from (seed, epoch, index): the indices carry the epoch (ftlab.augment.seeding)
        if not isinstance(dataset, AugmentedText):
            return sampler
        return tag_epochs(sampler, len(dataset), self._epoch)

    def _order(self, dataset: TokenizedText) -> Sampler[int]:
        if not self.bucketing or self.sampler != "none":
            return super().train_sampler(dataset)
        trainer, epoch = self.trainer, self._epoch()
        # under DDP each rank takes its slice of every bucket (see LengthBucketSampler); Lightning leaves it as is
        return LengthBucketSampler(
            np.diff(dataset.offsets),
            self.batch_size,
            self.seed,
            epoch,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
