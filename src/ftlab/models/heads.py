"""Heads: the new, task-sized layers put on top of a backbone."""

from __future__ import annotations

import torch
from torch import nn

from ftlab.utils.errors import ConfigError


class ClassificationHead(nn.Module):
    """Dropout, an optional hidden layer, and a linear layer to ``num_classes`` outputs (1 for regression).

    Args:
        in_features: the backbone's ``out_features``.
        num_classes: from the data module.
        dropout: before each linear layer.
        hidden_features: width of an optional hidden layer (GELU); ``null`` for a linear head.
    """

    def __init__(
        self, in_features: int, num_classes: int, dropout: float = 0.1, hidden_features: int | None = None
    ):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes} must be at least 1 (1 means regression).")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.head.dropout={dropout} must be in [0, 1).")
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden_features:
            layers += [nn.Linear(in_features, hidden_features), nn.GELU(), nn.Dropout(dropout)]
            in_features = hidden_features
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)  # (B, num_classes)


class MaskedLMHead(nn.Module):
    """BERT's masked-LM prediction head: dense + activation + LayerNorm, then a decoder tied to the word embeddings.

    The decoder weight is the backbone's embedding matrix itself (held in a plain list, not as a submodule), so it
    is saved, frozen and trained with the backbone's ``embeddings`` group and lives in the checkpoint once; only
    the transform and the output bias belong to the head. Built by the text backbone
    (``HFTextBackbone.masked_lm_head``), which fills it from its checkpoint's ``cls.predictions.*`` when it has them.

    Args:
        embeddings: the backbone's word embeddings (``num_embeddings`` = vocabulary, ``embedding_dim`` = width).
        in_features: the backbone's hidden size (the features per token).
        activation: the transform's activation (an HF ``hidden_act`` name such as ``gelu``).
        eps: the LayerNorm epsilon; init_std: std of the fresh dense weight (BERT's ``initializer_range``).
    """

    def __init__(
        self,
        embeddings: nn.Embedding,
        in_features: int,
        activation: str = "gelu",
        eps: float = 1e-12,
        init_std: float = 0.02,
    ):
        super().__init__()
        from transformers.activations import ACT2FN

        width = embeddings.embedding_dim
        self.dense = nn.Linear(in_features, width)
        self.activation = ACT2FN[activation]
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))
        self._tied = [embeddings]  # a list: not registered, so the weight stays in the backbone's group
        nn.init.normal_(self.dense.weight, std=init_std)
        nn.init.zeros_(self.dense.bias)

    @property
    def decoder_weight(self) -> torch.Tensor:
        """(vocabulary, width): the word-embedding matrix."""
        return self._tied[0].weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.activation(self.dense(features)))  # (B, T, width)
        return nn.functional.linear(hidden, self.decoder_weight, self.bias)  # (B, T, vocabulary)
