"""Backbones: pretrained feature extractors with ``forward(batch)``, ``out_features``, ``layer_groups()`` and
``preprocessing``. One module per model family."""

from ftlab.models.backbones.text import HFTextBackbone
from ftlab.models.backbones.timm_models import EfficientNetLite0, TimmBackbone
from ftlab.models.backbones.vision import TorchvisionResNet

__all__ = ["EfficientNetLite0", "HFTextBackbone", "TimmBackbone", "TorchvisionResNet"]
