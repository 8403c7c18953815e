"""Layer groups: the unit every fine-tuning strategy works on.

A model is the backbone's ``layer_groups()`` (bottom to top) followed by the ``head`` group. Each group becomes
named optimizer parameter groups from the first step (``<name>`` with weight decay, ``<name>.no_decay`` for biases
and norm weights), so LR schedulers, ``LearningRateMonitor`` and checkpoints see one fixed set of groups whatever a
strategy freezes or unfreezes later. Freezing is ``requires_grad=False`` (AdamW and SGD skip a parameter without a
gradient, so a frozen weight stays bit-identical) plus eval mode for the group's modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ftlab.utils.errors import ConfigError

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
HEAD = "head"


@dataclass
class LayerGroup:
    name: str
    modules: list[nn.Module]
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)


def backbone_groups(backbone: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """``backbone.layer_groups()``, bottom to top: every ftlab backbone defines it (typed access for callers)."""
    layer_groups: Any = getattr(backbone, "layer_groups", None)
    if layer_groups is None:
        raise TypeError(f"{type(backbone).__name__} has no layer_groups(): it is not an ftlab backbone.")
    return list(layer_groups())


def build_groups(backbone: nn.Module, head: nn.Module) -> list[LayerGroup]:
    """The backbone's groups plus the head, each parameter in exactly one group (checked)."""
    named = [*backbone_groups(backbone), (HEAD, [head])]
    names = {id(p): n for n, p in backbone.named_parameters(prefix="backbone")}
    names.update({id(p): n for n, p in head.named_parameters(prefix="head")})
    owner: dict[int, str] = {}
    groups = []
    for name, modules in named:
        group = LayerGroup(name, list(modules))
        for module in modules:
            for param in module.parameters():
                if id(param) in owner:
                    if owner[id(param)] != name:
                        raise ValueError(
                            f"Parameter {names.get(id(param))} is in groups {owner[id(param)]} and {name}."
                        )
                    continue
                owner[id(param)] = name
                group.params.append((names.get(id(param), f"{name}.?"), param))
        groups.append(group)
    missing = [n for n, p in backbone.named_parameters(prefix="backbone") if id(p) not in owner]
    if missing:
        raise ValueError(
            f"Backbone parameters in no layer group: {missing[:5]} (a bug in its layer_groups())."
        )
    return groups


def _no_decay_ids(group: LayerGroup) -> set[int]:
    ids = {id(p) for name, p in group.params if name.endswith("bias")}
    for module in group.modules:
        for sub in module.modules():
            if isinstance(sub, NORM_TYPES):
                ids.update(id(p) for p in sub.parameters(recurse=False))
    return ids


def optimizer_param_groups(
    groups: list[LayerGroup], lr: float, weight_decay: float, lr_scales: dict[str, float]
) -> list[dict]:
    """Named parameter groups: ``<group>`` (decayed) and ``<group>.no_decay`` (biases and norms), empty ones left out."""
    param_groups = []
    for group in groups:
        no_decay = _no_decay_ids(group)
        scale = lr_scales.get(group.name, 1.0)  # kept in the group: the LR search (tune.lr) reapplies it
        group_lr = lr * scale
        decayed = [p for _, p in group.params if id(p) not in no_decay]
        plain = [p for _, p in group.params if id(p) in no_decay]
        if decayed:
            param_groups.append(
                {
                    "name": group.name,
                    "params": decayed,
                    "lr": group_lr,
                    "lr_scale": scale,
                    "weight_decay": weight_decay,
                }
            )
        if plain:
            param_groups.append(
                {
                    "name": f"{group.name}.no_decay",
                    "params": plain,
                    "lr": group_lr,
                    "lr_scale": scale,
                    "weight_decay": 0.0,
                }
            )
    return param_groups


def set_trainable(
    groups: list[LayerGroup],
    frozen: set[str],
    fixed: set[str] | None = None,
    keep_grad: set[str] | None = None,
) -> None:
    """``requires_grad`` from the frozen groups; ``fixed`` parameter names never train (PEFT base weights, BitFit).

    Groups in ``keep_grad`` keep ``requires_grad=True`` even while frozen (DDP: see ``ClassificationModule.setup``);
    their gradients are then dropped before each optimizer step instead.
    """
    fixed, keep_grad = fixed or set(), keep_grad or set()
    unknown = (frozen | keep_grad) - {g.name for g in groups}
    if unknown:
        raise ConfigError(f"Cannot freeze unknown layer group(s) {sorted(unknown)}.")
    for group in groups:
        for name, param in group.params:
            param.requires_grad_((group.name not in frozen or group.name in keep_grad) and name not in fixed)


def set_frozen_modes(
    groups: list[LayerGroup], frozen: set[str], train_bn: bool, frozen_dropout: bool
) -> None:
    """Put frozen groups in eval mode (after ``Module.train()`` has put everything in train mode).

    Frozen BatchNorm layers then normalise with their running statistics and do not update them; ``train_bn`` keeps
    norm layers of frozen groups training, ``frozen_dropout`` keeps their dropout active.
    """
    for group in groups:
        if group.name not in frozen:
            continue
        for module in group.modules:
            for sub in module.modules():
                keep = (train_bn and isinstance(sub, NORM_TYPES)) or (
                    frozen_dropout and isinstance(sub, nn.Dropout)
                )
                if not keep:
                    sub.training = False


def count_parameters(groups: list[LayerGroup]) -> dict[str, float]:
    """Trainable and total parameter counts, overall and per group, for ``metrics.json``."""
    counts: dict[str, float] = {}
    trainable = total = 0
    for group in groups:
        group_total = sum(p.numel() for _, p in group.params)
        group_trainable = sum(p.numel() for _, p in group.params if p.requires_grad)
        counts[f"params/{group.name}/trainable"] = group_trainable
        counts[f"params/{group.name}/total"] = group_total
        trainable, total = trainable + group_trainable, total + group_total
    counts.update(
        trainable_params=trainable, total_params=total, trainable_fraction=trainable / max(total, 1)
    )
    return counts
