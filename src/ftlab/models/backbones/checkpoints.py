"""Backbone weights from an earlier ftlab run, for transfer: the old head is dropped, the backbone loaded strictly."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ftlab.finetuning.groups import backbone_groups
from ftlab.runs import folder
from ftlab.utils.errors import ConfigError, DataFileError

log = logging.getLogger(__name__)

PREFIX = "backbone."
PEFT_MARK = "base_model.model."  # keys of a backbone whose network peft wrapped (finetune=lora / ia3)


def resolve_checkpoint(checkpoint: str) -> Path:
    """A run folder (its ``backbone.pt``, else ``checkpoints/best.ckpt``, else ``last.ckpt``) or a file."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for candidate in (folder.BACKBONE_FILE, folder.BEST_CKPT, folder.LAST_CKPT):
            if (path / candidate).is_file():
                return path / candidate
        raise DataFileError(
            f"model.backbone.checkpoint={checkpoint!r} is a folder without {folder.BACKBONE_FILE} or checkpoints/*.ckpt; "
            "give the folder of a finished ftlab run, a .ckpt file or a backbone.pt file."
        )
    if not path.is_file():
        raise DataFileError(
            f"model.backbone.checkpoint={checkpoint!r} does not exist; give an ftlab run folder, a .ckpt or a "
            "backbone.pt file."
        )
    return path


def backbone_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors: a Lightning checkpoint's ``backbone.*`` keys (prefix stripped) or a plain state dict."""
    state = folder.read_checkpoint(path)  # weights-only: a checkpoint from elsewhere never runs pickled code
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return state


def source_run(path: Path) -> Path | None:
    """The ftlab run folder a checkpoint file belongs to (``<run>/backbone.pt``, ``<run>/checkpoints/*.ckpt``)."""
    for run in (path.parent, path.parent.parent):
        if (run / folder.CONFIG_FILE).is_file():
            return run
    return None


def source_model(path: Path) -> str:
    """The ``model.backbone`` config of the run that wrote ``path``, in one line (empty when unknown)."""
    run = source_run(path)
    if run is None:
        return ""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(run / folder.CONFIG_FILE).model.backbone
        shown = OmegaConf.to_container(node, resolve=False)
    except Exception:  # an unreadable record only loses the hint; the mismatch itself is reported
        return ""
    keys = ("_target_", "name_or_path", "arch", "name", "config_overrides", "pooling")
    return ". It was written by a run with model.backbone = " + str(
        {k: v for k, v in shown.items() if k in keys}  # type: ignore[union-attr]
    )


def merged_peft_state(path: Path, checkpoint: str) -> dict[str, torch.Tensor]:
    """The backbone of a peft run (LoRA / IA3) with its adapters merged into the weights: the run is rebuilt from
    its folder (its finetune config says how the adapters were made) and merged (``merge_and_unload``)."""
    run = source_run(path)
    if run is None:
        raise ConfigError(
            f"model.backbone.checkpoint={checkpoint!r} holds a peft-wrapped backbone (finetune=lora / ia3) outside "
            "its run folder, so its adapters cannot be merged; give the run folder itself."
        )
    from ftlab.finetuning.adapters import merge_peft
    from ftlab.runs.rebuild import load_run

    module = merge_peft(load_run(run, path if path.suffix == ".ckpt" else None).module)
    log.info("Merged the peft adapters of %s into its backbone weights.", run)
    return module.backbone.state_dict()


def group_state_keys(backbone: nn.Module, n: int) -> set[str]:
    """State-dict keys (parameters and buffers) of the bottom ``n`` of ``backbone.layer_groups()``."""
    names = {id(m): name for name, m in backbone.named_modules()}
    keys: set[str] = set()
    for _, modules in backbone_groups(backbone)[:n]:
        for module in modules:
            prefix = names[id(module)]
            keys.update(f"{prefix}.{k}" if prefix else k for k in module.state_dict())
    return keys


def load_backbone_checkpoint(
    backbone: nn.Module, checkpoint: str | None, groups: int | None = None
) -> str | None:
    """Load backbone weights into ``backbone``; returns the file used (None without a checkpoint). Architecture
    mismatch -> ConfigError.

    ``groups=n`` copies only the bottom ``n`` layer groups (``model.backbone.checkpoint_groups``), the rest keep
    their fresh initialisation: the transfer experiment of Yosinski et al. (2014), whose AnB / AnB+ networks copy
    the first n layers of a network trained on task A. The whole checkpoint must still fit the architecture.
    """
    if not checkpoint:
        if groups is not None:
            raise ConfigError(
                f"model.backbone.checkpoint_groups={groups} needs model.backbone.checkpoint (the run whose bottom "
                "groups are copied); set it, or set checkpoint_groups=null."
            )
        return None
    path = resolve_checkpoint(checkpoint)
    state = backbone_state_dict(path)
    if any(PEFT_MARK in k for k in state) and not any(PEFT_MARK in k for k in backbone.state_dict()):
        state = merged_peft_state(path, checkpoint)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise ConfigError(
            f"model.backbone.checkpoint={checkpoint!r} ({path}) does not fit this backbone: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, "
            f"shape mismatches {wrong_shape[:8]}{source_model(path)}. Use the same model (and model.backbone "
            "settings: name_or_path, config_overrides, pooling) as the run that saved it."
        )
    if groups is None:
        backbone.load_state_dict(state, strict=True)
        log.info("Loaded backbone weights from %s (%d tensors).", path, len(state))
        return str(path)
    names = [name for name, _ in backbone_groups(backbone)]
    if not 0 <= groups <= len(names):
        raise ConfigError(
            f"model.backbone.checkpoint_groups={groups} must be between 0 and the backbone's {len(names)} layer "
            f"groups ({', '.join(names)}), or null to load all of the checkpoint."
        )
    keys = group_state_keys(backbone, groups)
    backbone.load_state_dict({k: v for k, v in state.items() if k in keys}, strict=False)
    log.info(
        "Loaded the bottom %d layer groups (%s; %d tensors) from %s; the other groups keep their initialisation.",
        groups,
        ", ".join(names[:groups]) or "none",
        len(keys),
        path,
    )
    return str(path)
