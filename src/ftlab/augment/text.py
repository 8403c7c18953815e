"""Text augmentation during training (``data.text_augment``): EDA and character noise, drawn afresh every epoch.

How it meets the token cache: the clean training texts are tokenized once and cached as before
(:func:`ftlab.data.text.tokenize_cached`); :class:`AugmentedText` serves those cached ids for the clean copy of each
example and tokenizes an augmented copy when it is read (``__getitem__``, in the loader workers when there are
any). An epoch holds ``n_aug`` augmented copies of every training example, plus the clean one with
``keep_original`` (Wei & Zou's ``n_aug``: the training set grows by that factor, and so do the steps per epoch).
Copy ``k`` of example ``i`` in epoch ``e`` is drawn from a generator seeded by (``seed``, ``e``, its index in the
epoch's set), so it does not depend on workers, order or the global random state, and a resumed run sees the
same texts as the uninterrupted one. Validation and test data are never augmented.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ftlab.augment import text_ops
from ftlab.augment.seeding import example_rng, untag
from ftlab.utils.errors import ConfigError, options_for

OPS = ("eda", "char_noise")


@dataclass(frozen=True)
class TextAugment:
    """The options of ``data.text_augment``.

    Args:
        ops: what one augmented copy applies, chosen uniformly per copy: ``eda`` (one of EDA's four operations,
            itself chosen uniformly among those with a non-zero rate) and/or ``char_noise`` (typos). ``[]``: no
            augmentation (so that a sweep can switch it off: ``data.text_augment.ops=[],[eda]``).
        n_aug: augmented copies of each training example per epoch.
        keep_original: also keep the clean example in every epoch.
        alpha_sr, alpha_ri, alpha_rs: EDA's share of words replaced by synonyms / synonyms inserted / swapped.
        p_rd: EDA's probability of deleting each word. Wei & Zou use 0.1 for all four.
        char_p: probability of a typo per letter (``char_noise``); char_ops: which typos
            (``swap``, ``insert``, ``delete``, ``keyboard``).
    """

    ops: tuple[str, ...] = ("eda",)
    n_aug: int = 1
    keep_original: bool = True
    alpha_sr: float = 0.1
    alpha_ri: float = 0.1
    alpha_rs: float = 0.1
    p_rd: float = 0.1
    char_p: float = 0.05
    char_ops: tuple[str, ...] = text_ops.CHAR_OPS

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None) -> TextAugment | None:
        """Check ``data.text_augment`` and build it; ``None``, ``{}`` or ``ops: []`` mean no augmentation."""
        args = options_for(cls, value, "data.text_augment", "{ops: [eda], n_aug: 1}")
        if args is None:
            return None
        for key in ("ops", "char_ops"):
            if key in args:
                items = args[key]
                args[key] = (items,) if isinstance(items, str) else tuple(str(v) for v in items)
        made = cls(**args)
        if "ops" in args and not made.ops:
            return None
        made.check()
        return made

    def check(self) -> None:
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise ConfigError(f"data.text_augment.ops={list(self.ops)}: choose one or more of {list(OPS)}.")
        if not isinstance(self.n_aug, int) or self.n_aug < 1:
            raise ConfigError(f"data.text_augment.n_aug={self.n_aug!r} must be a whole number >= 1.")
        for key in ("alpha_sr", "alpha_ri", "alpha_rs", "p_rd", "char_p"):
            rate = getattr(self, key)
            if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
                raise ConfigError(f"data.text_augment.{key}={rate!r} must be a rate in [0, 1].")
        bad = [op for op in self.char_ops if op not in text_ops.CHAR_OPS]
        if bad or not self.char_ops:
            raise ConfigError(
                f"data.text_augment.char_ops={list(self.char_ops)}: choose one or more of {list(text_ops.CHAR_OPS)}."
            )

    @property
    def copies(self) -> int:
        """Copies of each example per epoch (the clean one counted when kept)."""
        return self.n_aug + int(self.keep_original)

    def apply(self, text: str, rng: random.Random) -> str:
        """One augmented copy of ``text``."""
        op = self.ops[rng.randrange(len(self.ops))]
        if op == "char_noise":
            return text_ops.char_noise(text, self.char_p, rng, self.char_ops)
        return text_ops.eda(text, rng, self.alpha_sr, self.alpha_ri, self.alpha_rs, self.p_rd)


class AugmentedText(Dataset):
    """The training split with ``augment.copies`` copies of each example per epoch (see the module docstring).

    Index ``copy * n + i`` (``n`` examples) is copy ``copy`` of example ``i``; with ``keep_original`` copy 0 is
    the clean example, read from the token cache. Indices carry the epoch (:mod:`ftlab.augment.seeding`).
    """

    def __init__(
        self,
        base: Any,
        texts: list[str],
        pairs: list[str] | None,
        tokenizer: Any,
        max_length: int,
        augment: TextAugment,
        seed: int,
    ):
        self.base, self.texts, self.pairs = base, texts, pairs
        self.tokenizer, self.max_length, self.augment, self.seed = tokenizer, max_length, augment, seed
        self.num_examples = len(base)
        copies = augment.copies
        self.labels = np.concatenate([np.asarray(base.labels)] * copies)
        lengths = np.tile(np.diff(base.offsets), copies)  # the clean lengths: what length buckets sort by
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.type_ids = base.type_ids

    def __len__(self) -> int:
        return self.num_examples * self.augment.copies

    def text(self, tagged: int) -> tuple[str, str | None]:
        """The (augmented) text and pair of a tagged index."""
        epoch, index = untag(tagged, len(self))
        copy, example = divmod(index, self.num_examples)
        text, pair = self.texts[example], self.pairs[example] if self.pairs is not None else None
        if copy == 0 and self.augment.keep_original:
            return text, pair
        rng = example_rng(self.seed, epoch, index, "text")
        text = self.augment.apply(text, rng)
        return text, self.augment.apply(pair, rng) if pair is not None else None

    def __getitem__(self, tagged: int) -> dict[str, Any]:
        _, index = untag(tagged, len(self))
        copy, example = divmod(index, self.num_examples)
        if copy == 0 and self.augment.keep_original:
            return self.base[example]  # the cached clean ids
        text, pair = self.text(tagged)
        encoded = self.tokenizer(
            text,
            pair,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=pair is not None,
        )
        item = {"input_ids": np.asarray(encoded["input_ids"], dtype=np.int32), "labels": self.labels[index]}
        if pair is not None:
            item["token_type_ids"] = np.asarray(encoded["token_type_ids"], dtype=np.int8)
        return item
