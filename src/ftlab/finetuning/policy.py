"""Fine-tuning policies: which layer groups train, at which learning rate, from which epoch.

One class serves every strategy; a ``conf/finetune/<strategy>.yaml`` preset sets the few fields that define it.
The state of a policy is a pure function of the epoch, so a resumed run is exactly where an uninterrupted run
would be. Lightning's ``BaseFinetuning`` callback is not used: it adds parameter groups to the optimizer when it
unfreezes, which changes the group set mid-run and breaks LR schedulers, LR monitors and resume.

Layer-wise LR decay (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification"): the distance of a group
from the top is 0 for the head, 1 for the top backbone group (the last encoder layer, or the pooler when it is
kept), ..., ``n`` for the bottom one (embeddings / stem); its LR is ``lr * lr_decay ** distance``. Explicit
``lr_multipliers`` (group name or glob pattern -> factor) multiply on top of that, so with ``lr_decay: 1`` they are
plain discriminative fine-tuning (Howard & Ruder 2018).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ftlab.finetuning.groups import HEAD, backbone_groups
from ftlab.utils.errors import ConfigError


class FinetunePolicy:
    """Which backbone groups are frozen in each epoch, each group's LR multiplier, and how the backbone is prepared.

    Args:
        k: freeze the bottom ``k`` backbone groups for the whole run (``finetune=freeze_bottom``).
        freeze_backbone: freeze every backbone group, train the head only (``finetune=head_only``, a linear probe).
        train_bn: keep norm layers of frozen groups in train mode (BatchNorm statistics then update).
        frozen_dropout: keep dropout of frozen groups active (default: frozen groups are fully in eval mode).
        every_n_epochs: gradual unfreezing (ULMFiT, ``finetune=gradual_unfreeze``): one more backbone group from the
            top becomes trainable every ``every_n_epochs`` epochs; ``null`` turns it off.
        start_unfrozen: with gradual unfreezing, how many top backbone groups train from epoch 0 besides the head.
        lr_decay: layer-wise LR decay factor ξ (``finetune=llrd``); 1 means none. See the module docstring.
        lr_multipliers: ``{group name or glob: factor}``, e.g. ``{embeddings: 0.1, "layer.*": 0.5}``; the first
            exact name wins, then the first matching pattern in order.
        reinit_top_k: re-initialise the top ``k`` backbone groups before training (Zhang et al. 2021).
        train_only: glob patterns of backbone parameter names (as in the state dict, e.g. ``*bias``) that train;
            every other backbone parameter is fixed (``finetune=bitfit``). ``null``: all of them may train.
        peft: a :class:`~ftlab.finetuning.adapters.PeftAdapter` (LoRA, IA3, ...) applied to the backbone.
        contrastive: a :class:`~ftlab.setfit.ContrastiveStage`: the body is first tuned on label pairs, then the
            policy's groups train (``finetune=setfit``).
    """

    def __init__(
        self,
        k: int = 0,
        freeze_backbone: bool = False,
        train_bn: bool = False,
        frozen_dropout: bool = False,
        every_n_epochs: int | None = None,
        start_unfrozen: int = 0,
        lr_decay: float = 1.0,
        lr_multipliers: Mapping[str, float] | None = None,
        reinit_top_k: int = 0,
        train_only: Sequence[str] | None = None,
        peft: Any = None,
        contrastive: Any = None,
    ):
        if k is None:  # finetune=freeze_transferred without model.backbone.checkpoint_groups
            raise ConfigError(
                "finetune.k is null: finetune=freeze_transferred freezes the groups copied from the checkpoint, so "
                "it needs model.backbone.checkpoint_groups=<n>; or give finetune.k=<n> directly."
            )
        for key, value in (("k", k), ("start_unfrozen", start_unfrozen), ("reinit_top_k", reinit_top_k)):
            if value < 0:
                raise ConfigError(f"finetune.{key}={value} must be >= 0 (a number of layer groups).")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ConfigError(
                f"finetune.every_n_epochs={every_n_epochs} must be >= 1 (epochs between two unfreezings), "
                "or null to turn gradual unfreezing off."
            )
        if not lr_decay > 0:
            raise ConfigError(f"finetune.lr_decay={lr_decay} must be > 0 (ξ, e.g. 0.95; 1 means no decay).")
        multipliers = dict(lr_multipliers or {})
        bad = {name: m for name, m in multipliers.items() if not isinstance(m, int | float) or m < 0}
        if bad:
            raise ConfigError(f"finetune.lr_multipliers={bad}: each multiplier must be a number >= 0.")
        self.k, self.freeze_backbone = k, freeze_backbone
        self.train_bn, self.frozen_dropout = train_bn, frozen_dropout
        self.every_n_epochs, self.start_unfrozen = every_n_epochs, start_unfrozen
        self.lr_decay, self.lr_multipliers = (
            float(lr_decay),
            {str(n): float(m) for n, m in multipliers.items()},
        )
        self.reinit_top_k = reinit_top_k
        self.train_only = list(train_only) if train_only is not None else None
        self.peft = peft
        if contrastive is not None and peft is not None:
            raise ConfigError(
                "finetune.contrastive (SetFit) tunes the whole body before training; it does not combine with "
                "finetune.peft. Use finetune=setfit or finetune=lora, not both."
            )
        self.contrastive = contrastive

    def check(self, group_names: list[str]) -> None:
        """Validate against the model's groups (backbone groups bottom to top, then ``head``)."""
        backbone = [n for n in group_names if n != HEAD]
        for key, value in (
            ("k", self.k),
            ("start_unfrozen", self.start_unfrozen),
            ("reinit_top_k", self.reinit_top_k),
        ):
            if value > len(backbone):
                raise ConfigError(
                    f"finetune.{key}={value} is more than the backbone's {len(backbone)} layer groups "
                    f"({', '.join(backbone)}); use at most {len(backbone)}."
                )
        unused = [p for p in self.lr_multipliers if not any(fnmatch.fnmatchcase(n, p) for n in group_names)]
        if unused:
            raise ConfigError(
                f"finetune.lr_multipliers names {unused}, which match no layer group; the groups are "
                f"{', '.join(group_names)} (glob patterns such as 'layer.*' are allowed)."
            )

    def prepare(self, backbone: nn.Module) -> set[str]:
        """Change the backbone before its groups are built: re-initialise top groups, then wrap with ``peft``.

        Returns the names (``backbone.<...>``, as in the state dict) of backbone parameters that never train.
        """
        from ftlab.finetuning.adapters import reinit_modules

        groups = backbone_groups(backbone)
        self.check([name for name, _ in groups] + [HEAD])
        if self.reinit_top_k:
            top = groups[len(groups) - self.reinit_top_k :]
            reinit_modules(backbone, [m for _, modules in top for m in modules])
        fixed: set[str] = set()
        if self.peft is not None:
            self.peft.apply(backbone)  # peft leaves only its adapter parameters with requires_grad=True
            fixed = {n for n, p in backbone.named_parameters(prefix="backbone") if not p.requires_grad}
        if self.train_only is not None:
            names = [n for n, _ in backbone.named_parameters(prefix="backbone")]
            fixed |= {n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in self.train_only)}
            if len(fixed) == len(names):
                raise ConfigError(
                    f"finetune.train_only={self.train_only} matches no backbone parameter name."
                )
        return fixed

    def frozen(self, group_names: list[str], epoch: int) -> set[str]:
        """Names of the groups frozen during ``epoch``; the head is never frozen."""
        backbone = [n for n in group_names if n != HEAD]
        if self.freeze_backbone:
            return set(backbone)
        frozen = set(backbone[: self.k])
        if self.every_n_epochs is not None:
            # the number of top backbone groups trainable in this epoch
            unfrozen = self.start_unfrozen + epoch // self.every_n_epochs
            frozen |= set(backbone[: max(len(backbone) - unfrozen, 0)])
        return frozen

    def always_frozen(self, group_names: list[str]) -> set[str]:
        """Groups frozen in every epoch (never unfrozen by the schedule)."""
        return self.frozen(group_names, epoch=2**31)

    def lr_scales(self, group_names: list[str]) -> dict[str, float]:
        """Multiplier of the base learning rate for each group: ``lr_decay ** distance`` times ``lr_multipliers``."""
        top_down = list(reversed([n for n in group_names if n != HEAD]))
        distance = {HEAD: 0, **{name: i + 1 for i, name in enumerate(top_down)}}
        return {name: self.lr_decay ** distance[name] * self._multiplier(name) for name in group_names}

    def _multiplier(self, name: str) -> float:
        if name in self.lr_multipliers:
            return self.lr_multipliers[name]
        return next((m for p, m in self.lr_multipliers.items() if fnmatch.fnmatchcase(name, p)), 1.0)
