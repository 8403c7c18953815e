"""Image backbones: layer groups, weight loading (enum cache, local file, embedded, ftlab checkpoints), BN freezing."""

from __future__ import annotations

import functools

import pytest
import torch

from ftlab.finetuning import FinetunePolicy
from ftlab.finetuning.groups import build_groups
from ftlab.models import ClassificationHead, ClassificationModule
from ftlab.models.backbones import EfficientNetLite0, TimmBackbone, TorchvisionResNet
from ftlab.models.backbones.timm_models import lite0_key_map
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError


def tiny_resnet(**kwargs) -> TorchvisionResNet:
    return TorchvisionResNet("tiny_resnet", input_size=16, **kwargs)


@pytest.mark.parametrize(
    ("make", "groups"),
    [
        (tiny_resnet, ["stem", "layer1", "layer2", "layer3", "layer4"]),
        (
            lambda: TimmBackbone("test_efficientnet", input_size=32),
            ["stem", *[f"blocks.{i}" for i in range(5)]],
        ),
        (
            lambda: TimmBackbone("test_resnet", input_size=32),
            ["stem", "layer1", "layer2", "layer3", "layer4"],
        ),
        (lambda: TimmBackbone("test_vit", input_size=32), ["stem", *[f"blocks.{i}" for i in range(6)]]),
    ],
)
def test_every_parameter_in_one_group_and_pooled_features(make, groups):
    backbone = make()
    built = build_groups(backbone, ClassificationHead(backbone.out_features, 3))
    assert [g.name for g in built] == [*groups, "head"]
    size = backbone.preprocessing.input_size
    features = backbone({"pixel_values": torch.randn(2, 3, size, size)})
    assert features.shape == (2, backbone.out_features)


def test_efficientnet_lite0_loads_the_embedded_weights_strictly():
    import timm

    state = torch.load(assets.embedded_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    mapping = lite0_key_map(list(state))
    target = set(timm.create_model("efficientnet_lite0").state_dict())
    assert len(set(mapping.values())) == len(state) == 296 and set(mapping.values()) == target  # one to one
    backbone = EfficientNetLite0(input_size=64)
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[mapping[k]], v) for k, v in state.items() if not k.startswith("_fc."))
    assert backbone.preprocessing.mean == (0.485, 0.456, 0.406) and backbone.out_features == 1280
    assert len(build_groups(backbone, ClassificationHead(1280, 2))) == 9  # stem, blocks.0-6, head


