"""Data modules: where examples come from and how they become batches."""

from ftlab.data.image import ImageClassificationDataModule, ImagePreprocessing
from ftlab.data.text import TextClassificationDataModule, TextPreprocessing

__all__ = [
    "ImageClassificationDataModule",
    "ImagePreprocessing",
    "TextClassificationDataModule",
    "TextPreprocessing",
]
