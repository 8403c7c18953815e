"""HF transformer encoders (BERT family and friends) as ftlab backbones."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ftlab.data.text import TextPreprocessing
from ftlab.models.backbones.checkpoints import load_backbone_checkpoint
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

POOLING = ("cls", "mean", "pooler")
# Where encoder families keep their stack of blocks, tried in order; the longest ModuleList is the fall-back.
LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer")
# A checkpoint's masked-LM head, as MaskedLMHead names its tensors: BERT family (cls.predictions.*), RoBERTa family
MLM_HEAD_KEYS = {
    "cls.predictions.": {
        "transform.dense.weight": "dense.weight",
        "transform.dense.bias": "dense.bias",
        "transform.LayerNorm.weight": "norm.weight",
        "transform.LayerNorm.bias": "norm.bias",
        "bias": "bias",
    },
    "lm_head.": {
        "dense.weight": "dense.weight",
        "dense.bias": "dense.bias",
        "layer_norm.weight": "norm.weight",
        "layer_norm.bias": "norm.bias",
        "bias": "bias",
    },
}


def _get(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of blocks (:data:`LAYER_PATHS`, else the longest ``ModuleList``)."""
    layers = next((_get(model, p) for p in LAYER_PATHS if isinstance(_get(model, p), nn.ModuleList)), None)
    if layers is None:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = max(lists, key=len) if lists else nn.ModuleList()
    return layers


class HFTextBackbone(nn.Module):
    """An ``AutoModel`` encoder from a local folder, a hub name or ``embedded:<name>``, pooled to one vector.

    Args:
        name_or_path: hub name, local folder, or ``embedded:all-MiniLM-L6-v2``.
        pooling: ``cls`` (first token), ``mean`` (mask-aware mean of the last layer), ``pooler`` (the model's
            pooler; only then is the pooler kept, so no parameter is left without a gradient).
        pretrained: load weights; ``False`` builds the architecture with random weights (tiny test twins).
        config_overrides: changes to the model config (layer count, width, dropout, ...).
        trust_remote_code: passed to transformers; off unless the user turns it on.
        checkpoint: an earlier ftlab run folder, ``.ckpt`` or ``backbone.pt`` (e.g. a ``task=masked_lm`` run):
            its backbone weights replace these (weights-only; the architecture must be the same).
        checkpoint_groups: copy only the bottom n layer groups of ``checkpoint`` (embeddings, layer.0, ...).
        num_layers: keep k evenly spaced encoder layers (every other one for 6 -> 3, as DistilBERT was initialised)
            with their weights (pretrained or from ``checkpoint``): a shallower student for ``distill.teacher``.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "mean",
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        checkpoint: str | None = None,
        checkpoint_groups: int | None = None,
        num_layers: int | None = None,
    ):
        super().__init__()
        if pooling not in POOLING:
            raise ConfigError(f"model.backbone.pooling={pooling!r} is not one of {', '.join(POOLING)}.")
        from transformers import AutoConfig, AutoModel

        self.name_or_path, self.pooling = name_or_path, pooling
        path = assets.resolve(name_or_path)
        self.weights_from = (path, revision) if pretrained else None  # where a masked-LM head may be found
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
        self.loaded_checkpoint = load_backbone_checkpoint(self, checkpoint, checkpoint_groups)
        if num_layers is not None:  # after loading: a fine-tuned teacher's encoder can be thinned too
            self._keep_layers(int(num_layers))

    def _keep_layers(self, k: int) -> None:
        """Keep layers ``i * n // k`` (i < k) of the n encoder layers: 6 -> 3 keeps 0, 2, 4."""
        layers = _layers(self.model)
        n = len(layers)
        if not 1 <= k <= n:
            raise ConfigError(f"model.backbone.num_layers={k}: this encoder has {n} layers; give 1 to {n}.")
        kept = [layers[i * n // k] for i in range(k)]
        del layers[:]  # emptied and refilled in place: the encoder keeps the same ModuleList
        layers.extend(kept)
        self.model.config.num_hidden_layers = k

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """``embeddings``, ``layer.0`` ... ``layer.{n-1}``, then ``pooler`` if kept; leftovers join the top layer."""
        model = self.model
        layers = _layers(model)
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

    def masked_lm_head(self) -> nn.Module:
        """BERT's prediction head with its decoder tied to the word embeddings (``data.task=masked_lm``), filled
        from the pretrained checkpoint's own head (``cls.predictions.*`` / ``lm_head.*``) when it has one; fresh
        (seeded) otherwise, as for all-MiniLM-L6-v2, whose weights hold no masked-LM head."""
        from ftlab.models.heads import MaskedLMHead

        config = self.model.config
        activation = config.hidden_act if isinstance(getattr(config, "hidden_act", None), str) else "gelu"
        head = MaskedLMHead(
            cast(nn.Embedding, self.input_embeddings()),
            self.out_features,
            activation,
            float(getattr(config, "layer_norm_eps", 1e-12)),
            float(getattr(config, "initializer_range", 0.02)),
        )
        state = pretrained_mlm_head(*self.weights_from) if self.weights_from else {}
        if state:
            head.load_state_dict(state, strict=True)
            log.info("Masked-LM head initialised from the checkpoint's own head (%s).", self.name_or_path)
        else:
            log.info(
                "Masked-LM head starts fresh: %s holds no masked-LM head (cls.predictions.* / lm_head.*); its "
                "decoder is tied to the word embeddings.",
                self.name_or_path if self.weights_from else "a randomly initialised model",
            )
        return head

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


def _weight_files(path: str, revision: str | None) -> list[str]:
    """The model's weight files (safetensors, sharded or not, else ``pytorch_model.bin``), local or HF-cached."""
    import json

    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        try:
            return cached_file(
                path,
                name,
                revision=revision,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            return None

    index = find("model.safetensors.index.json")
    if index:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [f for f in (find(s) for s in shards) if f]
    return [f for f in (find("model.safetensors") or find("pytorch_model.bin"),) if f]


def pretrained_mlm_head(path: str, revision: str | None = None) -> dict[str, torch.Tensor]:
    """The masked-LM head of a pretrained checkpoint in :class:`~ftlab.models.heads.MaskedLMHead`'s names; ``{}``
    when the checkpoint has none (or not all of it)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path, revision):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(tuple(MLM_HEAD_KEYS))})  # noqa: SIM118
        else:  # weights-only: a checkpoint from elsewhere never runs pickled code
            state = torch.load(file, map_location="cpu", weights_only=True)
            tensors.update({k: v for k, v in state.items() if k.startswith(tuple(MLM_HEAD_KEYS))})
    for prefix, names in MLM_HEAD_KEYS.items():
        found = {ours: tensors.get(prefix + theirs) for theirs, ours in names.items()}
        if prefix + "bias" not in tensors:  # some BERT checkpoints keep the bias only as decoder.bias
            found["bias"] = tensors.get(prefix + "decoder.bias")
        if all(v is not None for v in found.values()):
            return {k: v.float() for k, v in found.items() if v is not None}
    return {}
