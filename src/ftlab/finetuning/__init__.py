"""Fine-tuning strategies built on one mechanism: named layer groups, frozen or trained per epoch."""

from ftlab.finetuning.adapters import PeftAdapter, merge_peft
from ftlab.finetuning.policy import FinetunePolicy

__all__ = ["FinetunePolicy", "PeftAdapter", "merge_peft"]
