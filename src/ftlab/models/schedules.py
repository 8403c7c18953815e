"""Learning-rate schedules sized from ``trainer.estimated_stepping_batches``.

The config is a ``_partial_`` call of :func:`warmup_schedule` or :func:`plateau`; the module completes it with the
optimizer and the number of optimizer steps. Warmup and decay come from ``transformers.get_scheduler``.
"""

from __future__ import annotations

from typing import Any

import torch

from ftlab.utils.errors import ConfigError

WARMUP_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of all steps, >= 1 a number of steps."""
    if warmup < 0:
        raise ConfigError(f"scheduler.warmup={warmup} must be >= 0 (a fraction < 1 or a number of steps).")
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def warmup_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, name: str = "linear", warmup: float = 0.1
) -> dict[str, Any]:
    """Linear warmup, then linear decay to 0, cosine decay, or a constant LR; stepped every optimizer step."""
    from transformers import get_scheduler

    if name not in WARMUP_SCHEDULES:
        raise ConfigError(f"scheduler.name={name!r} is not one of {', '.join(WARMUP_SCHEDULES)}.")
    scheduler = get_scheduler(
        WARMUP_SCHEDULES[name],
        optimizer,
        num_warmup_steps=warmup_steps(warmup, total_steps),
        num_training_steps=total_steps,
    )
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}


def plateau(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    monitor: str,
    mode: str = "max",
    factor: float = 0.5,
    patience: int = 1,
) -> dict[str, Any]:
    """Reduce the LR by ``factor`` when ``monitor`` has not improved for ``patience`` epochs."""
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode=mode,  # type: ignore[arg-type]  # "min" / "max", checked by torch
        factor=factor,
        patience=patience,
    )
    return {"scheduler": scheduler, "interval": "epoch", "monitor": monitor}


def slanted_triangular(
    optimizer: torch.optim.Optimizer, total_steps: int, cut_frac: float = 0.1, ratio: float = 32.0
) -> dict[str, Any]:
    """Slanted triangular LR (ULMFiT, Howard & Ruder 2018): a short linear rise, then a long linear decay.

    With ``cut = floor(total_steps * cut_frac)``, ``p = t / cut`` for ``t < cut``, else
    ``1 - (t - cut) / (cut * (1 / cut_frac - 1))``, and the LR is ``lr * (1 + p * (ratio - 1)) / ratio``: from
    ``lr / ratio`` up to ``lr`` at step ``cut``, and back to ``lr / ratio`` at the last step. Every parameter group
    is scaled by the same factor, so layer-wise LRs keep their ratios.
    """
    if not 0.0 < cut_frac < 1.0:
        raise ConfigError(
            f"scheduler.cut_frac={cut_frac} must be in (0, 1) (the fraction of steps spent rising)."
        )
    if ratio < 1:
        raise ConfigError(
            f"scheduler.ratio={ratio} must be >= 1 (how much smaller the lowest LR is than the peak)."
        )
    cut = max(int(total_steps * cut_frac), 1)

    def factor(step: int) -> float:
        p = step / cut if step < cut else 1 - (step - cut) / (cut * (1 / cut_frac - 1))
        return (1 + max(p, 0.0) * (ratio - 1)) / ratio

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}
