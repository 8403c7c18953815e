"""timm models as ftlab backbones, and EfficientNet-Lite0 with the embedded ImageNet weights."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.data.image import ImagePreprocessing
from ftlab.models.backbones.checkpoints import load_backbone_checkpoint
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataFileError, ModelLoadError

log = logging.getLogger(__name__)


class _OwnParams(nn.Module):
    """Holds a module's own parameters (e.g. a ViT's ``cls_token``) without its children, for one layer group.

    Kept in a plain list by the backbone, never registered as a submodule, so no parameter is counted twice.
    """

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        for name, param in params.items():
            self.register_parameter(name.replace(".", "_"), param)


def _group_name(index: int, names: list[str], last: int) -> str:
    if index == 0:
        return "stem"
    parts = names[0].split(".")
    if re.search(r"\d$", parts[0]):
        return parts[0]  # layer3 (timm ResNets)
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"  # blocks.3, stages.1
    return "top" if index == last else parts[0]


class TimmBackbone(nn.Module):
    """Any ``timm`` model by name, without its classifier (``num_classes=0``); pooled features.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``resnet50``, ``convnext_tiny``, ``test_efficientnet``.
        pretrained: timm's pretrained weights (needs internet or a warm HF cache).
        checkpoint_path: a local file of timm weights for this model (the offline way to get pretrained weights).
        input_size: the square input side; default: the model's pretrained config.
        in_chans: input channels (3 for pretrained weights; 1 trains grayscale natively).
        checkpoint: an earlier ftlab run folder, ``.ckpt`` or ``backbone.pt``: its backbone weights are loaded.
        checkpoint_groups: copy only the bottom n layer groups of ``checkpoint``; ``null``: all of it.
    """

    model: Any  # the timm model: its attributes (pretrained_cfg, group_matcher, ...) are dynamic

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        input_size: int | None = None,
        in_chans: int = 3,
        checkpoint: str | None = None,
        checkpoint_groups: int | None = None,
    ):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ConfigError(
                f"model.backbone.name={name!r} is not a timm model; list them with timm.list_models('pattern*')."
            )
        if checkpoint_path and not Path(checkpoint_path).expanduser().is_file():
            raise DataFileError(f"model.backbone.checkpoint_path={checkpoint_path!r} is not a file.")
        try:
            self.model = timm.create_model(
                name,
                pretrained=pretrained or bool(checkpoint_path),
                num_classes=0,
                in_chans=in_chans,
                pretrained_cfg_overlay={"file": str(Path(checkpoint_path).expanduser())}
                if checkpoint_path
                else None,
            )
        except (OSError, RuntimeError) as err:
            raise ModelLoadError(
                f"timm model {name!r} could not load its pretrained weights ({err}). Offline, pass a local file "
                "(model.backbone.checkpoint_path=/path/to/weights) or model.backbone.pretrained=false."
            ) from err
        self.name = name
        self.out_features: int = self.model.num_features
        cfg = self.model.pretrained_cfg
        size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        if in_chans != len(mean):
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        self.preprocessing = ImagePreprocessing(size, in_chans, mean, std)
        self._holders: list[nn.Module] = []
        self.loaded_checkpoint = load_backbone_checkpoint(self, checkpoint, checkpoint_groups)

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """From timm's coarse ``group_matcher``: ``stem``, one group per stage/block group, the rest with the top."""
        from timm.models import group_parameters

        model = self.model
        grouped = group_parameters(model, model.group_matcher(coarse=True))  # {ordinal: [parameter names]}
        modules = dict(model.named_modules())
        groups: list[tuple[str, list[nn.Module]]] = []
        ordinals = sorted(grouped)
        self._holders = []
        for index, ordinal in enumerate(ordinals):
            names = grouped[ordinal]
            owners: dict[str, list[str]] = {}
            for pname in names:
                owner, _, _ = pname.rpartition(".")
                owners.setdefault(owner, []).append(pname)
            members: list[nn.Module] = []
            for owner, pnames in owners.items():
                module = modules[owner]
                own = dict(module.named_parameters(recurse=False))
                leaf = len(own) == sum(1 for _ in module.parameters())
                if leaf:  # take the module itself, so eval mode and norm detection reach it
                    members.append(module)
                else:
                    holder = _OwnParams({n.rpartition(".")[2]: own[n.rpartition(".")[2]] for n in pnames})
                    self._holders.append(holder)
                    members.append(holder)
            name = _group_name(index, names, len(ordinals) - 1)
            groups.append((name if all(name != g for g, _ in groups) else f"{name}.{index}", members))
        return groups

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch["pixel_values"]`` (B, C, H, W) -> pooled features (B, out_features)."""
        return self.model(batch["pixel_values"])


# lukemelas/EfficientNet-PyTorch naming -> timm's efficientnet_lite0 naming (the embedded file uses the former).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
LITE0_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
LITE0_DEPTHWISE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
LITE0_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_key_map(keys: list[str]) -> dict[str, str]:
    """Each lukemelas key -> its timm key: ``_blocks.N.<layer>.<tensor>`` -> ``blocks.<stage>.<i>.<layer>.<tensor>``."""
    positions = [(stage, i) for stage, depth in enumerate(LITE0_STAGE_DEPTHS) for i in range(depth)]
    mapping = {}
    for key in keys:
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            number, layer, tensor = int(block[1]), block[2], block[3]
            stage, index = positions[number]
            layers = LITE0_DEPTHWISE_BLOCK if stage == 0 else LITE0_INVERTED_BLOCK
            mapping[key] = f"blocks.{stage}.{index}.{layers[layer]}.{tensor}"
        else:
            layer, _, tensor = key.partition(".")
            mapping[key] = f"{LITE0_TOP[layer]}.{tensor}"
    return mapping


class EfficientNetLite0(TimmBackbone):
    """timm's ``efficientnet_lite0`` with the embedded ImageNet-1k weights (Apache-2.0), loaded ``strict=True``.

    Args:
        pretrained: load the embedded weights (``False``: random init, same architecture).
        input_size: the square input side (224 as trained; 64 is enough for MNIST-sized images).
        checkpoint: an earlier ftlab run folder, ``.ckpt`` or ``backbone.pt``, loaded after the ImageNet weights.
        checkpoint_groups: copy only the bottom n layer groups of ``checkpoint``; ``null``: all of it.
    """

    def __init__(
        self,
        pretrained: bool = True,
        input_size: int = 224,
        checkpoint: str | None = None,
        checkpoint_groups: int | None = None,
    ):
        super().__init__("efficientnet_lite0", pretrained=False, input_size=input_size)
        if pretrained:
            path = assets.embedded_path("efficientnet-lite0")
            state = torch.load(path, map_location="cpu", weights_only=True)
            mapping = lite0_key_map(list(state))
            renamed = {mapping[k]: v for k, v in state.items()}
            # the 1000-class ImageNet classifier is dropped: the new head is sized for the task
            renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
            self.model.load_state_dict(renamed, strict=True)
            log.info("Loaded EfficientNet-Lite0 ImageNet weights from %s.", path)
        self.loaded_checkpoint = load_backbone_checkpoint(self, checkpoint, checkpoint_groups)
