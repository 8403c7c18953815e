"""HF transformer encoders (BERT family and friends) as ftlab backbones."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from ftlab.data.text import TextPreprocessing
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

POOLING = ("cls", "mean", "pooler")
# Where encoder families keep their stack of blocks, tried in order; the longest ModuleList is the fall-back.
LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer")


def _get(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class HFTextBackbone(nn.Module):
    """An ``AutoModel`` encoder from a local folder, a hub name or ``embedded:<name>``, pooled to one vector.

    Args:
        name_or_path: hub name, local folder, or ``embedded:all-MiniLM-L6-v2``.
        pooling: ``cls`` (first token), ``mean`` (mask-aware mean of the last layer), ``pooler`` (the model's
            pooler; only then is the pooler kept, so no parameter is left without a gradient).
        pretrained: load weights; ``False`` builds the architecture with random weights (tiny test twins).
        config_overrides: changes to the model config (layer count, width, dropout, ...).
        trust_remote_code: passed to transformers; off unless the user turns it on.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "mean",
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if pooling not in POOLING:
            raise ConfigError(f"model.backbone.pooling={pooling!r} is not one of {', '.join(POOLING)}.")
        from transformers import AutoConfig, AutoModel

        self.name_or_path, self.pooling = name_or_path, pooling
        path = assets.resolve(name_or_path)
        try:
            config = AutoConfig.from_pretrained(
                path, revision=revision, trust_remote_code=trust_remote_code, **(config_overrides or {})
            )
            if pretrained:
                # dtype=float32: an fp16 checkpoint would otherwise load as fp16 (transformers 5)
                model = AutoModel.from_pretrained(
                    path,
                    config=config,
                    revision=revision,
                    trust_remote_code=trust_remote_code,
                    dtype=torch.float32,
                )
            else:
                model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise ModelLoadError(
                f"model.backbone.name_or_path={name_or_path!r} could not be loaded: {err}. Without internet a hub "
                "name loads only from a warm HF cache: pass a local folder with config.json and weights "
                "(model.backbone.name_or_path=/path/to/model) or use model=minilm (embedded)."
            ) from err
        if pooling != "pooler" and getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused by cls/mean pooling: drop it instead of training nothing
        self.model = model
        self.out_features: int = config.hidden_size
        accepted = inspect.signature(model.forward).parameters
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
        limit = getattr(config, "max_position_embeddings", 512) or 512
        self.preprocessing = TextPreprocessing(tokenizer=path, max_length=int(limit))
        self.loaded_checkpoint: str | None = None  # text backbones load no ftlab transfer checkpoint

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """``embeddings``, ``layer.0`` ... ``layer.{n-1}``, then ``pooler`` if kept; leftovers join the top layer."""
        model = self.model
        layers = next(
            (_get(model, p) for p in LAYER_PATHS if isinstance(_get(model, p), nn.ModuleList)), None
        )
        if layers is None:
            lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
            layers = max(lists, key=len) if lists else nn.ModuleList()
        embeddings = getattr(model, "embeddings", None) or model.get_input_embeddings()
        groups: list[tuple[str, list[nn.Module]]] = [("embeddings", [embeddings])]
        groups += [(f"layer.{i}", [block]) for i, block in enumerate(layers)]
        if getattr(model, "pooler", None) is not None:
            groups.append(("pooler", [model.pooler]))
        grouped = {id(p) for _, modules in groups for m in modules for p in m.parameters()}
        leftovers = [m for m in model.children() if not any(id(p) in grouped for p in m.parameters())]
        leftovers = [m for m in leftovers if any(True for _ in m.parameters())]
        if leftovers:  # e.g. DeBERTa's relative embeddings or a final norm: train them with the top layer
            name, modules = groups[-1]
            groups[-1] = (name, modules + leftovers)
        return groups

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch`` holds the tokenizer's outputs; returns pooled features of shape (batch, hidden)."""
        out = self.model(**{k: batch[k] for k in self.input_names if k in batch})
        if self.pooling == "pooler":
            return out.pooler_output
        return self._pool(out.last_hidden_state, batch["attention_mask"])

    def token_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last layer's hidden states, one vector per token: (batch, tokens, hidden)."""
        return self.model(**{k: batch[k] for k in self.input_names if k in batch}).last_hidden_state

    def input_embeddings(self) -> nn.Module:
        """The word-embedding module (``EmbeddingBackbone``: adversarial training perturbs its output)."""
        return self.model.get_input_embeddings()

    # --- split at a layer group (the feature cache runs a frozen prefix once, the rest every step) ------------
    def can_split(self) -> bool:
        """Whether :meth:`forward_until` / :meth:`forward_from` work: BERT-style encoders of transformers 5."""
        model = self.model
        layers = _get(model, "encoder.layer")
        return (
            hasattr(model, "embeddings")
            and hasattr(model, "_create_attention_masks")
            and isinstance(layers, nn.ModuleList)
            and not getattr(model.config, "is_decoder", False)
            and [n for n, _ in self.layer_groups()][1 : 1 + len(layers)]
            == [f"layer.{i}" for i in range(len(layers))]
        )

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        # the model's own (B, T) -> attention-implementation mask (sdpa/eager), as its forward builds it
        return self.model._create_attention_masks(attention_mask, None, hidden, None, None)[0]

    def forward_until(self, stop: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states (B, T, H) after the bottom ``stop`` layer groups (embeddings, layer.0, ...)."""
        model = self.model
        ids = {k: batch[k] for k in ("input_ids", "token_type_ids") if k in batch and k in self.input_names}
        hidden = model.embeddings(**ids)
        mask = self._mask(hidden, batch["attention_mask"])
        for block in model.encoder.layer[: stop - 1]:
            hidden = block(hidden, mask)
        return hidden

    def forward_from(
        self, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor, pool: bool = True
    ) -> torch.Tensor:
        """From ``forward_until(start, ...)``'s hidden states, run groups ``start`` and up: pooled features (B, H),
        or with ``pool=False`` the last layer per token (B, T, H)."""
        model = self.model
        mask = self._mask(hidden, attention_mask)
        for block in model.encoder.layer[start - 1 :]:
            hidden = block(hidden, mask)
        if not pool:
            return hidden
        if self.pooling == "pooler":
            return model.pooler(hidden)
        return self._pool(hidden, attention_mask)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
