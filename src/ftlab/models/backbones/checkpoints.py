"""Backbone weights from an earlier ftlab run, for transfer: the old head is dropped, the backbone loaded strictly."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ftlab.utils.errors import ConfigError, DataFileError

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pt"
PREFIX = "backbone."


def resolve_checkpoint(checkpoint: str) -> Path:
    """A run folder (its ``backbone.pt``, else ``checkpoints/best.ckpt``, else ``last.ckpt``) or a file."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for candidate in (BACKBONE_FILE, "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
            if (path / candidate).is_file():
                return path / candidate
        raise DataFileError(
            f"model.backbone.checkpoint={checkpoint!r} is a folder without {BACKBONE_FILE} or checkpoints/*.ckpt; "
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
    # A Lightning .ckpt also holds hyper-parameters and loop state (plain Python objects), so it is not weights-only.
    state = torch.load(path, map_location="cpu", weights_only=path.suffix != ".ckpt")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return state


def load_backbone_checkpoint(backbone: nn.Module, checkpoint: str) -> str:
    """Load only backbone weights into ``backbone``; returns the file used. Architecture mismatch -> ConfigError."""
    path = resolve_checkpoint(checkpoint)
    state = backbone_state_dict(path)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise ConfigError(
            f"model.backbone.checkpoint={checkpoint!r} ({path}) does not fit this backbone: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, "
            f"shape mismatches {wrong_shape[:8]}. Use the same model (and model.backbone settings) as the run "
            "that saved it."
        )
    backbone.load_state_dict(state, strict=True)
    log.info("Loaded backbone weights from %s (%d tensors).", path, len(state))
    return str(path)
