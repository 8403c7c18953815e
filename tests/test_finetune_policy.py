"""Fine-tuning policies without a Trainer: frozen groups per epoch, LR per group, re-init, STLR, errors."""

from __future__ import annotations

import pytest
import torch

from finetune_helpers import bert_backbone, cnn_backbone, image_batch, make_module
from ftlab.finetuning import FinetunePolicy
from ftlab.models.schedules import slanted_triangular
from ftlab.utils.errors import ConfigError

BERT_GROUPS = ["embeddings", "layer.0", "layer.1", "head"]
CNN_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def trainable_groups(module) -> list[str]:
    """Groups with any trainable parameter (every parameter of such a group, checked)."""
    out = []
    for group in module.groups:
        flags = {p.requires_grad for _, p in group.params}
        assert len(flags) == 1, f"group {group.name} is partly trainable"
        if flags == {True}:
            out.append(group.name)
    return out


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # gradual unfreezing: head only, then one more group from the top per epoch
        (FinetunePolicy(every_n_epochs=1), [["head"], ["layer4", "head"], ["layer3", "layer4", "head"]]),
        # top 2 groups from the start, one more every 2 epochs
        (
            FinetunePolicy(every_n_epochs=2, start_unfrozen=2),
            [
                ["layer3", "layer4", "head"],
                ["layer3", "layer4", "head"],
                ["layer2", "layer3", "layer4", "head"],
            ],
        ),
        # with k=4 the bottom 4 never unfreeze
        (FinetunePolicy(every_n_epochs=1, k=4), [["head"], ["layer4", "head"], ["layer4", "head"]]),
        (FinetunePolicy(k=2), [["layer2", "layer3", "layer4", "head"]] * 3),
        (FinetunePolicy(freeze_backbone=True), [["head"]] * 3),
    ],
)
def test_trainable_groups_per_epoch_cnn(policy, expected):
    module = make_module(cnn_backbone(), policy)
    assert module.group_names == CNN_GROUPS
    module.train()
    for epoch, groups in enumerate(expected):
        module.apply_policy(epoch)
        assert trainable_groups(module) == groups
        # frozen groups are in eval mode (BatchNorm uses and keeps its running statistics), trained ones in train mode
        for group in module.groups:
            modes = {sub.training for m in group.modules for sub in m.modules()}
            assert modes == ({True} if group.name in groups else {False}), group.name


def test_gradual_unfreezing_all_groups_eventually_bert():
    policy = FinetunePolicy(every_n_epochs=1)
    frozen = [policy.frozen(BERT_GROUPS, e) for e in range(5)]
    assert frozen == [
        {"embeddings", "layer.0", "layer.1"},
        {"embeddings", "layer.0"},
        {"embeddings"},
        set(),
        set(),
    ]
    assert policy.always_frozen(BERT_GROUPS) == set()
    assert FinetunePolicy(every_n_epochs=1, k=1).always_frozen(BERT_GROUPS) == {"embeddings"}


def test_llrd_and_multipliers_give_each_optimizer_group_its_lr():
    policy = FinetunePolicy(lr_decay=0.5, lr_multipliers={"embeddings": 0.1, "layer.*": 2.0, "layer.0": 3.0})
    module = make_module(bert_backbone(), policy, lr=1e-3)
    optimizer = module.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    # head at lr; top layer lr*0.5; exact names win over patterns; embeddings 3 groups from the top
    expected = {
        "head": 1e-3,
        "layer.1": 1e-3 * 0.5 * 2.0,
        "layer.0": 1e-3 * 0.25 * 3.0,
        "embeddings": 1e-3 * 0.125 * 0.1,
    }
    assert len(optimizer.param_groups) == 8  # every group split in decayed and .no_decay, from step 0
    for name, lr in expected.items():
        assert lrs[name] == pytest.approx(lr) and lrs[f"{name}.no_decay"] == pytest.approx(lr)
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays["layer.0"] == 0.01 and decays["layer.0.no_decay"] == 0.0


def test_llrd_combines_with_freezing_bottom():
    module = make_module(cnn_backbone(), FinetunePolicy(k=3, lr_decay=0.9), lr=1.0)
    optimizer = module.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["layer4"] == pytest.approx(0.9) and lrs["layer3"] == pytest.approx(0.81)
    assert lrs["stem"] == pytest.approx(0.9**5)
    assert trainable_groups(module) == ["layer3", "layer4", "head"]


