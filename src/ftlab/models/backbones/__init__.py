"""Backbones: pretrained feature extractors with ``forward(batch)``, ``out_features``, ``layer_groups()`` and
``preprocessing``. One module per model family."""

from ftlab.models.backbones.llm import LLMBackbone, load_causal_lm, resolve_llm
from ftlab.models.backbones.text import HFTextBackbone
from ftlab.models.backbones.timm_models import EfficientNetLite0, TimmBackbone
from ftlab.models.backbones.vision import TorchvisionResNet

__all__ = [
    "EfficientNetLite0",
    "HFTextBackbone",
    "LLMBackbone",
    "TimmBackbone",
    "TorchvisionResNet",
    "load_causal_lm",
    "resolve_llm",
]
