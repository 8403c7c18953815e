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
