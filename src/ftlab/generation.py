"""Text generation with a causal LM backbone, and scoring generations against references.

Generation goes through HF ``generate`` (greedy at ``temperature=0``, sampling otherwise) on left-padded prompts,
stopping at the tokenizer's end-of-turn / end-of-sequence tokens or after ``max_new_tokens``. Scores are the usual
ones for short generated answers: exact match after normalisation, and token-overlap F1 (SQuAD's definition).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from ftlab.utils.errors import ConfigError

# end-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma); those in the vocabulary stop generation
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The eos id and the end-of-turn ids the tokenizer knows (generation stops at any of them)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    unk = tokenizer.unk_token_id
    for token in END_OF_TURN:
        found = tokenizer.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != unk and found not in ids:
            ids.append(found)
    return ids


def left_pad(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def check_generation(max_new_tokens: int, temperature: float) -> None:
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if float(temperature) < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0: greedy decoding).")


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
) -> list[list[int]]:
    """New token ids per prompt (stop tokens removed), from ``model.generate`` (an HF causal LM, peft-wrapped
    or not). ``prompts``: 1-D id tensors without padding. Sampling (``temperature > 0``) uses torch's global
    RNG: seed it for repeatable samples."""
    check_generation(max_new_tokens, temperature)
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0} if temperature > 0 else {}
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=int(max_new_tokens),
        eos_token_id=stops or None,
        pad_token_id=pad_id,
        do_sample=temperature > 0,
        **sampling,
    )
    new = out[:, ids.shape[1] :].cpu()
    results = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's answer normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the normalised words (1.0 when both are empty)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
