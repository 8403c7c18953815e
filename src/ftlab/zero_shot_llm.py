"""Zero-shot classification by an instruction LLM (``zero_shot=llm``): each label word's log-likelihood after a prompt.

For a text, the prompt (``"Review: {text}\\nSentiment:"``) is followed by each label's word (``" positive"``); the
label's score is the summed log-probability of the word's tokens given the prompt, and the prediction is the
argmax. The scores are the logits of the classification task, so ``val/*`` and ``test/*`` are the metrics of any
run. Nothing trains; the model is the run's causal LM (``model=smollm2_lm``, or any ``HFCausalLM``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from ftlab.prompting import PromptFormat, check_template, label_words_for, word_token_ids
from ftlab.tasks import build_task
from ftlab.utils.errors import ConfigError


class LLMZeroShot:
    """The prompt and label words of an LLM zero-shot run.

    Args:
        prompt: the text before the label word, with one ``{text}`` field.
        label_words: ``{label name: word}`` scored after the prompt; null: the label names (the first of a list).
        batch_size: texts per step (each is scored once per label).
        max_length: prompt tokens kept (the text's end is cut, never the prompt; the label word is always scored).
    """

    kind = "llm"

    def __init__(
        self,
        prompt: str = "Review: {text}\nSentiment:",
        label_words: dict[str, Any] | None = None,
        batch_size: int = 16,
        max_length: int = 256,
    ):
        self.prompt = check_template(prompt, "zero_shot.prompt")  # shared with prompt=verbalizer
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.label_words = dict(label_words or {})

    def record(self) -> dict[str, Any]:
        return {"zero_shot/prompt": self.prompt}

    def build(
        self, cfg: DictConfig, backbone: Any, datamodule: Any, label_names: list[str], make: Any
    ) -> tuple[pl.LightningModule, None]:
        """A :class:`LLMZeroShotModule` over the run's causal LM; it serves its own validation/test loaders."""
        from ftlab.models.backbones.llm import load_tokenizer_for

        model = getattr(backbone, "model", None)
        if (
            model is None
            or not hasattr(model, "get_output_embeddings")
            or model.get_output_embeddings() is None
        ):
            raise ConfigError(
                f"zero_shot=llm scores label words with a causal LM's own LM head; model.backbone "
                f"{type(backbone).__name__} has none. Use model=smollm2_lm (or another HFCausalLM config)."
            )
        words = label_words_for(self.label_words, label_names, "zero_shot.label_words")
        tokenizer = load_tokenizer_for(backbone.preprocessing.tokenizer)
        # a leading space: the word follows the prompt as a new word ("Sentiment: positive"); all its tokens scored
        word_ids = [word_token_ids(tokenizer, w[0]) for w in words]
        prompt = PromptFormat(self.prompt)  # a long text is cut, never the prompt around it
        splits = {}
        for split in ("validation", "test"):
            texts, _ = datamodule.raw_inputs(split)
            prompts = prompt.encode(tokenizer, texts, self.max_length)
            labels = np.asarray(datamodule.datasets[split].labels)
            splits[split] = (prompts, labels)
        task = build_task("classification", len(label_names), label_names, {})
        return LLMZeroShotModule(
            model, word_ids, task, splits, self.batch_size, tokenizer.pad_token_id or 0
        ), None


def label_log_likelihoods(
    model: nn.Module, prompts: list[list[int]], word_ids: list[list[int]], pad_id: int
) -> torch.Tensor:
    """(B, C): for each prompt and label, the summed log-probability of the label's tokens after the prompt."""
    device = next(model.parameters()).device
    rows = [p + w for p in prompts for w in word_ids]  # B * C sequences, prompt-major
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # right padding: positions (and so the prompt's scores) as unpadded
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B*C, T, V); position t predicts token t + 1
    scores = torch.zeros(len(rows), device=device)
    for i, (prompt, words) in enumerate((p, w) for p in prompts for w in word_ids):
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(words) - 1, device=device)
        targets = torch.tensor(words, device=device)
        scores[i] = log_probs[i, positions, targets].sum()
    return scores.view(len(prompts), len(word_ids))


class LLMZeroShotModule(pl.LightningModule):
    """Validation and test of a frozen causal LM scoring label words; logs the classification task's metrics."""

    def __init__(
        self,
        model: nn.Module,
        word_ids: list[list[int]],
        task: Any,
        splits: dict[str, tuple[list[list[int]], np.ndarray]],
        batch_size: int,
        pad_id: int,
    ):
        super().__init__()
        self.model, self.word_ids, self.task, self.splits = model, word_ids, task, splits
        self.batch_size, self.pad_id = batch_size, pad_id
        self.metrics: Any = nn.ModuleDict({f"{s}_metrics": task.metrics() for s in ("val", "test")})

    def parameter_counts(self) -> dict[str, float]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / total}

    def _loader(self, split: str) -> DataLoader:
        prompts, labels = self.splits[split]
        items = list(zip(prompts, labels.tolist(), strict=True))
        return DataLoader(
            items,  # type: ignore[arg-type]  # a list is a map-style dataset
            batch_size=self.batch_size,
            collate_fn=lambda b: ([p for p, _ in b], [y for _, y in b]),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def _step(self, batch: Any, stage: str) -> None:
        prompts, labels = batch
        scores = label_log_likelihoods(self.model, prompts, self.word_ids, self.pad_id)
        target = torch.tensor(labels, device=scores.device)
        self.task.update_metrics(self.metrics[f"{stage}_metrics"], scores, target)
        # the label scores as logits: the loss of the softmax over the labels (a calibration figure, as any run's)
        loss = nn.functional.cross_entropy(scores, target)
        self.log(f"{stage}/loss", loss, on_epoch=True, on_step=False, batch_size=len(labels))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        values = self.metrics[f"{stage}_metrics"].compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        self.metrics[f"{stage}_metrics"].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
