"""Strategies through real (tiny) training runs: what trains in each epoch, LRs per step, frozen weights, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from finetune_helpers import (
    Probe,
    cnn_backbone,
    compose_cfg,
    digest,
    make_module,
    read_probe,
    tiny_run_overrides,
)
from ftlab.finetuning import FinetunePolicy
from ftlab.train import train

# feature_cache=false in every leg: a run stopped after epoch 0 has a backbone frozen for its whole (short) run and
# would train on cached features, the uninterrupted run on computed ones (equal only to ~1e-5): the bit-exact resume
# comparison must not depend on that
GRADUAL = [
    "finetune=gradual_unfreeze",
    "+finetune.lr_decay=0.5",
    "scheduler=constant",
    "optimizer.lr=0.01",
    "feature_cache=false",
]
LR = 0.01


def run(tmp_path: Path, name: str, extra: list[str]) -> tuple[dict, dict]:
    cfg = compose_cfg(tiny_run_overrides(tmp_path, tmp_path / name, tmp_path / f"probe_{name}") + extra)
    metrics = train(cfg)
    return metrics, read_probe(tmp_path / f"probe_{name}")


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory):
    """An uninterrupted 3-epoch gradual-unfreezing run with LLRD (ξ = 0.5) on tiny_bert; 6 steps per epoch."""
    tmp = tmp_path_factory.mktemp("gradual")
    metrics, probe = run(tmp, "full", [*GRADUAL, "trainer.max_epochs=3"])
    return tmp, metrics, probe


def top_level(names: list[str]) -> set[str]:
    """``backbone.model.encoder.layer.1.x.weight`` -> ``layer.1``; ``head.layers.1.bias`` -> ``head``."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.add(
            "head"
            if parts[0] == "head"
            else "embeddings"
            if parts[2] == "embeddings"
            else f"layer.{parts[4]}"
        )
    return out


def test_gradual_unfreezing_run(gradual_run):
    _, metrics, probe = gradual_run
    trainable = {int(e): top_level(names) for e, names in probe["trainable"].items()}
    assert trainable == {0: {"head"}, 1: {"head", "layer.1"}, 2: {"head", "layer.1", "layer.0"}}
    assert len(probe["trainable"]["1"]) == 18  # every parameter of layer.1 (16) and of the head (2)
    # the optimizer holds all 8 groups from step 0, each at lr * 0.5 ** distance from the top, at every step
    for step in ("0", "5", "6", "17"):
        lrs = probe["lrs"][step]
        assert len(lrs) == 8
        expected = {"head": LR, "layer.1": LR / 2, "layer.0": LR / 4, "embeddings": LR / 8}
        for name, lr in expected.items():
            assert lrs[name] == pytest.approx(lr) and lrs[f"{name}.no_decay"] == pytest.approx(lr)
    # never unfrozen: bit-identical; unfrozen at epoch 1 and 2: trained
    assert probe["start"]["embeddings"] == probe["end"]["embeddings"]
    assert (
        probe["start"]["layer.0"] != probe["end"]["layer.0"]
        and probe["start"]["head"] != probe["end"]["head"]
    )
    # metrics.json records the epoch-0 counts: only the head trains then
    head = metrics["params/head/total"]
    assert metrics["trainable_params"] == metrics["params/head/trainable"] == head == 66
    assert metrics["params/layer.0/trainable"] == 0 and metrics["params/layer.0/total"] == 8544
    assert metrics["trainable_fraction"] == pytest.approx(head / metrics["total_params"])


def test_resume_mid_schedule_matches_uninterrupted_run(gradual_run):
    tmp, full_metrics, full_probe = gradual_run
    run(tmp, "part", [*GRADUAL, "trainer.max_epochs=1"])  # stopped after epoch 0: only the head has trained
    # resume=<run folder> continues from its last.ckpt; the larger max_epochs is an override, as on the CLI
    metrics, probe = run(tmp, "part", [*GRADUAL, "trainer.max_epochs=3", f"resume={tmp / 'part'}"])
    trainable = {int(e): top_level(names) for e, names in probe["trainable"].items()}
    assert trainable == {1: {"head", "layer.1"}, 2: {"head", "layer.1", "layer.0"}}
    assert probe["state"] == full_probe["state"]  # same weights, bit for bit
    assert probe["lrs"]["17"] == full_probe["lrs"]["17"]
    for key in ("test/acc", "test/loss", "best/val/acc"):
        assert metrics[key] == pytest.approx(full_metrics[key], abs=1e-6)


def test_slanted_triangular_run_logs_every_group(tmp_path):
    overrides = [
        "finetune=llrd",
        "finetune.lr_decay=0.5",
        "scheduler=slanted_triangular",
        "scheduler.cut_frac=0.25",
        "trainer.max_epochs=2",
    ]
    _, probe = run(tmp_path, "stlr", overrides)
    total, cut = 12, 3

    def factor(t: int) -> float:
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.25 - 1))
        return (1 + p * 31) / 32

    for step in (0, 1, 3, 7, total - 1):
        lrs = probe["lrs"][str(step)]
        assert lrs["head"] == pytest.approx(LR * factor(step))
        assert lrs["embeddings.no_decay"] == pytest.approx(LR / 8 * factor(step))
    columns = pd.read_csv(next((tmp_path / "stlr").rglob("metrics.csv"))).columns
    lr_columns = {c for c in columns if c.startswith("lr-")}
    assert len(lr_columns) == 8 and any(c.endswith("/embeddings.no_decay") for c in lr_columns)


class ImageData(Dataset):
    def __init__(self, n: int = 16):
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_gradual_unfreezing_cnn_keeps_frozen_weights_and_batchnorm_statistics(tmp_path):
    pl.seed_everything(0)
    module = make_module(cnn_backbone(), FinetunePolicy(every_n_epochs=1, start_unfrozen=1), lr=1e-3)
    start = {
        g.name: digest(
            {**dict(g.params), **{f"{i}": b for i, m in enumerate(g.modules) for b in m.buffers()}}
        )
        for g in module.groups
    }
    probe = Probe(str(tmp_path))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    trainer.fit(module, DataLoader(ImageData(), batch_size=8))
    end = {
        g.name: digest(
            {**dict(g.params), **{f"{i}": b for i, m in enumerate(g.modules) for b in m.buffers()}}
        )
        for g in module.groups
    }
    changed = {name for name in start if start[name] != end[name]}
    assert changed == {
        "layer3",
        "layer4",
        "head",
    }  # layer4 from epoch 0, layer3 from epoch 1; BN stats included
    record = json.loads((tmp_path / "probe_rank0.json").read_text())
    epoch1 = {n.split(".")[2] if n.startswith("backbone") else "head" for n in record["trainable"]["1"]}
    assert epoch1 == {"layer3", "layer4", "head"}
    assert len(record["lrs"]["0"]) == 12  # 6 groups x (decayed, no_decay)
