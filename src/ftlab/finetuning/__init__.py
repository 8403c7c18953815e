"""Fine-tuning strategies built on one mechanism: named layer groups, frozen or trained per epoch."""

from ftlab.finetuning.policy import FinetunePolicy

__all__ = ["FinetunePolicy"]
