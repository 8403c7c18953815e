"""Backbones: pretrained feature extractors with ``forward(batch)``, ``out_features``, ``layer_groups()`` and
``preprocessing``. One module per model family."""

from ftlab.models.backbones.text import HFTextBackbone

__all__ = ["HFTextBackbone"]
