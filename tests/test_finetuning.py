"""The fine-tuning mechanism: layer groups, optimizer groups, freezing (weights and norm statistics), counts."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from ftlab.finetuning import FinetunePolicy
from ftlab.models import ClassificationHead, ClassificationModule
from ftlab.utils.errors import ConfigError

from conftest import compose_cfg, tiny_text_overrides


def build_text(reviews_csv, tmp_path, finetune: str, *extra: str):
    cfg = compose_cfg(
        [*tiny_text_overrides(reviews_csv, tmp_path), f"finetune={finetune}", *extra], tmp_path / "run"
    )
    pl.seed_everything(0)
    backbone = instantiate(cfg.model.backbone)
    dm = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    dm.setup()
    head = instantiate(cfg.model.head, in_features=backbone.out_features, num_classes=dm.num_classes)
    module = ClassificationModule(
        backbone,
        head,
        instantiate(cfg.finetune),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        num_classes=dm.num_classes,
    )
    return module, dm


class ModeProbe(pl.Callback):
    """Records, at every training batch, which modules are in train mode."""

    def __init__(self):
        self.backbone_training: set[bool] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        leaves = [
            m for m in pl_module.backbone.modules() if not list(m.children())
        ]  # dropout, norms, linears
        self.backbone_training |= {m.training for m in leaves}


def fit(module, datamodule=None, loader=None, epochs=1, callbacks=()):
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=datamodule, train_dataloaders=loader)
    return trainer


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_groups(module: ClassificationModule, before: dict[str, torch.Tensor]) -> set[str]:
    names = {n: g.name for g in module.groups for n, _ in g.params}
    after = module.state_dict()
    return {names[k] for k in names if not torch.equal(before[k], after[k])}


GROUPS = ["embeddings", "layer.0", "layer.1", "head"]


@pytest.mark.parametrize(
    ("finetune", "extra", "trained"),
    [
        ("full", [], set(GROUPS)),
        ("head_only", [], {"head"}),
        ("freeze_bottom", ["finetune.k=2"], {"layer.1", "head"}),
    ],
)
def test_exactly_the_trainable_groups_change(reviews_csv, tmp_path, finetune, extra, trained):
    module, dm = build_text(reviews_csv, tmp_path, finetune, *extra)
    assert module.group_names == GROUPS
    trainable = {n for g in module.groups for n, p in g.params if p.requires_grad}
    assert trainable == {n for g in module.groups if g.name in trained for n, _ in g.params}
    before = snapshot(module)
    probe = ModeProbe()
    fit(module, dm, callbacks=[probe])
    assert changed_groups(module, before) == trained  # frozen groups are bit-identical
    if finetune == "head_only":
        assert probe.backbone_training == {False}  # a frozen backbone runs in eval mode (no dropout)
        counts = module.parameter_counts()
        assert counts["trainable_params"] == sum(p.numel() for p in module.head.parameters())


def test_optimizer_groups_are_named_fixed_and_skip_decay_on_bias_and_norm(reviews_csv, tmp_path):
    module, dm = build_text(reviews_csv, tmp_path, "head_only", "optimizer.weight_decay=0.05")
    trainer = fit(module, dm)
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == [
        n + s for n in GROUPS for s in ("", ".no_decay")
    ]  # frozen groups too
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, param in module.named_parameters():
        expected = 0.0 if name.endswith("bias") or "LayerNorm" in name else 0.05
        assert by_id[id(param)]["weight_decay"] == expected, name
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))


class ToyCNN(nn.Module):
    """Two conv+BN groups: enough to see BatchNorm statistics move or not."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.out_features = 8

    def layer_groups(self):
        return [("stem", [self.stem]), ("block", [self.block])]

    def forward(self, batch):
        return self.block(self.stem(batch["pixel_values"])).flatten(1)


def image_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=g) * 3 + 1, torch.randint(0, 2, (32,), generator=g)
    return DataLoader([{"pixel_values": x[i], "labels": y[i]} for i in range(32)], batch_size=8)


@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_batchnorm_statistics_stay_unless_train_bn(train_bn):
    torch.manual_seed(0)
    backbone = ToyCNN()
    module = ClassificationModule(
        backbone,
        ClassificationHead(8, 2),
        FinetunePolicy(k=1, train_bn=train_bn),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )
    bn = backbone.stem[1]
    before = snapshot(module)
    fit(module, loader=image_loader())
    assert torch.equal(bn.weight, before["backbone.stem.1.weight"])  # frozen: affine weights never move
    moved = not torch.equal(bn.running_mean, before["backbone.stem.1.running_mean"])
    assert moved is train_bn
    assert not torch.equal(backbone.block[1].running_mean, before["backbone.block.1.running_mean"])
    assert changed_groups(module, before) == {"block", "head"}  # the frozen stem's parameters never move


def test_policy_rejects_k_beyond_the_groups(reviews_csv, tmp_path):
    with pytest.raises(ConfigError, match=r"finetune.k=9 is more than the backbone's 3 layer groups"):
        build_text(reviews_csv, tmp_path, "freeze_bottom", "finetune.k=9")
