"""Unlabelled text for masked-LM adaptation (``data.task=masked_lm``): BERT-style masking, seeded per example.

Any text source of :class:`~ftlab.data.text.TextClassificationDataModule` works (a text column of a table, the
HF hub, the embedded corpora: for ``rotten_tomatoes`` every text, the unlabelled plot summaries included); no label
column is read. Masking is transformers' ``DataCollatorForLanguageModeling`` (15% of the tokens, of which 80%
become ``[MASK]``, 10% a random token, 10% stay; or whole words), applied to each example with a generator seeded
by ``(seed, split, epoch, index)``:

- training masks change every epoch but are a function of (seed, epoch, example) only: not of the batch size, the
  batch order, the loader workers or a resume mid-epoch (the training sampler tags each index with its epoch, so
  workers that persist across epochs still know it);
- validation and test masks are fixed (epoch 0 of their own streams), so perplexities compare across epochs/runs.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ftlab.augment.seeding import tag_epochs, untag
from ftlab.data.labels import LabelMap
from ftlab.data.sources import SPLITS, load_text_source, read_table
from ftlab.data.text import PadCollator, TextClassificationDataModule, tokenize_cached
from ftlab.tasks.base import IGNORE_INDEX
from ftlab.utils.devices import on_cuda, pad_multiple
from ftlab.utils.errors import ConfigError, DataError, DataFileError

log = logging.getLogger(__name__)

TASK = "masked_lm"
MASKING = {"probability": 0.15, "whole_word": False, "replace_mask": 0.8, "replace_random": 0.1}
STREAMS = {"train": 0, "validation": 1, "test": 2}
# data options that need labels: refused (named) rather than ignored
COMPRESSED = {".gz", ".bz2", ".xz"}
LABELLED_OPTIONS = (
    "labels",
    "examples_per_class",
    "class_fraction",
    "label_columns",
    "folds",
    "text_augment",
)


def is_plain_text(path: str | None) -> bool:
    """Whether ``path`` names a plain text file (``.txt``, optionally compressed)."""
    return bool(path) and [x for x in Path(str(path)).suffixes if x not in COMPRESSED][-1:] == [".txt"]


def read_lines(path: str, key: str, column: str) -> pd.DataFrame:
    """A plain text file, one text per line (blank lines dropped), as a one-column table named ``column``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataFileError(f"{key}={str(file)!r}: no such file (working directory: {Path.cwd()}).")
    opener: Any = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(file.suffix.lower(), open)
    try:
        with opener(file, "rt", encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise DataFileError(f"{key}={str(file)!r} could not be read as UTF-8 text lines: {err}") from err
    return pd.DataFrame({column: [line for line in lines if line]})


def mask_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one example's mask, from (seed, split, epoch, index) through numpy's ``SeedSequence``."""
    high, low = np.random.SeedSequence([seed % 2**32, stream, epoch, index]).generate_state(2)
    return (int(high) << 31) | (int(low) >> 1)


def check_masking(masking: dict[str, Any] | None) -> dict[str, Any]:
    """``data.masking`` with defaults filled in; unknown keys and out-of-range values named."""
    given = dict(masking or {})
    unknown = sorted(set(given) - set(MASKING))
    if unknown:
        raise ConfigError(f"data.masking.{unknown[0]} is not a masking option; use {', '.join(MASKING)}.")
    options = {**MASKING, **given}
    for key in ("probability", "replace_mask", "replace_random"):
        if not 0.0 <= float(options[key]) <= 1.0:
            raise ConfigError(f"data.masking.{key}={options[key]} must be between 0 and 1.")
    if float(options["replace_mask"]) + float(options["replace_random"]) > 1.0:
        raise ConfigError(
            f"data.masking.replace_mask + replace_random = {options['replace_mask']} + "
            f"{options['replace_random']} exceeds 1 (the rest of the masked tokens stay as they are)."
        )
    if options["whole_word"]:  # transformers 5: whole-word masking replaces every selected token by [MASK]
        options.update(replace_mask=1.0, replace_random=0.0)
    return options


class MaskedText(Dataset):
    """Token ids stored flat; an item is an example plus the seed of its mask. Keys are ``epoch * n + index``
    (training: :func:`ftlab.augment.seeding.tag_epochs`) or plain indices (epoch 0)."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int, stream: int):
        self.ids, self.offsets = arrays["input_ids"], arrays["offsets"]
        self.type_ids, self.spans = arrays.get("token_type_ids"), arrays.get("offset_mapping")
        self.seed, self.stream = seed, stream
        self.labels = np.zeros(len(self), dtype=np.int64)  # no labels: the masks make them

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, index = untag(key, len(self))
        start, end = self.offsets[index], self.offsets[index + 1]
        item = {
            "input_ids": self.ids[start:end],
            "mask_seed": mask_seed(self.seed, self.stream, epoch, index),
        }
        if self.type_ids is not None:
            item["token_type_ids"] = self.type_ids[start:end]
        if self.spans is not None:
            item["offset_mapping"] = self.spans[start:end]
        return item


class MaskingCollator(PadCollator):
    """Masks each item with its own seeded generator (``DataCollatorForLanguageModeling.torch_mask_tokens``), then
    pads ids, mask and labels (IGNORE_INDEX where nothing is predicted). Items without ``mask_seed`` (raw inputs to
    predict, holding the user's own mask tokens) are only padded."""

    def __init__(self, tokenizer: Any, masking: dict[str, Any], pad_id: int, *args: Any):
        super().__init__(pad_id, *args)
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer, self.masking = tokenizer, masking
        self.hf = DataCollatorForLanguageModeling(
            tokenizer,
            mlm_probability=float(masking["probability"]),
            whole_word_mask=bool(masking["whole_word"]),
            mask_replace_prob=float(masking["replace_mask"]),
            random_replace_prob=float(masking["replace_random"]),
        )
        self.special = np.asarray(sorted(tokenizer.all_special_ids))

    def with_multiple(self, multiple: int) -> MaskingCollator:
        return MaskingCollator(self.tokenizer, self.masking, self.pad_id, self.width, multiple, self.cap)

    def mask(self, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(masked ids, labels) of one example."""
        ids = torch.as_tensor(np.asarray(item["input_ids"], dtype=np.int64))[None]
        special = torch.from_numpy(np.isin(item["input_ids"], self.special).astype(np.int64))[None]
        spans = item.get("offset_mapping")
        self.hf.generator = torch.Generator().manual_seed(int(item["mask_seed"]))
        try:
            masked, labels = self.hf.torch_mask_tokens(
                ids, special_tokens_mask=special, offset_mapping=None if spans is None else spans[None]
            )
        finally:  # a torch.Generator cannot be pickled: the collator travels to spawned workers / ranks
            self.hf.generator = None
        return masked[0].numpy(), labels[0].numpy()

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "mask_seed" not in items[0]:
            return super().__call__(items)
        masked = [self.mask(item) for item in items]
        keep = ("token_type_ids",)
        batch = super().__call__(
            [
                {"input_ids": ids, **{k: item[k] for k in keep if k in item}}
                for (ids, _), item in zip(masked, items, strict=True)
            ]
        )
        labels = np.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=np.int64)
        for row, (_, target) in enumerate(masked):
            labels[row, : len(target)] = target
        batch["labels"] = torch.from_numpy(labels)
        return batch


class MaskedTextDataModule(TextClassificationDataModule):
    """Unlabelled texts, masked per example (see the module docstring). ``TextClassificationDataModule`` with
    ``task=masked_lm`` builds one, so every text data config serves masked-LM adaptation.

    Args:
        masking: ``probability`` (0.15), ``whole_word`` (false), ``replace_mask`` (0.8) and ``replace_random``
            (0.1): of the selected tokens, the shares replaced by the mask token and by a random token (the rest
            stay). Whole-word masking replaces every selected token by the mask token (transformers 5).
        exclude_eval_texts: leave out every text that a labelled run on the same source validates or tests on
            (the same ``data.split_seed`` or ``seed``, fractions and files; ``TextClassificationDataModule``'s
            split), so that adaptation never sees the later classifier's held-out texts. Needs a labelled source.
        Every other argument as in :class:`~ftlab.data.text.TextClassificationDataModule`; the label options are
        refused.
    """

    def __init__(
        self,
        preprocessing: Any,
        masking: dict[str, Any] | None = None,
        exclude_eval_texts: bool = False,
        **kwargs: Any,
    ):
        refused = [k for k in LABELLED_OPTIONS if kwargs.get(k) is not None]
        refused += ["sampler"] if kwargs.get("sampler", "none") != "none" else []
        if refused:
            raise ConfigError(
                f"data.{refused[0]}={kwargs[refused[0]]!r} does not apply to data.task=masked_lm (unlabelled text, "
                f"masked per example); set data.{refused[0]}=null (data.sampler=none)."
            )
        kwargs["task"] = "classification"  # the parent's label checks pass; no label is read below
        # what a labelled run on this source would be given (its held-out split: exclude_eval_texts)
        self.labelled_args = {**kwargs, "max_train_examples": None, "max_eval_examples": None}
        self.exclude_eval_texts = bool(exclude_eval_texts)
        super().__init__(preprocessing, **kwargs)
        self.task = TASK
        self.columns["label_column"] = None
        self.masking = check_masking(masking)

    def setup(self, stage: str | None = None) -> None:
        if self.label_map is not None:
            return
        tables = self._load()
        tables = {split: self._clean(frame, split) for split, frame in tables.items()}
        if self.exclude_eval_texts:
            tables = self._without_eval_texts(tables)
        train = tables["train"].reset_index(drop=True)
        missing = {s for s in ("validation", "test") if s not in tables}
        indices = self._split_indices(np.zeros(len(train)), missing)  # random, seeded: nothing to stratify
        tables.update({split: train.iloc[index] for split, index in indices.items()})
        tokenizer = self.tokenizer
        if tokenizer.mask_token_id is None:
            raise ConfigError(
                f"The tokenizer of {self.preprocessing.tokenizer!r} has no mask token, so it cannot train a masked "
                "LM; use a BERT-style model (model=minilm, bert) or another task."
            )
        self.label_map = LabelMap(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), TASK)
        for split in SPLITS:
            self.datasets[split] = MaskedText(self._tokenize(tables[split]), self.seed, STREAMS[split])
        sizes = ", ".join(f"{s}={len(d)}" for s, d in self.datasets.items())
        log.info("Masked-LM text %s: %s texts; masking %s.", self.source_args["source"], sizes, self.masking)

    def _without_eval_texts(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """``tables`` less the texts a labelled run on this source holds out for validation and test."""
        try:
            labelled = TextClassificationDataModule(self.preprocessing, **self.labelled_args)
            held = labelled._split(
                {s: labelled._clean(f, s) for s, f in load_text_source(**labelled.source_args).items()}
            )
        except (ConfigError, DataError) as err:
            raise ConfigError(
                "data.exclude_eval_texts=true leaves out the texts a labelled run on this source validates and "
                "tests on, so it needs the source's labels (data.label_column), which could not be read: "
                f"{err} Set data.exclude_eval_texts=false for unlabelled text."
            ) from err
        text = str(self.columns["text_column"])
        eval_texts = set(held["validation"][text].astype(str)) | set(held["test"][text].astype(str))
        kept = {s: f[~f[text].astype(str).isin(eval_texts)] for s, f in tables.items()}
        log.info(
            "data.exclude_eval_texts: left out %d texts that labelled runs (split seed %d) validate or test on.",
            sum(len(f) - len(kept[s]) for s, f in tables.items()),
            labelled.holdout_seed,
        )
        return kept

    def _load(self) -> dict[str, pd.DataFrame]:
        """The source's tables; with ``source=files``, a ``.txt`` file is read as one text per line."""
        args = self.source_args
        files = {split: args[f"{split}_file"] for split in SPLITS if args.get(f"{split}_file")}
        if args["source"] != "files" or "train" not in files or not any(map(is_plain_text, files.values())):
            return load_text_source(**args, unlabelled=True)
        column = str(self.columns["text_column"])
        return {
            split: read_lines(path, f"data.{split}_file", column)
            if is_plain_text(path)
            else read_table(path, f"data.{split}_file")
            for split, path in files.items()
        }

    def _tokenize(self, frame: Any) -> dict[str, np.ndarray]:
        texts = frame[self.columns["text_column"]].astype(str).tolist()
        pair = self.columns["text_pair_column"]
        pairs = frame[pair].astype(str).tolist() if pair else None
        if not self.masking["whole_word"]:
            return tokenize_cached(self.tokenizer, texts, pairs, self.max_length, self.cache_dir)
        # whole words: transformers finds word starts from the character offsets of each token
        encoded = self.tokenizer(
            texts, pairs, truncation=True, max_length=self.max_length, return_offsets_mapping=True
        )
        lengths = [len(ids) for ids in encoded["input_ids"]]
        arrays = {
            "input_ids": np.concatenate([np.asarray(x, dtype=np.int32) for x in encoded["input_ids"]]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]),
            "offset_mapping": np.concatenate(
                [np.asarray(x, dtype=np.int64) for x in encoded["offset_mapping"]]
            ),
        }
        if pairs is not None:
            arrays["token_type_ids"] = np.concatenate([np.asarray(x) for x in encoded["token_type_ids"]])
        return arrays

    def _base_collate(self) -> MaskingCollator:  # type: ignore[override]
        if self.collate is None:
            width = self.max_length if self.padding == "max_length" else None
            pad = self.tokenizer.pad_token_id or 0
            self.collate = MaskingCollator(self.tokenizer, self.masking, pad, width, 1, self.max_length)
        return self.collate

    def collator(self, cuda: bool | None = None) -> MaskingCollator:  # type: ignore[override]
        multiple = pad_multiple(self.pad_to_multiple_of, on_cuda(self.trainer) if cuda is None else cuda)
        collate = self._base_collate()
        return collate if multiple == collate.multiple else collate.with_multiple(multiple)

    def train_sampler(self, dataset: MaskedText) -> Sampler[int]:  # type: ignore[override]
        # the parent's order (length buckets or a seeded shuffle); the indices carry the epoch for the masks
        return tag_epochs(self._order(dataset), len(dataset))  # type: ignore[arg-type]

    def encode(self, inputs: list[Any], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """Raw texts with the tokenizer's mask token (``[MASK]``) where a token is to be predicted (fill-mask)."""
        items = super().encode(inputs, pairs)
        for item in items:
            item["mask_positions"] = np.flatnonzero(
                item["input_ids"] == self.tokenizer.mask_token_id
            ).tolist()
        return items

    def class_counts(self) -> list[int] | None:
        return None

    def feature_cache_blocker(self) -> str | None:
        return "masked-LM training draws new masks every epoch"
