"""Shared pieces of the fine-tuning strategy tests: a tiny CNN backbone, a tiny text dataset, composed configs and a
probe callback that records what trained in each epoch."""

from __future__ import annotations

import hashlib
import json
import random
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from ftlab.finetuning import FinetunePolicy
from ftlab.models import ClassificationHead
from ftlab.models.module import ClassificationModule

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)


class SmallResNetBackbone(nn.Module):
    """A 1-block-per-stage torchvision ResNet as an ftlab backbone (stand-in for ``model=tiny_resnet``)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [1, 1, 1, 1])
        net.fc = nn.Identity()
        self.model, self.out_features = net, 512

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        m = self.model
        return [("stem", [m.conv1, m.bn1]), *[(f"layer{i}", [getattr(m, f"layer{i}")]) for i in range(1, 5)]]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["pixel_values"])  # (B, 512)


def cnn_backbone() -> nn.Module:
    # When ftlab.models.backbones.vision lands, point this at the real twin (one line):
    # return instantiate(compose_cfg(["model=tiny_resnet"]).model.backbone)
    return SmallResNetBackbone()


def bert_backbone() -> nn.Module:
    from ftlab.models.backbones import HFTextBackbone

    return HFTextBackbone(
        "embedded:all-MiniLM-L6-v2", pretrained=False, pooling="mean", config_overrides=TINY_BERT
    )


def text_batch(n: int = 4, length: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 2000, (n, length), generator=gen),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
    }


def image_batch(n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=gen), "labels": torch.arange(n) % 2}


def make_module(
    backbone: nn.Module, policy: FinetunePolicy, lr: float = 1e-3, scheduler: Any = None, num_classes: int = 2
) -> ClassificationModule:
    head = ClassificationHead(backbone.out_features, num_classes)
    return ClassificationModule(
        backbone,
        head,
        policy,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        scheduler=scheduler,
        num_classes=num_classes,
    )


def write_text_data(folder: Path, n: int = 64) -> Path:
    """A learnable two-class CSV (a positive or negative word in each text)."""
    rng = random.Random(0)
    good, bad, filler = (
        ["great", "wonderful", "superb"],
        ["awful", "boring", "terrible"],
        ["the", "film", "a", "plot"],
    )
    rows = ["text,label"]
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(5)] + [rng.choice(good if label else bad)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
    path = folder / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def compose_cfg(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_run_overrides(tmp_path: Path, run_dir: Path, probe_dir: Path | None = None) -> list[str]:
    """A tiny_bert run on a 64-text CSV: 48 train texts in 6 batches, no sanity check, no early stopping."""
    data = tmp_path / "train.csv" if (tmp_path / "train.csv").exists() else write_text_data(tmp_path)
    overrides = [
        "model=tiny_bert",
        "data=text_files",
        f"data.train_file={data}",
        "data.max_length=16",
        "data.batch_size=8",
        "data.val_fraction=0.125",
        "data.test_fraction=0.125",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "callbacks=no_early_stopping",
        "callbacks.progress_bar.kind=log",
        "logger=csv",
        f"paths.output_dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "optimizer.lr=1e-2",
    ]
    if probe_dir is not None:
        overrides += [
            "+callbacks.probe._target_=finetune_helpers.Probe",
            f"+callbacks.probe.folder={probe_dir}",
        ]
    return overrides


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Probe(pl.Callback):
    """Records, per epoch, the trainable parameter names and each optimizer group's LR per step; per group, a digest
    of its weights at fit start and end; written to ``<folder>/probe_rank<r>.json`` at fit end."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.record: dict[str, Any] = {"trainable": {}, "lrs": {}, "start": {}, "end": {}, "grads": {}}

    def _group_digests(self, module: ClassificationModule) -> dict[str, str]:
        out = {g.name: digest(dict(g.params)) for g in module.groups}
        out["buffers"] = digest(dict(module.named_buffers()))
        return out

    def on_fit_start(self, trainer: pl.Trainer, module: ClassificationModule) -> None:
        if trainer.current_epoch == 0:
            self.record["start"] = self._group_digests(module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: ClassificationModule, batch: Any, idx: int
    ) -> None:
        epoch = str(trainer.current_epoch)
        if epoch not in self.record["trainable"]:  # the module's own epoch-start hook has run by now
            self.record["trainable"][epoch] = sorted(
                n for n, p in module.named_parameters() if p.requires_grad
            )
            self.record["grads"][epoch] = sorted(module.keep_grad)
        optimizer = trainer.optimizers[0]
        self.record["lrs"][str(trainer.global_step)] = {g["name"]: g["lr"] for g in optimizer.param_groups}

    def on_fit_end(self, trainer: pl.Trainer, module: ClassificationModule) -> None:
        self.record["end"] = self._group_digests(module)
        self.record["state"] = digest(dict(module.state_dict()))
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def read_probe(folder: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((folder / f"probe_rank{rank}.json").read_text())
