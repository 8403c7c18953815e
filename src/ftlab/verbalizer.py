"""Prompt-based fine-tuning with a verbalizer (``prompt=verbalizer``; LM-BFF, Gao et al. 2021; PET, Schick and
Schütze 2021): each text is put into a template, and the classifier is the language model's own output layer at
the template's answer slot, restricted to the label words.

- Decoder LLM (``model=smollm2_lm``): the answer is the next token after the prompt's last token.
- Masked LM (a text encoder with a masked-LM head: ``task=masked_lm`` adaptation, or a checkpoint that ships one):
  the answer is the prediction at the template's ``{mask}``.

The backbone (:class:`PromptBackbone`) reads the LM's last hidden state at the answer slot (through the masked-LM
transform for a masked LM): ``(B, H)``, like any pooled backbone. The head (:class:`VerbalizerHead`) is a linear
layer whose rows start as the output-layer rows of the label words (several words of a label: their mean, so the
label's logit is the mean of its words' logits), so before any training its logits are exactly the LM's logits
for the label words, and every ``finetune`` preset has a head to train: ``head_only`` trains those rows alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ftlab.data.text import TextPreprocessing, load_tokenizer
from ftlab.prompting import PromptFormat, check_template, label_words_for, word_token_ids
from ftlab.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# the defaults, (decoder, masked LM): zero_shot=llm's prompt and LM-BFF's SST-2 template; for text pairs,
# LM-BFF's MNLI/RTE template and its decoder counterpart
TEMPLATES = {
    False: ("Review: {text}\nSentiment:", "{text} It was {mask}."),
    True: ("{text}\nQuestion: {pair}\nAnswer:", "{text} ? {mask} , {pair}"),
}
MULTI_TOKEN = ("error", "first")


@dataclass(frozen=True)
class PromptPreprocessing(TextPreprocessing):
    """:class:`TextPreprocessing` plus the prompt every text is put into (the data module tokenizes with it)."""

    prompt: PromptFormat | None = None


class VerbalizerHead(nn.Module):
    """A linear layer over the answer slot's features whose rows start as the label words' output rows.

    Args:
        in_features: the LM's hidden size; num_classes: from the data module.
        dropout: on the features before the rows (0: LM-BFF's setting).
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.head.dropout={dropout} must be in [0, 1).")
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))  # (B, C)


class MaskTransform(nn.Module):
    """BERT's masked-LM transform (dense, activation, LayerNorm) before the output layer; a masked-LM head's."""

    dense: nn.Module
    activation: nn.Module
    norm: nn.Module

    def __init__(self, mlm_head: Any):
        super().__init__()
        self.dense, self.activation, self.norm = mlm_head.dense, mlm_head.activation, mlm_head.norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.activation(self.dense(hidden)))


class PromptBackbone(nn.Module):
    """A language model read at a prompt's answer slot: ``forward(batch) -> (B, H)``.

    ``model`` is the wrapped backbone's network (``finetune=lora`` wraps it in place), ``layer_groups()`` its
    groups, plus ``mlm_transform`` on top for a masked LM.
    """

    lm: Any  # HFCausalLM or HFTextBackbone (their methods are not part of nn.Module's type)
    transform: Any

    def __init__(self, lm: Any, prompt: PromptFormat, tokenizer: Any, transform: nn.Module | None = None):
        super().__init__()
        self.lm, self.transform, self.tokenizer = lm, transform, tokenizer
        self.kind = "decoder" if transform is None else "masked"
        self.mask_id = tokenizer.mask_token_id if transform is not None else None
        self.vocab_bias: torch.Tensor | None = None  # the masked-LM head's output bias (for the head's rows)
        config = self.model.config
        self.out_features: int = int(config.hidden_size)
        self.preprocessing = PromptPreprocessing(
            lm.preprocessing.tokenizer, lm.preprocessing.max_length, prompt
        )
        self.loaded_checkpoint: str | None = lm.loaded_checkpoint
        self.lora_targets = getattr(lm, "lora_targets", None)
        self.pooling = f"prompt:{prompt.template}"  # in the feature cache's key

    @property
    def model(self) -> Any:
        return self.lm.model

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "model":  # peft (finetune=lora / ia3) replaces backbone.model: the wrapped LM's network
            self.lm.model = value
            if self.transform is not None and hasattr(value, "peft_config"):
                # the masked-LM transform is part of the LM that peft adapts: only adapters (and the head) train
                self.transform.requires_grad_(False)
            return
        super().__setattr__(name, value)

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        groups = list(self.lm.layer_groups())
        return groups + ([("mlm_transform", [self.transform])] if self.transform is not None else [])

    def input_embeddings(self) -> nn.Module:
        return self.lm.input_embeddings()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden state at the answer slot (B, H) (masked LM: after the masked-LM transform)."""
        if self.transform is None:
            return self._decoder_answer(batch)
        hidden = self.lm.token_features(batch)  # (B, T, H)
        hits = torch.eq(batch["input_ids"], int(self.mask_id or 0))
        # (a data-dependent check: skipped while torch.export / compile traces the model)
        if not torch.compiler.is_compiling() and not bool((hits.sum(-1) == 1).all()):
            raise DataError(
                "A prompted input does not hold exactly one mask token (the template's {mask}); inputs must be "
                "encoded by the run's data module (prompt=verbalizer puts each text into the template)."
            )
        return self.transform(_at(hidden, hits.int().argmax(-1)))

    def _decoder_answer(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        # positions count real tokens only, so left and right padding give the unpadded prompt's outputs (RoPE
        # models would anyway, being relative; models with absolute positions would not)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        decoder = self.lm._base().get_decoder()  # peft's adapters live inside its layers
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, T, H), after the final norm
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # the last real token, either padding side
        return _at(hidden, last)

    def output_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM's output layer: weight (V, H) and bias (V,) or None."""
        if self.transform is not None:  # BERT's decoder is tied to the word embeddings
            embeddings: Any = self.input_embeddings()
            return embeddings.weight, self.vocab_bias
        out: Any = self.lm._base().get_output_embeddings()
        return out.weight, getattr(out, "bias", None)


