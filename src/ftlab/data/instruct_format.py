"""Formatting conversations for a causal LM: chat template or plain text, response-only labels, truncation."""

from __future__ import annotations

from typing import Any

import numpy as np

from ftlab.data.instruct_sources import Conversation
from ftlab.tasks.base import IGNORE_INDEX
from ftlab.utils.errors import ConfigError

KEEP_PROMPT_HEAD = 8  # tokens kept at the start of a cut prompt (the template's header)


class ConversationFormat:
    """Renders conversations as (text, is_response) pieces with the tokenizer's chat template or as plain text."""

    def __init__(self, tokenizer: Any, chat_template: bool | str = "auto", system_prompt: str | None = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template not in ("auto", True, False):
            raise ConfigError(f"data.chat_template={chat_template!r}: use auto, true or false.")
        if chat_template is True and not has_template:
            raise ConfigError(
                "data.chat_template=true, but the tokenizer has no chat template; use data.chat_template=auto "
                "(plain 'prompt\\nresponse' text then) or a model whose tokenizer ships one."
            )
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.templated = has_template if chat_template == "auto" else bool(chat_template)

    def _with_system(self, messages: Conversation) -> Conversation:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, messages: Conversation, generation_prompt: bool) -> str:
        if self.templated:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
            return str(text)
        eos = self.tokenizer.eos_token or ""
        parts = [m["content"] + (eos if m["role"] == "assistant" else "\n") for m in messages]
        return "".join(parts)

    def pieces(self, messages: Conversation) -> list[tuple[str, bool]]:
        """The conversation as consecutive text pieces, each marked response (an assistant turn) or not."""
        messages = self._with_system(messages)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True)
            after = self.render(messages[: i + 1], generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise ConfigError(
                    "The tokenizer's chat template does not render a conversation as a prefix of its "
                    "continuation, so response tokens cannot be told apart; set data.chat_template=false."
                )
            pieces += [(before[len(done) :], False), (after[len(before) :], True)]
            done = after
        return [(text, response) for text, response in pieces if text]

    def prompt(self, messages: Conversation) -> str:
        """The text generation starts from: the conversation so far and the assistant's turn opened."""
        return self.render(self._with_system(messages), generation_prompt=True)


def cut_middle(ids: list[int], keep: int) -> list[int]:
    head = min(KEEP_PROMPT_HEAD, keep // 2)
    return ids[:head] + ids[len(ids) - (keep - head) :] if keep > head else ids[:keep]


def encode_conversation(
    fmt: ConversationFormat, messages: Conversation, max_length: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(input ids, labels, truncated): labels hold the response token ids and IGNORE_INDEX elsewhere."""
    tokenizer = fmt.tokenizer
    pieces = [
        (tokenizer(text, add_special_tokens=False)["input_ids"], resp) for text, resp in fmt.pieces(messages)
    ]
    if not fmt.templated and pieces and tokenizer.bos_token_id is not None:
        pieces[0] = (
            [tokenizer.bos_token_id, *pieces[0][0]],
            pieces[0][1],
        )  # plain text: the model's BOS first
    excess = sum(len(ids) for ids, _ in pieces) - max_length
    truncated = excess > 0
    for k in sorted((k for k, (_, r) in enumerate(pieces) if not r), key=lambda k: -len(pieces[k][0])):
        if excess <= 0:
            break
        ids = pieces[k][0]
        keep = max(len(ids) - excess, min(len(ids), 2 * KEEP_PROMPT_HEAD))
        excess -= len(ids) - keep
        pieces[k] = (cut_middle(ids, keep), False)
    ids = np.asarray([t for p, _ in pieces for t in p], dtype=np.int64)[:max_length]
    labels = np.asarray([t if r else IGNORE_INDEX for p, r in pieces for t in p], dtype=np.int64)[:max_length]
    return ids, labels, truncated
