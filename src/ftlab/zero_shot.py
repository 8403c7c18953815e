"""Zero-shot classification as a run: nothing trains, the run folder looks like any run's (``zero_shot=embedding``).

The sentence encoder embeds a description of each label ("a {label} review", several templates averaged); the
head's weight rows are those label embeddings, L2-normalised, so the logits are the cosine similarity of each text
to each label (times a fixed scale). The module is the usual :class:`~ftlab.models.FinetuneModule` with the
classification task; ``trainer.validate`` and ``trainer.test`` give ``val/*`` and ``test/*`` as a trained run
would, and the module is saved as ``checkpoints/best.ckpt`` so ``ftlab-eval`` / ``ftlab-predict`` read the folder.
"""

from __future__ import annotations

import logging
import string
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from ftlab.callbacks import BestScore
from ftlab.models.module import FinetuneModule
from ftlab.runs import folder
from ftlab.runs.rebuild import build_module
from ftlab.utils.budget import deferred
from ftlab.utils.devices import resolve_precision
from ftlab.utils.errors import ConfigError

log = logging.getLogger("ftlab.zero_shot")


class CosineHead(nn.Module):
    """Cosine similarity of the (L2-normalised) features to each class's weight row, times ``scale``.

    Args:
        in_features: the backbone's ``out_features``; num_classes: from the data module.
        scale: the logits' temperature; 20 is the scale all-MiniLM-L6-v2 was trained with (sentence-transformers'
            MultipleNegativesRankingLoss), so the softmax (test/loss, predicted probabilities) is not flat.
        dropout: before normalising (identity at evaluation; kept so the head could be trained further).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"model.head.scale={scale} must be positive (the cosine similarities' scale).")
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(
            torch.zeros(num_classes, in_features)
        )  # filled from the label descriptions

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = nn.functional.normalize(self.dropout(features), dim=-1)  # (B, H)
        return self.scale * features @ nn.functional.normalize(self.weight, dim=-1).T  # (B, C)


class EmbeddingZeroShot:
    """Label descriptions built from templates, embedded by the run's sentence encoder.

    Args:
        templates: texts with a ``{label}`` field, e.g. ``"a {label} review"``; each label's embedding is the mean of
            its templates' (normalised) embeddings.
        label_words: optional ``{label name: word or list of words}`` put into the templates instead of the label
            names (e.g. ``{fresh: positive, rotten: negative}``); several words are averaged too.
        batch_size: descriptions embedded per forward pass.
    """

    kind = "embedding"

    def __init__(
        self,
        templates: list[str],
        label_words: dict[str, str | list[str]] | None = None,
        batch_size: int = 64,
    ):
        if isinstance(templates, str) or not templates:
            raise ConfigError(
                f"zero_shot.templates={templates!r} must be a non-empty list of texts with a {{label}} field, "
                'e.g. zero_shot.templates=["a {label} review","this review is {label}"].'
            )
        for template in templates:
            fields = {f for _, f, _, _ in string.Formatter().parse(str(template)) if f is not None}
            if fields != {"label"}:
                raise ConfigError(
                    f"zero_shot.templates: {template!r} must contain the field {{label}} and no other field "
                    f"(it has {sorted(fields) or 'none'}); the label word is put there, e.g. 'a {{label}} review'."
                )
        self.templates = [str(t) for t in templates]
        self.label_words = {str(k): v for k, v in (label_words or {}).items()}
        self.batch_size = int(batch_size)

    def descriptions(self, label_names: list[str]) -> list[list[str]]:
        """The texts describing each label: every template filled with every word of that label."""
        unknown = sorted(set(self.label_words) - set(label_names))
        if unknown:
            raise ConfigError(
                f"zero_shot.label_words names {unknown}, which are not labels of the data ({label_names}). "
                "Give words for the data's label names, e.g. zero_shot.label_words={fresh:positive,rotten:negative}."
            )
        texts = []
        for name in label_names:
            words = self.label_words.get(name, name)
            words = [words] if isinstance(words, str) else list(words)
            texts.append([t.format(label=w) for t in self.templates for w in words])
        return texts

    def record(self) -> dict[str, Any]:
        return {"zero_shot/templates": len(self.templates)}

    def build(
        self, cfg: DictConfig, backbone: Any, datamodule: Any, label_names: list[str], make: Any
    ) -> tuple[pl.LightningModule, Any]:
        """The usual :class:`FinetuneModule` with the label embeddings as its head, and the data module."""
        module = build_module(cfg, backbone, len(label_names), label_names, make=make, task="classification")
        if not isinstance(module.head, CosineHead):
            raise ConfigError(
                "zero_shot=embedding needs model.head._target_=ftlab.zero_shot.CosineHead (the zero_shot config "
                f"sets it); the config has {cfg.model.head.get('_target_')}. Leave model.head as zero_shot sets it."
            )
        with torch.no_grad():
            module.head.weight.copy_(self.label_embeddings(backbone, datamodule, label_names))
        return module, datamodule

    @torch.inference_mode()
    def label_embeddings(self, backbone: nn.Module, datamodule: Any, label_names: list[str]) -> torch.Tensor:
        """(C, H): per label, the normalised mean of its descriptions' normalised embeddings."""
        backbone.eval()  # no dropout in the label embeddings
        collate = datamodule.collator(cuda=False)
        rows = []
        for texts in self.descriptions(label_names):
            items = datamodule.encode(texts)  # tokenized exactly as the data's texts are
            chunks = []
            for i in range(0, len(items), self.batch_size):
                batch = collate(items[i : i + self.batch_size])
                batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
                chunks.append(nn.functional.normalize(backbone(batch), dim=-1))
            rows.append(nn.functional.normalize(torch.cat(chunks).mean(0), dim=0))
        return torch.stack(rows)


