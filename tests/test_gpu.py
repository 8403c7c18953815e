"""``trainer=gpu`` on a CUDA device: bf16 autocast over fp32 weights, pinned batches from loader workers,
``torch.compile``, the feature cache computed on the GPU, norm clipping folded into the fused step.

Marked ``gpu``: deselected where torch sees no CUDA device (tests/conftest.py), so a CPU machine's ``make test``
runs the CPU halves of these settings (tests/test_devices.py) and a GPU machine's runs these too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from ftlab.finetuning import feature_cache
from ftlab.models.clipping import fused_clipping_applies
from ftlab.train import train

from conftest import compose_cfg, tiny_text_overrides

pytestmark = pytest.mark.gpu


class Probe(pl.Callback):
    """Records, once training starts, where and how the first training step ran."""

    seen: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        Probe.seen.update(
            device=pl_module.device.type,
            param_dtypes={p.dtype for p in pl_module.parameters()},
            pin_memory=loader.pin_memory,
            num_workers=loader.num_workers,
            fused_clipping=fused_clipping_applies(trainer.optimizers[0], trainer),
            compiled=getattr(pl_module.backbone, "_compiled_call_impl", None) is not None,
            head_dtypes=[],
            widths=set(),
        )
        pl_module.head.register_forward_hook(lambda m, i, out: Probe.seen["head_dtypes"].append(out.dtype))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args
    ) -> None:
        if "input_ids" in batch:
            Probe.seen["widths"].add(batch["input_ids"].shape[1])


def _gpu(csv: Path, tmp_path: Path, *extra: str) -> list[str]:
    cpu_settings = ("trainer.accelerator", "trainer.devices")
    base = [o for o in tiny_text_overrides(csv, tmp_path) if not o.startswith(cpu_settings)]
    return [*base, "trainer=gpu", "trainer.max_epochs=4", "+callbacks.probe._target_=test_gpu.Probe", *extra]


def test_trainer_gpu_trains_in_bf16_autocast_from_pinned_worker_batches(reviews_csv, tmp_path):
    Probe.seen = {}
    metrics = train(compose_cfg(_gpu(reviews_csv, tmp_path), tmp_path / "run"))
    seen = Probe.seen
    assert seen["device"] == "cuda"
    assert seen["param_dtypes"] == {torch.float32}  # bf16-mixed: fp32 master weights
    assert seen["head_dtypes"] and set(seen["head_dtypes"]) == {
        torch.bfloat16
    }  # the forward in bf16 autocast
    assert seen["pin_memory"] and seen["num_workers"] >= 1  # data.pin_memory / num_workers: auto
    assert seen["widths"] and all(w % 8 == 0 for w in seen["widths"])  # pad_to_multiple_of: auto
    assert seen["fused_clipping"]  # no gradient scaler under bf16: clipping stays inside the fused AdamW step
    assert metrics["test/acc"] >= 0.8  # the tiny table is easy (chance 0.5), as on CPU


def test_compiled_backbone_trains_on_the_gpu(reviews_csv, tmp_path):
    Probe.seen = {}
    metrics = train(compose_cfg(_gpu(reviews_csv, tmp_path, "compile=true"), tmp_path / "run"))
    assert Probe.seen["compiled"] and Probe.seen["device"] == "cuda"
    assert metrics["test/acc"] >= 0.8


def test_feature_cache_is_computed_on_the_gpu_and_matches_the_uncached_run(
    reviews_csv, tmp_path, caplog, monkeypatch
):
    devices: list[str] = []
    compute = feature_cache._compute

    def recording(backbone, datamodule, k, whole, device=None):
        devices.append(torch.device(device).type)
        return compute(backbone, datamodule, k, whole, device)

    monkeypatch.setattr(feature_cache, "_compute", recording)
    # fp32 on both paths: the cache is computed in fp32, so bf16 autocast would make the uncached run differ
    base = _gpu(reviews_csv, tmp_path, "finetune=head_only", "trainer.precision=32-true")
    with caplog.at_level(logging.INFO, logger="ftlab"):
        cached = train(compose_cfg(base, tmp_path / "cached"))
    assert "Feature cache: computed" in caplog.text and devices == ["cuda"]
    uncached = train(compose_cfg([*base, "feature_cache=false"], tmp_path / "uncached"))
    for key in ("test/acc", "test/loss", "best/val/acc"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-4), key


def test_image_backbone_trains_on_the_gpu(tmp_path):
    Probe.seen = {}
    overrides = [
        "data=digits",
        "model=tiny_resnet",
        "trainer=gpu",
        "trainer.max_epochs=3",
        "callbacks.progress_bar.kind=log",
        f"paths.cache_dir={tmp_path}/cache",
        "+callbacks.probe._target_=test_gpu.Probe",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert Probe.seen["device"] == "cuda" and Probe.seen["pin_memory"]
    assert set(Probe.seen["head_dtypes"]) == {torch.bfloat16}
    assert metrics["test/acc"] >= 0.3  # 10 classes (chance 0.1); random init, 3 epochs (0.62 on CPU)
