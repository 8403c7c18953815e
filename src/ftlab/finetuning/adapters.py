"""Changes made to a backbone before training: PEFT adapters (through ``peft``) and re-initialised layers.

``peft`` wraps the backbone's inner model (``backbone.model``: the HF ``AutoModel`` or the torchvision/timm
network), not the whole ``ClassificationModule``: ftlab's own head stays outside, always trains and is saved in
every checkpoint with the rest of the module, so no ``task_type`` and no ``modules_to_save`` are needed and a
reloaded model cannot come back with a random head. The wrapped model keeps its attribute paths (``PeftModel``
forwards attribute access), so the backbone's ``layer_groups()`` still cover every parameter, adapters included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ftlab.utils.errors import ConfigError

METHODS = ("lora", "ia3")
# CNNs have no ``config.model_type`` for peft to look its defaults up by: adapt every conv and linear layer.
CNN_TARGETS = (nn.Conv2d, nn.Linear)


def _inner_model(backbone: nn.Module) -> nn.Module:
    inner = getattr(backbone, "model", None)
    if not isinstance(inner, nn.Module):
        raise ConfigError(
            f"finetune.peft needs a backbone that keeps its network as `.model`; {type(backbone).__name__} does not."
        )
    return inner


def default_targets(model: nn.Module, method: str) -> list[str] | None:
    """``None`` for HF models (peft's per-architecture defaults: query/value for BERT-style LoRA, key/value/FFN
    output for IA3; a backbone's ``lora_targets`` come first, e.g. every Llama projection); for other networks
    the names of all conv and linear layers."""
    if getattr(getattr(model, "config", None), "model_type", None):
        return None
    names = [name for name, m in model.named_modules() if isinstance(m, CNN_TARGETS) and name]
    if not names:
        raise ConfigError(
            f"finetune.peft.method={method}: no default target modules for {type(model).__name__}; "
            "set finetune.peft.target_modules to a list of module names."
        )
    return names


class PeftAdapter:
    """A ``peft`` method applied to the backbone's inner model.

    Args:
        method: ``lora`` or ``ia3``.
        r, alpha, dropout: LoRA rank, scaling numerator (``lora_alpha``) and dropout on the adapter input.
        target_modules: module names or a regex; ``null`` for the per-family defaults (:func:`default_targets`).
        feedforward_modules: IA3 only: which targets are feed-forward layers (scale inputs instead of outputs).
    """

    def __init__(
        self,
        method: str = "lora",
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.1,
        target_modules: Sequence[str] | str | None = None,
        feedforward_modules: Sequence[str] | str | None = None,
    ):
        if method not in METHODS:
            raise ConfigError(f"finetune.peft.method={method!r} is not one of {', '.join(METHODS)}.")
        if r < 1:
            raise ConfigError(f"finetune.peft.r={r} must be >= 1 (the LoRA rank).")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"finetune.peft.dropout={dropout} must be in [0, 1).")
        self.method, self.r, self.alpha, self.dropout = method, r, alpha, dropout
        self.target_modules = (
            target_modules if isinstance(target_modules, str | None) else list(target_modules)
        )
        self.feedforward_modules = (
            feedforward_modules if isinstance(feedforward_modules, str | None) else list(feedforward_modules)
        )

    def config(self, model: nn.Module, preset: list[str] | None = None) -> Any:
        """The peft config; ``preset``: the backbone's own LoRA targets (``lora_targets``), used when none are set."""
        import peft

        targets = self.target_modules if self.target_modules is not None else preset
        if targets is None:
            targets = default_targets(model, self.method)
        if self.method == "lora":
            return peft.LoraConfig(
                r=self.r,
                lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
                lora_dropout=self.dropout,
                target_modules=targets,
            )
        feedforward = self.feedforward_modules
        if feedforward is None and targets is not None:
            feedforward = []  # CNN defaults: scale every layer's output
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)

    def apply(self, backbone: nn.Module) -> None:
        """Replace ``backbone.model`` by its ``PeftModel``; only adapter parameters keep ``requires_grad``."""
        import peft

        model = _inner_model(backbone)
        try:
            preset = getattr(backbone, "lora_targets", None) if self.method == "lora" else None
            backbone.model = peft.get_peft_model(model, self.config(model, preset))
        except ValueError as err:  # peft's message names the missing target modules or the unsupported layer
            raise ConfigError(
                f"finetune.peft ({self.method}) cannot be applied to {type(model).__name__}: {err}"
            ) from err


def is_peft(backbone: nn.Module) -> bool:
    import peft

    return isinstance(getattr(backbone, "model", None), peft.PeftModel)


def merge_peft(module: Any) -> Any:
    """Merge the adapters of ``module.backbone`` into its weights (for export); returns ``module``, changed in place.

    The merged backbone is a plain model again (same outputs up to float rounding); the module's layer groups are
    rebuilt over it and nothing is fixed any more, so it can be exported or fine-tuned like any other.
    """
    from ftlab.finetuning.groups import build_groups

    backbone: Any = module.backbone  # a peft-wrapped backbone: attributes are dynamic
    if not is_peft(backbone):
        raise ConfigError("merge_peft: the backbone has no peft adapters (train with finetune=lora or ia3).")
    backbone.model = backbone.model.merge_and_unload()
    module.groups = build_groups(backbone, module.head)
    module.fixed = set()
    return module


@torch.no_grad()
def reinit_modules(backbone: nn.Module, modules: list[nn.Module]) -> None:
    """Re-initialise ``modules`` as a freshly built model would be (Zhang et al. 2021, "Revisiting Few-sample BERT
    Fine-tuning"): HF models with their own ``_init_weights``, other networks with each layer's
    ``reset_parameters()``.

    Seeded: the draw uses a generator state forked from ``torch.initial_seed()`` (set by ``seed_everything``), so
    the same seed gives the same weights, and the global RNG is left as it was for whatever is built next.
    """
    inner = getattr(backbone, "model", backbone)
    init_weights: Any = getattr(inner, "_init_weights", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + 1)
        for module in modules:
            for sub in module.modules():
                if init_weights is not None:
                    # transformers 5 skips tensors flagged as loaded from a checkpoint: clear the flags first
                    for tensor in (*sub.parameters(recurse=False), *sub.buffers(recurse=False), sub):
                        if hasattr(tensor, "_is_hf_initialized"):
                            tensor._is_hf_initialized = False
                    init_weights(sub)
                else:
                    reset: Any = getattr(sub, "reset_parameters", None)
                    if reset is not None:
                        reset()