def run(cfg: DictConfig) -> dict[str, Any]:
    """``ftlab-train ... zero_shot=embedding|llm``: build (the embedding head, or the LLM scorer of
    :mod:`ftlab.zero_shot_llm`), validate, test, save the module and write ``metrics.json``; returns the metrics."""
    from ftlab.train import _instantiate, _overrides, _summary  # the training run's own helpers

    start = time.perf_counter()
    if cfg.get("resume"):
        raise ConfigError(
            "resume: a zero-shot run trains nothing, so there is nothing to resume; run it again."
        )
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    folder.check_fresh(output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    zero_shot = _instantiate(cfg.zero_shot)
    backbone: Any = _instantiate(cfg.model.backbone)
    datamodule = _instantiate(cfg.data, preprocessing=backbone.preprocessing)
    datamodule.setup("fit")
    if datamodule.task != "classification" or getattr(datamodule, "modality", "text") != "text":
        raise ConfigError(
            f"zero_shot={zero_shot.kind} classifies texts into named labels; data.task={datamodule.task} "
            f"({getattr(datamodule, 'modality', '?')} data) is not single-label text classification."
        )
    label_names = list(datamodule.label_names)
    module, loaders = zero_shot.build(cfg, backbone, datamodule, label_names, _instantiate)
    module.requires_grad_(False)  # nothing trains: metrics.json says trainable_params=0
    counts = module.parameter_counts()
    datamodule.label_map.save(output_dir / folder.LABELS_FILE)

    best = BestScore(cfg.monitor, cfg.monitor_mode)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c] + [best]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c]
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    trainer: pl.Trainer = _instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision, **deferred(cfg)
    )
    trainer.validate(module, datamodule=loaders, verbose=False)
    tested = trainer.test(module, datamodule=loaders, verbose=False)
    if isinstance(module, FinetuneModule):  # a module ftlab-eval / ftlab-predict rebuild from the run folder
        trainer.save_checkpoint(output_dir / folder.BEST_CKPT, weights_only=True)

    metrics: dict[str, Any] = dict(tested[0]) if tested else {}
    metrics.update(best.record(trainer), monitor=cfg.monitor, task=module.task.name, zero_shot=zero_shot.kind)
    metrics.update(zero_shot.record())
    metrics.update(counts)
    metrics.update(
        wall_time_s=round(time.perf_counter() - start, 2),
        seed=cfg.seed,
        overrides=_overrides(output_dir, False),
    )
    folder.write_metrics(output_dir / folder.METRICS_FILE, metrics)
    _summary(metrics, output_dir)
    return metrics
