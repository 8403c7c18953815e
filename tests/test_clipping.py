"""Norm clipping folded into the fused optimizer's step (ftlab.models.clipping) equals clip-then-step."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from ftlab.models.clipping import clip_in_fused_step, fused_clipping_applies
from ftlab.train import train

from conftest import compose_cfg, tiny_text_overrides


def _model_with_grads(scale: float, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model, x, y = model.to(device), x.to(device), y.to(device)
    (scale * nn.functional.cross_entropy(model(x), y)).backward()
    return model


@pytest.mark.parametrize("scale, max_norm", [(100.0, 1.0), (0.01, 1.0)])  # clipped, and not clipped
@pytest.mark.parametrize(
    "make",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True),
    ],
    ids=["sgd", "adamw"],
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_same_update_and_gradients_as_clip_then_step(
    make, scale: float, max_norm: float, device: str
) -> None:
    reference = _model_with_grads(scale, device)
    fused = _model_with_grads(scale, device)  # the same weights and gradients (seeded)
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    make(reference.parameters()).step()

    optimizer = make(fused.parameters())
    norm_fused = clip_in_fused_step(optimizer, max_norm)
    clipped = float(norm) > max_norm
    scale = getattr(optimizer, "grad_scale", None)
    if device == "cpu":  # nothing clipped: no division at all
        assert (scale is not None) == clipped
    else:  # no host sync to find out: always a (device) scale, 1 when nothing is clipped
        assert scale is not None and (float(scale) > 1.0) == clipped
    optimizer.step()

    torch.testing.assert_close(norm_fused, norm)
    for (name, a), b in zip(reference.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8, msg=f"{name}.grad")
    if clipped:  # the gradients left behind are the clipped ones
        total = torch.nn.utils.get_total_norm([p.grad for p in fused.parameters()])
        assert abs(float(total) - max_norm) < 1e-4


def test_applies_only_where_exact() -> None:
    params = list(nn.Linear(2, 2).parameters())
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    fused = torch.optim.AdamW(params, fused=True)
    assert fused_clipping_applies(fused, trainer)
    assert fused_clipping_applies(fused, trainer, "norm")
    assert not fused_clipping_applies(fused, trainer, "value")
    assert not fused_clipping_applies(torch.optim.AdamW(params), trainer)  # foreach, not fused
    assert not fused_clipping_applies(torch.optim.Adagrad(params), trainer)  # no grad_scale in its step
    assert not fused_clipping_applies(fused, None)


class GradientNorms(pl.Callback):
    """Records the gradient norm before clipping and the norm of the gradients the optimizer step left behind."""

    seen: list[tuple[float, float, bool]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # called before clipping
        self.before = float(
            torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if p.grad is not None])
        )

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        (optimizer,) = trainer.optimizers
        after = torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if p.grad is not None])
        GradientNorms.seen.append(
            (self.before, float(after), getattr(optimizer, "grad_scale", None) is not None)
        )


def test_training_clips_through_the_fused_step(reviews_csv: Path, tmp_path: Path) -> None:
    GradientNorms.seen = []
    overrides = tiny_text_overrides(reviews_csv, tmp_path) + [
        "trainer.gradient_clip_val=0.01",  # below any gradient norm of the first steps
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.limit_test_batches=1",
        "+callbacks.norms._target_=test_clipping.GradientNorms",
    ]
    train(compose_cfg(overrides, tmp_path / "run"))
    assert len(GradientNorms.seen) == 3
    for before, after, fused in GradientNorms.seen:
        assert fused and before > 0.01
        assert after == pytest.approx(0.01, rel=1e-3)
