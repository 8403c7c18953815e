"""Masked-LM adaptation (BERT's pre-training objective on the user's own text: DAPT/TAPT, Gururangan et al. 2020).

Batches carry ``labels`` (B, T): the original token id at the masked positions, :data:`IGNORE_INDEX` elsewhere
(the data side masks: :mod:`ftlab.data.masking`). The head is BERT's prediction head (a dense + activation +
LayerNorm transform, then a decoder whose weight *is* the backbone's word-embedding matrix, plus a bias), built by
the backbone (:meth:`~ftlab.models.backbones.HFTextBackbone.masked_lm_head`) so it starts from the checkpoint's own
``cls.predictions.*`` when it has them. The metrics are perplexity (``exp`` of the mean cross-entropy over masked
tokens) and the masked-token accuracy. ``label_names`` are the tokenizer's vocabulary in id order, so predictions
(fill-mask) name tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torchmetrics
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from ftlab.tasks.base import IGNORE_INDEX, Evaluator, Task, per_token_cross_entropy
from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)


@runtime_checkable
class MaskedLMBackbone(Protocol):
    """Builds the masked-LM head tied to its own word embeddings (``HFTextBackbone``)."""

    def masked_lm_head(self) -> nn.Module: ...


class MaskedLMTask(Task):
    """Predict the masked tokens: cross-entropy over the masked positions; perplexity and masked-token accuracy.

    Args:
        num_labels: the vocabulary size (the data module's ``num_classes``).
        label_names: the vocabulary in id order (tokens named in predictions).
    """

    name = "masked_lm"
    monitor = "val/perplexity"
    level = "token"

    def make_head(self, backbone: nn.Module, configured: Callable[[], nn.Module]) -> nn.Module:
        """BERT's prediction head tied to the backbone's word embeddings; ``model.head`` is not used."""
        if not isinstance(backbone, MaskedLMBackbone):
            raise ConfigError(
                f"data.task=masked_lm needs a text backbone with word embeddings (model=minilm, bert, tiny_bert); "
                f"{type(backbone).__name__} has none."
            )
        return backbone.masked_lm_head()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_token_cross_entropy(logits, labels)  # the mean over masked positions

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "perplexity": Perplexity(ignore_index=IGNORE_INDEX),
                # micro: correct masked tokens / masked tokens (the state is a few counts, not one per token id);
                # unvalidated: a model may have more embedding rows (outputs) than its tokenizer has tokens
                "acc": MulticlassAccuracy(
                    self.num_labels, average="micro", ignore_index=IGNORE_INDEX, validate_args=False
                ),
            }
        )

    def update_metrics(self, metrics: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
        scored = labels != IGNORE_INDEX  # only the masked positions: (M, V) instead of (B, T, V)
        picked, target = logits[scored].float(), labels[scored]
        metrics["perplexity"].update(picked.unsqueeze(0), target.unsqueeze(0))
        metrics["acc"].update(picked.argmax(-1), target)

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)  # (B, T) token ids

    def decode(
        self, logits: torch.Tensor, items: Sequence[dict[str, Any]], top_k: int = 1
    ) -> list[dict[str, Any]]:
        """Fill-mask: per input, for each mask token (in order) the ``top_k`` tokens and their probabilities, and
        ``filled``: the most likely token at each mask."""
        names = self.label_names or []
        rows = []
        for b, item in enumerate(items):
            masks: list[dict[str, Any]] = []
            for position in item.get("mask_positions", []):
                probs = logits[b, int(position)].float().softmax(-1)
                values, ids = probs.topk(min(top_k, probs.numel()))
                candidates = [
                    {"token": names[i] if i < len(names) else str(i), "probability": float(p)}
                    for p, i in zip(values.tolist(), ids.tolist(), strict=True)
                ]
                masks.append({"position": int(position), "candidates": candidates})
            rows.append(
                {
                    "input": item["input"],
                    "filled": [m["candidates"][0]["token"] for m in masks],
                    "masks": masks,
                }
            )
        return rows

    def evaluator(self) -> Evaluator:
        return Evaluator(self)  # perplexity, masked-token accuracy and the loss over the split
