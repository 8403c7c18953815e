"""The backbone contract and its optional abilities, as typed protocols (checked with ``isinstance``).

Every ftlab backbone is an ``nn.Module`` with the attributes of :class:`Backbone`. Abilities that only some
families have are protocols of their own, so callers ask ``isinstance(backbone, SplittableBackbone)`` instead of
probing attributes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    """A pretrained feature extractor.

    ``forward(batch) -> (B, out_features)`` pooled features; ``layer_groups()`` bottom (embeddings / stem) to top;
    ``preprocessing`` what the data side needs (``TextPreprocessing`` / ``ImagePreprocessing``);
    ``loaded_checkpoint`` the transfer checkpoint its weights came from, or ``None``.
    """

    out_features: int
    preprocessing: Any
    loaded_checkpoint: str | None

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]: ...

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


@runtime_checkable
class TokenBackbone(Protocol):
    """Can give one feature vector per token: ``token_features(batch) -> (B, T, out_features)``."""

    def token_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


@runtime_checkable
class SplittableBackbone(Protocol):
    """Can run from a cached layer: the feature cache runs a frozen bottom once and the rest every step.

    ``forward_until(k, batch) -> (B, T, H)`` hidden states after the bottom ``k`` groups; ``forward_from(k, hidden,
    attention_mask, pool)`` the rest, pooled ``(B, H)`` or per token ``(B, T, H)``. ``can_split()`` says whether
    this instance supports it (it depends on the loaded architecture).
    """

    def can_split(self) -> bool: ...

    def forward_until(self, stop: int, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def forward_from(
        self, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor, pool: bool = True
    ) -> torch.Tensor: ...


@runtime_checkable
class EmbeddingBackbone(Protocol):
    """Exposes its word-embedding module, whose output (B, T, H) adversarial training perturbs
    (:mod:`ftlab.models.adversarial`; HF models call it ``get_input_embeddings()``, its output is what
    ``inputs_embeds`` carries). Image batches are perturbed in ``pixel_values`` and need no such ability."""

    def input_embeddings(self) -> nn.Module: ...


def can_split(backbone: Any) -> bool:
    return isinstance(backbone, SplittableBackbone) and backbone.can_split()
