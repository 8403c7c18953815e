"""Models: backbones, heads, and the LightningModule that trains them."""

from ftlab.models.heads import ClassificationHead
from ftlab.models.module import ClassificationModule, FinetuneModule

__all__ = ["ClassificationHead", "ClassificationModule", "FinetuneModule"]
