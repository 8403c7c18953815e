"""MixUp and CutMix on training batches (``data.mix``), with torchvision's transforms v2.

MixUp (Zhang et al. 2018) blends each image with the previous one in the batch, ``lam * x_i + (1 - lam) * x_{i-1}``
with ``lam ~ Beta(alpha, alpha)``; CutMix (Yun et al. 2019) pastes a box of the previous image instead, ``lam``
being the share of the image kept. Labels become the same blend of one-hot rows, shape (B, C) float: the
classification task's cross-entropy takes those probabilities (``F.cross_entropy`` with soft targets), and its
metrics count the dominant class.

:class:`MixCollator` applies the transform when a batch is collated, to training batches only: their items carry
``epoch`` and ``index`` (:class:`~ftlab.augment.seeding.EpochIndexed`), validation and test items do not. The draws
(``lam``, the box, and which of the two with ``mode=both``) come from a torch generator state seeded by (seed,
epoch, the batch's example indices), set inside ``torch.random.fork_rng``: exact on resume, and the global random
stream (dropout, random crops) is left as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from ftlab.augment.seeding import batch_seed
from ftlab.utils.errors import ConfigError, options_for

MODES = ("none", "mixup", "cutmix", "both")


@dataclass(frozen=True)
class Mix:
    """The options of ``data.mix``.

    Args:
        mode: ``mixup``, ``cutmix`` or ``both`` (one of the two per batch, chosen with equal probability);
            ``none``: no mixing (so that a sweep can switch it off: ``data.mix.mode=none,mixup,cutmix``).
        alpha: of the ``Beta(alpha, alpha)`` distribution of ``lam`` (1.0: uniform; smaller: closer to 0 or 1).
    """

    mode: str = "mixup"
    alpha: float = 1.0

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None, task: str) -> Mix | None:
        """Check ``data.mix`` and build it; ``None`` (or ``{}``) means no mixing."""
        args = options_for(cls, value, "data.mix", "{mode: mixup, alpha: 1.0}")
        if args is None:
            return None
        made = cls(**args)
        if made.mode not in MODES:
            raise ConfigError(f"data.mix.mode={made.mode!r} is not one of {', '.join(MODES)}.")
        if made.mode == "none":
            return None
        if not isinstance(made.alpha, int | float) or made.alpha <= 0:
            raise ConfigError(
                f"data.mix.alpha={made.alpha!r} must be a number > 0 (1.0: lam uniform in [0, 1])."
            )
        if task != "classification":
            raise ConfigError(
                f"data.mix blends one class per image into soft targets; it does not apply to data.task={task}. "
                "Remove data.mix (data.mix=null)."
            )
        return made

    def transform(self, num_classes: int) -> v2.Transform:
        """torchvision's batch transform: ``(pixels (B, C, H, W), labels (B,)) -> (pixels, soft labels (B, K))``."""
        mixup = v2.MixUp(alpha=float(self.alpha), num_classes=num_classes)
        cutmix = v2.CutMix(alpha=float(self.alpha), num_classes=num_classes)
        return {"mixup": mixup, "cutmix": cutmix, "both": v2.RandomChoice([mixup, cutmix])}[self.mode]


class MixCollator:
    """``base``'s batch, mixed when its items come from the training split (they carry ``epoch`` and ``index``)."""

    def __init__(self, base: Any, mix: Mix, num_classes: int, seed: int):
        self.base, self.mix, self.num_classes, self.seed = base, mix, num_classes, seed
        self.transform = mix.transform(num_classes)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.base(items)
        if "epoch" not in items[0] or "labels" not in batch:
            return batch
        seed = batch_seed(self.seed, int(items[0]["epoch"]), (item["index"] for item in items), "mix")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            batch["pixel_values"], batch["labels"] = self.transform(batch["pixel_values"], batch["labels"])
        return batch
