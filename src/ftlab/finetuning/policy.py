"""Fine-tuning policies: which layer groups train, at which learning rate, from which epoch.

One class serves every strategy; a ``conf/finetune/<strategy>.yaml`` preset sets the few fields that define it.
The state of a policy is a pure function of the epoch, so a resumed run is exactly where an uninterrupted run
would be. Lightning's ``BaseFinetuning`` callback is not used: it adds parameter groups to the optimizer when it
unfreezes, which changes the group set mid-run and breaks LR schedulers, LR monitors and resume.
"""

from __future__ import annotations

from ftlab.finetuning.groups import HEAD
from ftlab.utils.errors import ConfigError


class FinetunePolicy:
    """Which backbone groups are frozen, and each group's learning-rate multiplier.

    Args:
        k: freeze the bottom ``k`` backbone groups for the whole run (``finetune=freeze_bottom``).
        freeze_backbone: freeze every backbone group, train the head only (``finetune=head_only``, a linear probe).
        train_bn: keep norm layers of frozen groups in train mode (BatchNorm statistics then update).
        frozen_dropout: keep dropout of frozen groups active (default: frozen groups are fully in eval mode).
    """

    def __init__(
        self, k: int = 0, freeze_backbone: bool = False, train_bn: bool = False, frozen_dropout: bool = False
    ):
        if k < 0:
            raise ConfigError(f"finetune.k={k} must be >= 0 (the number of bottom layer groups to freeze).")
        self.k, self.freeze_backbone = k, freeze_backbone
        self.train_bn, self.frozen_dropout = train_bn, frozen_dropout

    def check(self, group_names: list[str]) -> None:
        """Validate against the model's groups (backbone groups bottom to top, then ``head``)."""
        backbone = [n for n in group_names if n != HEAD]
        if self.k > len(backbone):
            raise ConfigError(
                f"finetune.k={self.k} is more than the backbone's {len(backbone)} layer groups "
                f"({', '.join(backbone)}); use finetune=head_only to freeze them all."
            )

    def frozen(self, group_names: list[str], epoch: int) -> set[str]:
        """Names of the groups frozen during ``epoch``; the head is never frozen."""
        backbone = [n for n in group_names if n != HEAD]
        if self.freeze_backbone:
            return set(backbone)
        return set(backbone[: self.k])

    def lr_scales(self, group_names: list[str]) -> dict[str, float]:
        """Multiplier of the base learning rate for each group."""
        return {name: 1.0 for name in group_names}