def test_slanted_triangular_shape():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = slanted_triangular(optimizer, total_steps=100, cut_frac=0.1, ratio=32)["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1 / 32)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 10  # peak at cut = 10
    assert lrs[5] == pytest.approx((1 + 0.5 * 31) / 32)
    assert lrs[55] == pytest.approx((1 + 0.5 * 31) / 32)  # halfway down the 90 decay steps
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))


@pytest.mark.parametrize("family", ["bert", "cnn"])
def test_reinit_top_k_is_seeded_and_changes_only_the_top(family):
    def build(seed: int, k: int):
        torch.manual_seed(0)  # the same "pretrained" weights each time
        backbone = bert_backbone() if family == "bert" else cnn_backbone()
        for p in backbone.parameters():  # as from_pretrained leaves them: transformers would skip re-init
            p._is_hf_initialized = True
        torch.manual_seed(seed)
        return make_module(backbone, FinetunePolicy(reinit_top_k=k))

    def groups(module):
        return {g.name: [p.detach().clone() for _, p in g.params] for g in module.groups if g.name != "head"}

    base, a, b, c = groups(build(1, 0)), groups(build(1, 2)), groups(build(1, 2)), groups(build(2, 2))
    names = list(base)
    for name in names[:-2]:  # untouched below the top 2
        assert all(torch.equal(x, y) for x, y in zip(base[name], a[name], strict=True))
    for name in names[-2:]:
        weights = [i for i, x in enumerate(base[name]) if x.dim() > 1]
        assert all(not torch.equal(base[name][i], a[name][i]) for i in weights), name  # re-initialised
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name], strict=True))  # same seed, same init
        assert any(
            not torch.equal(x, y) for x, y in zip(a[name], c[name], strict=True)
        )  # another seed differs


def test_bitfit_trains_biases_and_head_only():
    module = make_module(bert_backbone(), FinetunePolicy(train_only=["*bias"]))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    head = {n for n, _ in module.head.named_parameters(prefix="head")}
    biases = {n for n, _ in module.backbone.named_parameters(prefix="backbone") if n.endswith("bias")}
    assert trainable == biases | head and len(biases) > 10
    counts = module.parameter_counts()
    assert counts["trainable_params"] == sum(
        p.numel() for n, p in module.named_parameters() if n in trainable
    )
    assert counts["params/layer.0/trainable"] == sum(
        p.numel() for n, p in module.backbone.named_parameters() if n.endswith("bias") and ".layer.0." in n
    )


def test_frozen_batchnorm_statistics_stay_put_cnn():
    module = make_module(cnn_backbone(), FinetunePolicy(freeze_backbone=True))
    module.train()
    before = {n: b.clone() for n, b in module.backbone.named_buffers()}
    module(image_batch())
    assert all(torch.equal(before[n], b) for n, b in module.backbone.named_buffers())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "finetune.every_n_epochs=0"),
        ({"lr_decay": 0}, "finetune.lr_decay=0"),
        ({"lr_multipliers": {"layer.0": -1}}, "finetune.lr_multipliers"),
        ({"reinit_top_k": -1}, "finetune.reinit_top_k=-1"),
    ],
)
def test_bad_values_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FinetunePolicy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_multipliers": {"encoder.*": 0.5}}, "match no layer group"),
        ({"start_unfrozen": 4, "every_n_epochs": 1}, "finetune.start_unfrozen=4 is more than"),
        ({"reinit_top_k": 9}, "finetune.reinit_top_k=9 is more than"),
        ({"train_only": ["*nothing*"]}, "matches no backbone parameter"),
    ],
)
def test_values_that_do_not_fit_the_model_fail(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_module(bert_backbone(), FinetunePolicy(**kwargs))


@pytest.mark.parametrize(
    "preset", ["full", "head_only", "freeze_bottom", "gradual_unfreeze", "llrd", "bitfit", "lora", "ia3"]
)
def test_every_finetune_preset_composes_and_builds_a_module(preset):
    from hydra.utils import instantiate

    from finetune_helpers import compose_cfg

    cfg = compose_cfg([f"finetune={preset}", "scheduler=slanted_triangular"])
    policy = instantiate(cfg.finetune)
    assert isinstance(policy, FinetunePolicy)
    assert callable(instantiate(cfg.scheduler))
    module = make_module(bert_backbone(), policy)
    assert module.parameter_counts()["trainable_params"] > 0