def _at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[b, positions[b]]`` for every row: (B, T, H), (B,) -> (B, H); a gather, so torch.export keeps the
    batch size dynamic."""
    index = positions.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


class Verbalizer:
    """``prompt=verbalizer``: the template and label words of prompt-based fine-tuning.

    Args:
        template: with ``{text}``; a masked LM's also ``{mask}``; for text pairs also ``{pair}``. ``null``:
            :data:`TEMPLATES` (``"Review: {text}\\nSentiment:"`` for a decoder, ``"{text} It was {mask}."`` for a
            masked LM).
        label_words: ``{label name: word or [words]}``; ``null``: the label names themselves.
        multi_token: a word of several tokens: ``error`` (LM-BFF's single-token words), or ``first`` (its first
            token, logged).
    """

    def __init__(
        self,
        template: str | None = None,
        label_words: dict[str, Any] | None = None,
        multi_token: str = "error",
    ):
        if multi_token not in MULTI_TOKEN:
            raise ConfigError(f"prompt.multi_token={multi_token!r} is not one of {', '.join(MULTI_TOKEN)}.")
        self.template, self.multi_token = template, multi_token
        self.label_words = dict(label_words) if label_words else None

    def wrap(self, backbone: Any, data: DictConfig | None = None) -> PromptBackbone:
        """The run's LM as a :class:`PromptBackbone` (before the data module is built: it tokenizes the prompts)."""
        from ftlab.models.backbones.causal_lm import HFCausalLM
        from ftlab.models.backbones.text import HFTextBackbone

        pair = _check_data(data)
        if not isinstance(backbone, HFCausalLM | HFTextBackbone):
            raise ConfigError(
                f"prompt=verbalizer reads a language model's own output layer; model.backbone "
                f"{type(backbone).__name__} has none. Use a decoder LLM with its LM head (model=smollm2_lm) or a "
                "text encoder with a masked-LM head (model=bert, or model.backbone.checkpoint=<task=masked_lm run>)."
            )
        tokenizer = load_tokenizer(backbone.preprocessing.tokenizer)
        if isinstance(backbone, HFCausalLM):
            template = check_template(self.template or TEMPLATES[pair][0], "prompt.template", pair=pair)
            return PromptBackbone(backbone, PromptFormat(template), tokenizer)
        if tokenizer.mask_token is None:
            raise ConfigError(
                f"prompt=verbalizer: the tokenizer of {backbone.name_or_path!r} has no mask token."
            )
        template = check_template(self.template or TEMPLATES[pair][1], "prompt.template", True, pair)
        mlm_head = _masked_lm_head(backbone)
        prompt_backbone = PromptBackbone(
            backbone, PromptFormat(template, tokenizer.mask_token), tokenizer, MaskTransform(mlm_head)
        )
        prompt_backbone.vocab_bias = mlm_head.bias.detach().clone()
        return prompt_backbone

    def word_ids(self, tokenizer: Any, label_names: list[str]) -> list[list[int]]:
        """Per label, one token id per label word (the word's only token, or with ``first`` its first)."""
        ids = []
        for name, words in zip(
            label_names, label_words_for(self.label_words, label_names, "prompt.label_words"), strict=True
        ):
            row = []
            for word in words:
                tokens = word_token_ids(tokenizer, word)
                if len(tokens) != 1 and (self.multi_token == "error" or not tokens):
                    raise ConfigError(
                        f"prompt.label_words: {word!r} (label {name!r}) is {len(tokens)} tokens "
                        f"({tokenizer.convert_ids_to_tokens(tokens)}); a label word must be one token of the "
                        "model's vocabulary. Choose another word, or set prompt.multi_token=first to use its "
                        "first token."
                    )
                if len(tokens) > 1:
                    log.warning(
                        "prompt.label_words: %r is %d tokens; its first, %r, is scored.",
                        word,
                        len(tokens),
                        tokenizer.convert_ids_to_tokens(tokens[:1])[0],
                    )
                row.append(tokens[0])
            ids.append(row)
        return ids

    @torch.no_grad()
    def init_head(self, module: Any, label_names: list[str]) -> None:
        """Fill the head's rows (and bias) from the LM's output rows of each label's words (their mean)."""
        backbone, head = module.backbone, module.head
        if not isinstance(head, VerbalizerHead) or not isinstance(backbone, PromptBackbone):
            raise ConfigError(
                "prompt=verbalizer needs model.head._target_=ftlab.verbalizer.VerbalizerHead (the prompt config "
                f"sets it); the config has {type(head).__name__}. Leave model.head as prompt=verbalizer sets it."
            )
        weight, bias = backbone.output_rows()
        word_ids = self.word_ids(backbone.tokenizer, label_names)
        for c, ids in enumerate(word_ids):
            head.linear.weight[c] = weight[ids].float().mean(0)
            head.linear.bias[c] = bias[ids].float().mean() if bias is not None else 0.0
        tokens = [backbone.tokenizer.convert_ids_to_tokens(ids) for ids in word_ids]
        log.info("Verbalizer: %s", dict(zip(label_names, tokens, strict=True)))


