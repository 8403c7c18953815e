"""torchvision ResNets (and a tiny twin for tests) as ftlab backbones."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from ftlab.data.image import ImagePreprocessing
from ftlab.models.backbones.checkpoints import load_backbone_checkpoint
from ftlab.utils.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNETS = ("resnet18", "resnet34", "resnet50", "tiny_resnet")
GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4")


class TinyResNet(nn.Module):
    """A ResNet with one BasicBlock per stage and widths 8-64 (~0.2M parameters): the test twin of ResNet-18.

    Its module names match torchvision's ResNet (conv1, bn1, layer1..layer4), so the same layer groups apply.
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width)
                )
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(inplanes, width, stride, downsample)))
            inplanes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.out_features = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in ("layer1", "layer2", "layer3", "layer4"):  # set with setattr in __init__
            x = getattr(self, name)(x)
        return torch.flatten(self.avgpool(x), 1)


def _torchvision_resnet(arch: str, weights: str | None) -> nn.Module:
    """A torchvision ResNet with weights: none, an enum name (``IMAGENET1K_V1``, ``DEFAULT``) or a local file."""
    import torchvision.models as tvm

    local = weights is not None and (Path(weights).expanduser().exists() or weights.endswith((".pth", ".pt")))
    if weights is None or local:
        model = tvm.get_model(arch, weights=None)
        if local:
            _load_local(model, str(weights))
        return model
    enum = tvm.get_model_weights(arch)
    name = weights.split(".")[-1]
    try:
        resolved = tvm.get_weight(f"{enum.__name__}.{name}")
    except (ValueError, KeyError) as err:
        allowed = ", ".join(w.name for w in enum)
        raise ConfigError(
            f"model.backbone.weights={weights!r} is not a weight of {arch}; use null, one of {allowed}, DEFAULT, "
            "or a local checkpoint path."
        ) from err
    try:  # torchvision reads $TORCH_HOME/hub/checkpoints/<file> when it is there and downloads otherwise
        return tvm.get_model(arch, weights=resolved)
    except (OSError, RuntimeError) as err:
        raise ModelLoadError(
            f"model.backbone.weights={weights!r} could not be loaded ({err}). Offline, put {resolved.url.split('/')[-1]} "
            "in $TORCH_HOME/hub/checkpoints/, pass a local file (model.backbone.weights=/path/to/resnet.pth), or "
            "pretrain one with ftlab (model.backbone.checkpoint=<run folder>)."
        ) from err


def _load_local(model: nn.Module, path: str) -> None:
    state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier is replaced
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"model.backbone.weights={path!r} does not fit this ResNet: missing {missing[:8]}, unexpected "
            f"{result.unexpected_keys[:8]}. Give a torchvision ResNet state dict of the same depth."
        )
    log.info("Loaded ResNet weights from %s.", path)


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet-18/34/50 (or ``tiny_resnet``) without its classifier; pooled features.

    Args:
        arch: ``resnet18``, ``resnet34``, ``resnet50`` or ``tiny_resnet`` (random weights, for tests).
        weights: ``null`` (random init), a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``; downloaded or
            read from ``$TORCH_HOME``), or a local state-dict file.
        input_size: the square input side the data is resized to.
        checkpoint: an earlier ftlab run folder, ``.ckpt`` or ``backbone.pt``: its backbone weights are loaded.
        checkpoint_groups: copy only the bottom n layer groups of ``checkpoint`` (stem, layer1, ...); ``null``: all.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        weights: str | None = None,
        input_size: int = 224,
        checkpoint: str | None = None,
        checkpoint_groups: int | None = None,
    ):
        super().__init__()
        if arch not in RESNETS:
            raise ConfigError(f"model.backbone.arch={arch!r} is not one of {', '.join(RESNETS)}.")
        if arch == "tiny_resnet":
            if weights is not None:
                raise ConfigError(
                    "model.backbone.weights must be null for arch=tiny_resnet (it has no pretrained weights)."
                )
            self.model: nn.Module = TinyResNet()
            self.out_features: int = self.model.out_features
        else:
            self.model = _torchvision_resnet(arch, weights)
            assert isinstance(self.model.fc, nn.Linear)
            self.out_features = self.model.fc.in_features
            self.model.fc = nn.Identity()  # the new head lives outside the backbone
        self.preprocessing = ImagePreprocessing(input_size, 3, IMAGENET_MEAN, IMAGENET_STD)
        self.loaded_checkpoint = load_backbone_checkpoint(self, checkpoint, checkpoint_groups)

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """``stem`` (conv1 + bn1), then ``layer1`` ... ``layer4``, bottom to top."""
        model = self.model
        return [("stem", [model.conv1, model.bn1])] + [(name, [getattr(model, name)]) for name in GROUPS[1:]]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch["pixel_values"]`` (B, 3, H, W) -> features (B, out_features)."""
        return self.model(batch["pixel_values"])
