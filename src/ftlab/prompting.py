"""Prompts and label words, shared by ``zero_shot=llm`` (scoring) and ``prompt=verbalizer`` (fine-tuning).

A template holds the text (``{text}``) and, for a masked LM, the answer slot (``{mask}``, filled with the
tokenizer's mask token); a decoder's answer is the token after the template's end. A text too long for
``max_length`` is cut, never the template: the answer slot is always there.
"""

from __future__ import annotations

import string
from typing import Any

from ftlab.utils.errors import ConfigError, DataError

TEXT, PAIR, MASK = "text", "pair", "mask"


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of ``template`` in order, repeats included."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def check_template(template: str, key: str, masked: bool = False, pair: bool = False) -> str:
    """``template`` if it has ``{text}`` once (``masked``: ``{mask}`` once; ``pair``: ``{pair}`` once, the second
    text of text pairs) and no other field."""
    fields = template_fields(str(template))
    wanted = [TEXT] + ([PAIR] if pair else []) + ([MASK] if masked else [])
    if sorted(fields) != sorted(wanted):
        example = (
            ("'{text} ? {mask} , {pair}'" if pair else "'{text} It was {mask}.'")
            if masked
            else ("'{text}\\nQuestion: {pair}\\nAnswer:'" if pair else "'Review: {text}\\nSentiment:'")
        )
        named = " and ".join("{" + f + "}" for f in wanted)
        what = f"the fields {named}, once each," if len(wanted) > 1 else "the field {text}"
        hint = (
            " A decoder reads its answer after the template's last token: end the template where the label "
            "word would follow, without {mask}."
            if not masked and MASK in fields
            else ""
        )
        raise ConfigError(
            f"{key}={template!r} must contain {what} and no other field (it has "
            f"{fields or 'none'}), e.g. {key}={example}.{hint}"
        )
    return str(template)


def label_words_for(label_words: dict[str, Any] | None, label_names: list[str], key: str) -> list[list[str]]:
    """Per label (in ``label_names`` order) its words: ``label_words[name]`` (a word or a list), else the name."""
    given = {str(k): v for k, v in (label_words or {}).items()}
    unknown = sorted(set(given) - set(label_names))
    if unknown:
        raise ConfigError(
            f"{key} names {unknown}, which are not labels of the data ({label_names}). Give words for the "
            f"data's label names, e.g. {key}={{fresh:positive,rotten:negative}}."
        )
    words = []
    for name in label_names:
        value = given.get(name, name)
        listed = [str(value)] if isinstance(value, str | int | float) else [str(w) for w in value]
        if not listed or not all(w.strip() for w in listed):
            raise ConfigError(f"{key}.{name}={value!r}: give at least one non-empty word.")
        words.append(listed)
    return words


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The tokens of ``word`` as it follows the prompt: with a leading space, as a new word (``" positive"``)."""
    return list(tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"])


class PromptFormat:
    """A checked template and the mask token that fills its ``{mask}`` slot (``None``: a decoder's template).

    A plain class, not a dataclass: Hydra would turn a dataclass inside the preprocessing handed to the data
    module into a config node and drop its methods.
    """

    def __init__(self, template: str, mask_token: str | None = None):
        self.template, self.mask_token = template, mask_token

    def key(self) -> str:
        """What the token ids depend on besides the tokenizer and the texts (the tokenization cache's key)."""
        return f"prompt\x02{self.template}\x02{self.mask_token}"

    def fill(self, text: str, pair: str = "") -> str:
        if self.mask_token is None:
            return self.template.format(text=text, pair=pair)
        # a mask token inside a text would be a second answer slot: the template's is the only one
        blank = self.mask_token
        return self.template.format(text=text.replace(blank, " "), pair=pair.replace(blank, " "), mask=blank)

    def encode(
        self, tokenizer: Any, texts: list[str], max_length: int, pairs: list[str] | None = None
    ) -> list[list[int]]:
        """Token ids of each filled template (with the tokenizer's special tokens), at most ``max_length``."""
        if (PAIR in template_fields(self.template)) != (pairs is not None):
            raise DataError(
                f"The prompt template {self.template!r} and the data do not match: a template for text pairs "
                "(data.text_pair_column) holds {pair}, one for single texts does not. Fix prompt.template or "
                "data.text_pair_column."
            )
        seconds = pairs if pairs is not None else [""] * len(texts)
        ids = tokenizer([self.fill(t, p) for t, p in zip(texts, seconds, strict=True)])["input_ids"]
        return [
            list(row) if len(row) <= max_length else self._fit(tokenizer, text, pair, max_length)
            for text, pair, row in zip(texts, seconds, ids, strict=True)
        ]

    def _fit(self, tokenizer: Any, text: str, pair: str, max_length: int) -> list[int]:
        """The template around the longest starts of ``text`` (and ``pair``: the longer one is cut first) that fit
        ``max_length`` tokens."""
        overhead = len(tokenizer(self.fill("", ""))["input_ids"])
        if overhead >= max_length:
            raise ConfigError(
                f"The prompt template {self.template!r} alone takes {overhead} tokens, data.max_length="
                f"{max_length} leaves no room for the text. Raise data.max_length or shorten prompt.template."
            )
        ends = [_token_ends(tokenizer, text), _token_ends(tokenizer, pair) if pair else []]
        keep = [len(ends[0]), len(ends[1])]
        while True:  # joint tokenization may merge across the seams: cut further until it fits
            cut = [t[: e[k - 1]] if k else "" for t, e, k in zip((text, pair), ends, keep, strict=True)]
            ids = tokenizer(self.fill(*cut))["input_ids"]
            if len(ids) <= max_length or keep == [0, 0]:
                return list(ids)
            for _ in range(len(ids) - max_length):  # longest first, as tokenizers truncate pairs
                if keep != [0, 0]:
                    keep[int(keep[1] > keep[0])] -= 1


def _token_ends(tokenizer: Any, text: str) -> list[int]:
    """The character offset where each token of ``text`` ends (whitespace words for a tokenizer without offsets)."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [end for _, end in offsets]
    except NotImplementedError:  # a slow (Python) tokenizer: cut between words
        ends, position = [], 0
        for word in text.split():
            position = text.index(word, position) + len(word)
            ends.append(position)
        return ends