def _check_data(data: DictConfig | None) -> bool:
    """Refuse data the verbalizer cannot serve; whether the data has text pairs (``{pair}`` in the template)."""
    if data is None:
        return False
    if data.get("task", "classification") != "classification":
        raise ConfigError(
            f"prompt=verbalizer classifies texts with label words; data.task={data.get('task')} is not "
            "classification. Use a single-label text classification data config (e.g. data=rotten_tomatoes)."
        )
    if data.get("text_augment"):
        raise ConfigError(
            "prompt=verbalizer with data.text_augment: augmented copies are tokenized without the template. "
            "Set data.text_augment=null."
        )
    return bool(data.get("text_pair_column"))


def _masked_lm_head(backbone: Any) -> Any:
    """The backbone's masked-LM head: from its ``task=masked_lm`` checkpoint run, else the pretrained model's own;
    a pretrained model with neither is refused (a fresh head at the mask would be no verbalizer at all)."""
    from ftlab.models.backbones.text import pretrained_mlm_head

    head = backbone.masked_lm_head()
    adapted = adapted_mlm_head(backbone.loaded_checkpoint)
    if adapted:
        head.load_state_dict(adapted, strict=True)
        log.info("Masked-LM head from the task=masked_lm run of %s.", backbone.loaded_checkpoint)
    elif backbone.weights_from is not None and not pretrained_mlm_head(*backbone.weights_from):
        raise ConfigError(
            f"prompt=verbalizer on a masked LM needs its masked-LM head, and {backbone.name_or_path!r} ships none "
            "(all-MiniLM-L6-v2 is one such model). Adapt it first (ftlab-train task=masked_lm ...) and pass "
            "model.backbone.checkpoint=<that run>, or use a checkpoint with a masked-LM head (model=bert)."
        )
    return head


def adapted_mlm_head(checkpoint: str | None) -> dict[str, torch.Tensor]:
    """The masked-LM head (``head.*``: transform and bias) of the ``task=masked_lm`` run a backbone checkpoint came
    from; ``{}`` when the checkpoint is not from such a run."""
    from ftlab.models.backbones.checkpoints import source_run
    from ftlab.runs import folder

    if not checkpoint:
        return {}
    path = Path(checkpoint)
    run = source_run(path)
    files = [path] if path.suffix == ".ckpt" else []
    files += [run / name for name in (folder.BEST_CKPT, folder.LAST_CKPT)] if run is not None else []
    for file in files:
        if file.is_file():
            state = folder.read_checkpoint(file)
            if (state.get("hyper_parameters") or {}).get("task") != "masked_lm":
                return {}
            return {
                k.removeprefix("head."): v for k, v in state["state_dict"].items() if k.startswith("head.")
            }
    return {}