def test_resnet_weights_enum_resolves_through_a_warm_torch_home(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    reference = resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / ResNet18_Weights.IMAGENET1K_V1.url.split("/")[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    backbone = TorchvisionResNet("resnet18", weights="IMAGENET1K_V1")
    assert torch.equal(backbone.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(backbone.model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_resnet_local_weights_file_and_bad_names(tmp_path):
    from torchvision.models import resnet18

    reference = resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    backbone = TorchvisionResNet("resnet18", weights=str(tmp_path / "r18.pth"))
    assert torch.equal(backbone.model.layer2[0].conv1.weight, reference.layer2[0].conv1.weight)
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        TorchvisionResNet("resnet18", weights="IMAGENET_BEST")
    with pytest.raises(ConfigError, match="model.backbone.arch"):
        TorchvisionResNet("resnet101")
    with pytest.raises(ConfigError, match="timm.list_models"):
        TimmBackbone("no_such_model_xyz")


def test_backbone_checkpoint_loads_backbone_only_and_rejects_other_architectures(tmp_path):
    source = tiny_resnet()
    with torch.no_grad():
        source.model.layer3[0].conv1.weight.add_(1.0)
    # a Lightning checkpoint: backbone.* and head.* keys; only the backbone is taken
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["head.layers.1.weight"] = torch.zeros(5, 64)
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "best.ckpt")
    loaded = tiny_resnet(checkpoint=str(tmp_path / "best.ckpt"))
    assert torch.equal(loaded.model.layer3[0].conv1.weight, source.model.layer3[0].conv1.weight)
    assert loaded.loaded_checkpoint == str(tmp_path / "best.ckpt")
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    assert torch.equal(
        tiny_resnet(checkpoint=str(tmp_path)).model.bn1.running_mean, source.model.bn1.running_mean
    )
    with pytest.raises(ConfigError, match="missing keys") as info:
        TimmBackbone("test_resnet", checkpoint=str(tmp_path / "backbone.pt"))
    assert "unexpected keys" in str(info.value) and "backbone.pt" in str(info.value)
    with pytest.raises(FileNotFoundError, match="model.backbone.checkpoint"):
        tiny_resnet(checkpoint=str(tmp_path / "nothing_here"))


@pytest.mark.parametrize("n", [0, 2, 5])
def test_checkpoint_groups_copies_only_the_bottom_n_groups(tmp_path, n):
    """Yosinski et al.'s AnB: groups below n come from the checkpoint, the others keep their fresh init."""
    torch.manual_seed(1)
    source = tiny_resnet()
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    torch.manual_seed(2)
    fresh = tiny_resnet()
    torch.manual_seed(2)  # the same init as `fresh`, then the bottom n groups copied
    loaded = tiny_resnet(checkpoint=str(tmp_path), checkpoint_groups=n)
    names = ["stem", "layer1", "layer2", "layer3", "layer4"]
    for i, (name, modules) in enumerate(loaded.layer_groups()):
        assert name == names[i]
        copied = modules[0].state_dict()
        want = source if i < n else fresh
        want_state = dict(want.layer_groups())[name][0].state_dict()
        assert all(torch.equal(copied[k], want_state[k]) for k in copied), (name, n)
    # buffers too: BatchNorm running statistics of copied groups come from the source
    if n >= 1:
        source.model.bn1.running_mean.add_(3.0)
        torch.save(source.state_dict(), tmp_path / "backbone.pt")
        again = tiny_resnet(checkpoint=str(tmp_path), checkpoint_groups=n)
        assert torch.equal(again.model.bn1.running_mean, source.model.bn1.running_mean)


def test_checkpoint_groups_errors(tmp_path):
    torch.save(tiny_resnet().state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(ConfigError, match=r"checkpoint_groups=6 must be between 0 and .* 5 layer groups"):
        tiny_resnet(checkpoint=str(tmp_path), checkpoint_groups=6)
    with pytest.raises(ConfigError, match="checkpoint_groups=2 needs model.backbone.checkpoint"):
        tiny_resnet(checkpoint_groups=2)
    with pytest.raises(
        ConfigError, match="missing keys"
    ):  # a wrong architecture is refused even for n groups
        TimmBackbone("test_resnet", checkpoint=str(tmp_path), checkpoint_groups=1)


def _train_steps(policy: FinetunePolicy, steps: int = 3) -> tuple[dict, dict, ClassificationModule]:
    torch.manual_seed(0)
    backbone = tiny_resnet()
    module = ClassificationModule(
        backbone,
        ClassificationHead(backbone.out_features, 3),
        policy,
        optimizer=functools.partial(torch.optim.AdamW, lr=0.1),
        num_classes=3,
    )
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(steps):
        batch = {"pixel_values": torch.randn(8, 3, 16, 16) * 3 + 1, "labels": torch.randint(0, 3, (8,))}
        loss = module.loss(module(batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, module.backbone.state_dict(), module


def _changed(before: dict, after: dict, prefix: str) -> dict[str, bool]:
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)}


def test_frozen_groups_keep_weights_and_batchnorm_statistics_bit_identical():
    before, after, module = _train_steps(FinetunePolicy(k=2))
    assert module.frozen == {"stem", "layer1"}
    for prefix in ("model.conv1", "model.bn1", "model.layer1."):
        changed = _changed(before, after, prefix)
        assert changed and not any(changed.values()), prefix  # weights, running_mean/var, num_batches_tracked
    assert not module.backbone.model.bn1.training and module.backbone.model.layer2[0].bn1.training
    for trained in (
        "model.layer2.0.bn1.running_mean",
        "model.layer2.0.conv1.weight",
        "model.layer4.0.bn2.weight",
    ):
        assert not torch.equal(before[trained], after[trained]), trained


def test_train_bn_lets_frozen_batchnorm_statistics_move_but_not_weights():
    before, after, module = _train_steps(FinetunePolicy(freeze_backbone=True, train_bn=True))
    assert module.backbone.model.bn1.training
    assert not torch.equal(before["model.bn1.running_mean"], after["model.bn1.running_mean"])
    assert not torch.equal(before["model.layer4.0.bn2.running_var"], after["model.layer4.0.bn2.running_var"])
    weights = [k for k in before if k.endswith("weight") or k.endswith("bias")]
    assert weights and all(torch.equal(before[k], after[k]) for k in weights)
