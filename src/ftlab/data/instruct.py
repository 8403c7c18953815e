"""Instruction-tuning data (``data.task=causal_lm``): conversations formatted, tokenized, labelled on responses.

A conversation is rendered with the tokenizer's chat template when it has one (``chat_template: auto``), else as
plain text (``prompt\\nresponse<eos>``). The rendered text is cut at each assistant turn (the template's rendering
of the first ``i`` messages plus its generation prompt is a prefix of the rendering of ``i + 1``), and each piece
is tokenized on its own, so the prompt tokens are exactly what generation later starts from. Labels are the
response tokens (the assistant's text and the template's end-of-turn); prompt and padding get IGNORE_INDEX.

Too long: the prompt loses tokens from its middle (its start, the template header, and its end, next to the
response, are kept); only when no prompt is left to cut is the response cut at ``max_length``.

Packing (``packing: true``, training only): examples are concatenated into rows of at most ``max_length``; each
keeps its own ``position_ids`` from 0 and rows carry no attention mask, which HF decoders read as packed
sequences and answer with a block-diagonal causal mask, so attention does not cross examples.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ftlab.data.base import ClassificationDataModule
from ftlab.data.instruct_format import ConversationFormat, cut_middle, encode_conversation
from ftlab.data.instruct_sources import Conversation, load_conversations
from ftlab.data.labels import LabelMap
from ftlab.data.samplers import LengthBucketSampler
from ftlab.data.text import TextPreprocessing, TokenizerOwner, check_text_settings
from ftlab.tasks.base import IGNORE_INDEX
from ftlab.utils.devices import on_cuda, pad_multiple, padded_width
from ftlab.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)
TASK = "causal_lm"
SPLITS = ("train", "validation", "test")


class InstructExamples(Dataset):
    """Token ids and labels per example (or per packed row, with ``position_ids``)."""

    def __init__(
        self, ids: list[np.ndarray], labels: list[np.ndarray], positions: list[np.ndarray] | None = None
    ):
        self.ids, self.labels, self.positions = ids, labels, positions

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.ids])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input_ids": self.ids[index], "labels": self.labels[index]}
        if self.positions is not None:
            item["position_ids"] = self.positions[index]
        return item


def pack(examples: InstructExamples, max_length: int, seed: int) -> InstructExamples:
    """Examples in a seeded order, concatenated greedily into rows of at most ``max_length`` tokens."""
    rows: list[list[int]] = [[]]
    for i in np.random.default_rng(seed).permutation(len(examples)):
        if rows[-1] and sum(len(examples.ids[j]) for j in rows[-1]) + len(examples.ids[i]) > max_length:
            rows.append([])
        rows[-1].append(int(i))
    joined = [
        [np.concatenate([getattr(examples, a)[j] for j in row]) for row in rows] for a in ("ids", "labels")
    ]
    positions = [np.concatenate([np.arange(len(examples.ids[j])) for j in row]) for row in rows]
    return InstructExamples(joined[0], joined[1], positions)


class CausalLMCollator:
    """Right-pads ids (pad id), labels (IGNORE_INDEX) and builds the attention mask; packed rows get
    ``position_ids`` instead of a mask (the padding continues as one more sequence, never scored)."""

    def __init__(self, pad_id: int, multiple: int = 1, cap: int | None = None):
        self.pad_id, self.multiple, self.cap = pad_id, multiple, cap

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = padded_width(max(len(item["input_ids"]) for item in items), self.multiple, self.cap)
        ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        positions = np.tile(np.arange(width), (len(items), 1))
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], mask[row, :n] = item["input_ids"], 1
            if "labels" in item:
                labels[row, :n] = item["labels"]
            if "position_ids" in item:
                positions[row, :n], positions[row, n:] = item["position_ids"], np.arange(width - n)
        batch = {"input_ids": torch.from_numpy(ids)}
        if "position_ids" in items[0]:
            batch["position_ids"] = torch.from_numpy(positions)
        else:
            batch["attention_mask"] = torch.from_numpy(mask)
        if "labels" in items[0]:
            batch["labels"] = torch.from_numpy(labels)
        return batch


class InstructDataModule(TokenizerOwner, ClassificationDataModule):
    """Prompt/response pairs or chat conversations for instruction tuning (``data.task=causal_lm``).

    Args:
        preprocessing: the backbone's :class:`~ftlab.data.text.TextPreprocessing` (tokenizer, longest input).
        source: ``files`` (tables with ``prompt_column``/``response_column`` or a ``messages_column``), or an
            embedded demonstration set: ``rotten_tomatoes`` (review -> fresh/rotten) or ``wnut16`` (tweet ->
            entity list).
        train_file, validation_file, test_file: tables for ``source=files``; missing splits are cut from train.
        prompt_column, response_column, messages_column: the tables' columns.
        chat_template: ``auto`` (the tokenizer's template when it has one), ``true`` or ``false`` (plain text).
        system_prompt: a system message put first when a conversation has none.
        packing: several training examples per row (see the module docstring); validation/test are never packed.
        val_fraction, test_fraction: held out from train (seeded; stratified for the embedded sets).
        max_train_examples: a seeded subset of the training split. max_eval_examples: a seeded subset of
            validation and test (stratified by answer where the split was cut from an embedded set).
        split_seed: seeds the held-out splits and their subsets in place of ``seed`` (null: ``seed``).
        max_length: tokens per example (or packed row), at most the backbone's limit.
        batch_size, eval_batch_size, num_workers, seed, pin_memory, pad_to_multiple_of, bucketing: as in
            :class:`~ftlab.data.text.TextClassificationDataModule`.
    """

    task = TASK

    def __init__(
        self,
        preprocessing: TextPreprocessing,
        source: str = "files",
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str = "messages",
        chat_template: bool | str = "auto",
        system_prompt: str | None = None,
        task: str = TASK,
        packing: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        split_seed: int | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        seed: int = 0,
        bucketing: bool = True,
        pin_memory: bool | str = "auto",
        pad_to_multiple_of: int | str = "auto",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, seed, pin_memory)
        check_text_settings(preprocessing, max_length, pad_to_multiple_of, task, (TASK,))
        self._set_split(val_fraction, test_fraction, max_train_examples, None, max_eval_examples, split_seed)
        self.preprocessing, self.max_length, self.packing = preprocessing, max_length, packing
        self.source = source
        self.files = {"train_file": train_file, "validation_file": validation_file, "test_file": test_file}
        self.columns = {
            "prompt_column": prompt_column,
            "response_column": response_column,
            "messages_column": messages_column,
        }
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.bucketing, self.pad_to_multiple_of = bucketing, pad_to_multiple_of
        self._format: ConversationFormat | None = None

    @property
    def format(self) -> ConversationFormat:
        if self._format is None:
            self._format = ConversationFormat(self.tokenizer, self.chat_template, self.system_prompt)
        return self._format

    @property
    def num_classes(self) -> int:
        return len(self.tokenizer)  # the LM's outputs: one per token

    def _split(self, tables: dict[str, list[Conversation]], strata: np.ndarray | None) -> dict[str, list]:
        train = tables["train"]
        missing = {s for s in ("validation", "test") if s not in tables}
        labels = strata if strata is not None else np.zeros(len(train), dtype=np.int64)
        indices = self._split_indices(labels, missing)
        splits = {**tables, **{split: [train[i] for i in index] for split, index in indices.items()}}
        for split in ("validation", "test"):  # data.max_eval_examples: stratified where the split was cut
            cut = strata is not None and split in indices
            keep = self._eval_subset(split, labels[indices[split]] if cut else np.zeros(len(splits[split])))
            if keep is not None:
                splits[split] = [splits[split][i] for i in keep]
        return splits

    def _encode_split(self, conversations: list[Conversation], split: str) -> InstructExamples:
        ids, labels, cut = [], [], 0
        for messages in conversations:
            x, y, truncated = encode_conversation(self.format, messages, self.max_length)
            ids.append(x)
            labels.append(y)
            cut += truncated
        if cut:
            log.warning(
                "%d of %d %s examples were longer than data.max_length=%d and cut.",
                cut,
                len(ids),
                split,
                self.max_length,
            )
        if not any(bool((y != IGNORE_INDEX).any()) for y in labels):
            raise DataError(
                f"No {split} example keeps a response token within data.max_length={self.max_length}."
            )
        return InstructExamples(ids, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.label_map is not None:
            return
        tables, strata = load_conversations(self.source, self.files, self.columns)
        tables = self._split(tables, strata)
        for split in SPLITS:
            self.datasets[split] = self._encode_split(tables[split], split)
        if self.packing:
            self.datasets["train"] = pack(self.datasets["train"], self.max_length, self.seed)
        self.label_map = LabelMap(None, TASK)
        self.collator()
        sizes = ", ".join(f"{s}={len(d)}" for s, d in self.datasets.items())
        log.info(
            "Instruction data %s: %s%s.",
            self.source,
            sizes,
            " (train packed into rows)" if self.packing else "",
        )

    # --- public API ----------------------------------------------------------------------------------------
    def class_counts(self) -> list[int] | None:
        return None

    def feature_cache_blocker(self) -> str | None:
        return "a causal LM's features are its logits over the vocabulary, too large to cache"

    def collator(self, cuda: bool | None = None) -> CausalLMCollator:
        tokenizer = self.tokenizer
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )
        multiple = pad_multiple(self.pad_to_multiple_of, on_cuda(self.trainer) if cuda is None else cuda)
        if self.collate is None or self.collate.multiple != multiple:
            self.collate = CausalLMCollator(pad_id, multiple, self.max_length)
        return self.collate

    def encode(self, inputs: list[Any], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """Raw prompts as the start of a conversation, the assistant's turn opened (what generation continues);
        a prompt longer than ``max_length`` keeps its start and end."""
        if pairs is not None:
            raise ConfigError(
                "An instruction-tuned model takes single prompts; the inputs have a second column."
            )
        items = []
        for text in inputs:
            prompt = self.format.prompt([{"role": "user", "content": str(text)}])
            ids = self.tokenizer(prompt, add_special_tokens=not self.format.templated)["input_ids"]
            if len(ids) > self.max_length:
                ids = cut_middle(ids, self.max_length)
            items.append({"input_ids": np.asarray(ids, dtype=np.int64), "input": str(text)})
        return items

    def train_sampler(self, dataset: InstructExamples) -> Sampler[int]:  # type: ignore[override]
        if not self.bucketing or self.packing:
            return super().train_sampler(dataset)
        trainer = self.trainer
        return LengthBucketSampler(
            dataset.lengths(),
            self.batch_size,
            self.seed,
            self._epoch(),
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
