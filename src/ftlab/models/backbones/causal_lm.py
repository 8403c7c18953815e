"""A decoder LLM with its own language-model head, for ``data.task=causal_lm`` (instruction tuning).

The backbone is the whole ``AutoModelForCausalLM``: its ``token_features`` are the next-token logits (B, T, V) and
the run's head (:class:`OwnLMHead`) passes them through. So the output layer is the model's own ``lm_head`` (tied
to the input embeddings in SmolLM2 and most small LLMs: one parameter, in the ``embeddings`` group), and HF
``generate`` works on ``backbone.model`` with or without peft adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ftlab.data.text import TextPreprocessing
from ftlab.utils.errors import ConfigError


class HFCausalLM(nn.Module):
    """An HF causal LM (``AutoModelForCausalLM``) as an ftlab backbone whose features are next-token logits.

    Args:
        name_or_path: a local folder, a hub name (warm cache offline) or ``embedded:smollm2``.
        pretrained: load weights; ``False``: the architecture with random weights (tiny test twins).
        config_overrides: changes to the model config (layers, width, ...).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        cache_dir: where a GGUF model's fp32 conversion is cached (``null``: ``$FTLAB_CACHE`` or ~/.cache/ftlab).
    """

    def __init__(
        self,
        name_or_path: str,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__()
        # shared with model=smollm2 / model=llm: GGUF files (embedded:smollm2) become a cached fp32 folder once
        from ftlab.models.backbones.llm import (
            LLAMA_TARGETS,
            enable_checkpointing,
            load_causal_lm,
            resolve_llm,
        )

        path = resolve_llm(name_or_path, cache_dir)
        model: Any  # an HF PreTrainedModel (its methods are not typed as nn.Module's)
        _, model = load_causal_lm(path, cache_dir, pretrained=pretrained, config_overrides=config_overrides)
        if not hasattr(model, "generate") or model.get_output_embeddings() is None:
            raise ConfigError(
                f"model.backbone.name_or_path={name_or_path!r} is not a causal LM with an LM head."
            )
        if gradient_checkpointing:
            enable_checkpointing(model)
        self.name_or_path, self.model = name_or_path, model
        self.out_features: int = int(model.get_output_embeddings().weight.shape[0])  # the vocabulary
        limit = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.preprocessing = TextPreprocessing(tokenizer=path, max_length=limit)
        self.loaded_checkpoint: str | None = None
        # finetune=lora's preset targets (every attention and MLP projection of a Llama-style block)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        self.lora_targets: list[str] | None = [t for t in LLAMA_TARGETS if t in names] or None

    def _base(self) -> Any:
        """The HF model under a peft wrapper (peft forwards attributes, but ``.model`` means another thing there)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """``embeddings`` (with the tied LM head), ``layer.0`` ... ``layer.{n-1}``, ``norm`` (the final norm, and
        an untied LM head)."""
        base = self._base()
        decoder = base.get_decoder()
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"{type(base).__name__}: no decoder `layers` list to build layer groups from.")
        groups: list[tuple[str, list[nn.Module]]] = [("embeddings", [base.get_input_embeddings()])]
        groups += [(f"layer.{i}", [block]) for i, block in enumerate(layers)]
        grouped = {id(p) for _, modules in groups for m in modules for p in m.parameters()}
        top = [m for m in decoder.children() if m is not layers and not isinstance(m, nn.Embedding)]
        top.append(base.get_output_embeddings())  # tied: already in embeddings, skipped by build_groups
        top = [m for m in top if any(id(p) not in grouped for p in m.parameters())]
        return groups + ([("norm", top)] if top else [])

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # packed rows carry position_ids and no attention_mask: HF then keeps attention inside each example
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    def token_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits (B, T, V), unshifted: position t scores token t + 1."""
        return self.model(**self._inputs(batch), use_cache=False).logits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.token_features(batch)

    def input_embeddings(self) -> nn.Module:
        return self._base().get_input_embeddings()


class OwnLMHead(nn.Module):
    """The head of a :class:`HFCausalLM` run: the backbone already applied the model's own LM head, so this one
    passes the logits through, cut to the tokenizer's vocabulary (no parameters: nothing new is initialised)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        if in_features < num_classes:  # an LM's vocabulary may be padded beyond the tokenizer's, not smaller
            raise ConfigError(
                f"The causal LM's output layer has {in_features} rows and its tokenizer {num_classes} tokens: some "
                "tokens could never be predicted. Use the tokenizer that ships with the model."
            )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        # rows past the tokenizer's vocabulary (an LM's padded embedding matrix) are never a valid next token
        return logits[..., : self.num_classes]
