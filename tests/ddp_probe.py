"""A callback for the DDP test: what gradient clipping saw and did at every step, and whether frozen groups moved.

Lightning calls the callbacks' ``on_before_optimizer_step`` before the module's (which drops the gradients of
frozen groups that kept ``requires_grad`` for DDP) and clips after both, so this hook sees every all-reduced
gradient, frozen groups' included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from finetune_helpers import digest


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


class ClipProbe(pl.Callback):
    """Per optimizer step: the norm of the trainable groups' gradients, of the frozen groups' gradients, and the
    factor by which the head's update was actually scaled (from its weight before and after the step, plain SGD);
    per epoch: digests of the groups frozen in that epoch at its start and end. Written to
    ``<folder>/clip_rank<r>.json``."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.steps: list[dict[str, float]] = []
        self.frozen: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, Any] = {}

    def _head_weight(self, module: Any) -> nn.Parameter:
        return [m for m in module.head.modules() if isinstance(m, nn.Linear)][-1].weight

    def _frozen_digests(self, module: Any) -> dict[str, str]:
        return {g.name: digest(dict(g.params)) for g in module.groups if g.name in module.frozen}

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        epoch = str(trainer.current_epoch)
        if epoch not in self.frozen:  # the module's own epoch-start hook (the schedule) has run by now
            self.frozen[epoch] = {"start": self._frozen_digests(module)}

    def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
        record = self.frozen[str(trainer.current_epoch)]
        record["end"] = {g.name: digest(dict(g.params)) for g in module.groups if g.name in record["start"]}

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, optimizer: Any) -> None:
        frozen, trainable = [], []
        for group in module.groups:
            grads = [p.grad for _, p in group.params if p.grad is not None]
            (frozen if group.name in module.frozen else trainable).extend(grads)
        weight = self._head_weight(module)
        lr = next(g["lr"] for g in optimizer.param_groups if any(p is weight for p in g["params"]))
        self.pending = {
            "trainable_norm": _norm(trainable),
            "frozen_norm": _norm(frozen),
            "weight": weight.detach().clone(),
            "grad": weight.grad.detach().clone(),
            "lr": lr,
        }

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        step, self.pending = self.pending, {}
        moved = step["weight"] - self._head_weight(module).detach()  # SGD without momentum: lr * scale * grad
        scale = float((moved * step["grad"]).sum() / (step["lr"] * step["grad"].pow(2).sum()))
        self.steps.append(
            {"scale": scale, "trainable_norm": step["trainable_norm"], "frozen_norm": step["frozen_norm"]}
        )

    def on_fit_end(self, trainer: pl.Trainer, module: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"steps": self.steps, "frozen": self.frozen}
        (self.folder / f"clip_rank{trainer.global_rank}.json").write_text(json.dumps(record))
