"""Several labels per example: one sigmoid per label, ``BCEWithLogits``, per-label decision thresholds.

Thresholds are a persistent buffer of the task (0.5 each, or ``module.threshold``), so every checkpoint carries the
thresholds that go with its weights. With ``module.threshold=tune`` they are tuned for F1 on the validation
outputs at the end of every validation epoch (``on_validation_epoch_end``, before the epoch's metrics are computed
and before ModelCheckpoint saves): the logged ``val/*`` metrics use the tuned thresholds, and the best checkpoint
holds the thresholds tuned at its own epoch. Each label gets the threshold of ``GRID`` that maximises its F1 on the
validation split (ties: the one nearest 0.5; a label without a positive validation example keeps 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchmetrics
from torch.nn import functional as F
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
)

from ftlab.tasks.base import Evaluator, Task
from ftlab.tasks.classification import balanced_weights
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import write_frame, write_json

GRID = torch.linspace(0.05, 0.95, 19)  # candidate thresholds


def tune_thresholds(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-label threshold from ``GRID`` that maximises that label's F1 on (N, C) probabilities and 0/1 labels."""
    positives = labels.bool()
    scores = []
    for t in GRID.tolist():  # one (N, C) comparison at a time: memory stays that of the outputs
        predicted = probs >= t
        tp = (predicted & positives).sum(0).float()
        wrong = (predicted ^ positives).sum(0).float()  # fp + fn
        scores.append(2 * tp / (2 * tp + wrong).clamp(min=1))
    f1 = torch.stack(scores)  # (G, C)
    f1 = f1 - 1e-6 * (GRID - 0.5).abs().unsqueeze(1)  # ties go to the threshold nearest 0.5
    best = GRID[f1.argmax(0)]
    return torch.where(positives.any(0), best, torch.full_like(best, 0.5))


def scores(probs: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact-match accuracy, macro/micro F1 and mAP of (N, C) probabilities at per-label ``thresholds``."""
    n = probs.shape[1]
    target = labels.int()
    predicted = (
        probs >= thresholds.to(probs.device)
    ).int()  # int predictions: torchmetrics takes them as they are
    kw: dict[str, Any] = {"num_labels": n, "validate_args": False}
    return {
        "acc": multilabel_exact_match(predicted, target, **kw),
        "f1": multilabel_f1_score(predicted, target, average="macro", **kw),
        "f1_micro": multilabel_f1_score(predicted, target, average="micro", **kw),
        "map": multilabel_average_precision(probs, target, average="macro", **kw),
    }


class MultiLabelScores(torchmetrics.Metric):
    """Keeps a stage's probabilities and labels (gathered across ranks) and scores them at the task's current
    thresholds; when ``tune_next`` is set (validation epoch end) it first tunes the task's thresholds on them."""

    full_state_update = False
    probs: Any  # list of (B, C) tensors per step; one (N, C) tensor after a cross-rank sync
    labels: Any

    def __init__(self, task: MultiLabelTask):
        super().__init__()
        self.owner = [task]  # a plain list: the task is not a submodule of its own metrics
        self.tune_next = False
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.probs.append(torch.sigmoid(logits.float()))
        self.labels.append(labels)

    def compute(self) -> dict[str, torch.Tensor]:
        probs, labels = (
            torchmetrics.utilities.dim_zero_cat(self.probs),
            torchmetrics.utilities.dim_zero_cat(self.labels),
        )
        task = self.owner[0]
        if self.tune_next:
            self.tune_next = False
            task.thresholds.copy_(tune_thresholds(probs.cpu(), labels.cpu()))
        return scores(probs, labels, task.thresholds)


class MultiLabelTask(Task):
    """Multi-label classification: labels are (B, C) 0/1 floats, logits (B, C).

    Args:
        threshold: ``0.5`` (or another number in (0, 1)) for every label, or ``tune`` (tuned on validation).
        class_weights: per-label loss weights: ``null``, ``balanced`` (``n_positives / (C * positives of the
            label)`` from the training split), or one weight per label.
        pos_weight: ``BCEWithLogits``'s weight of the positive term, one number per label (``null``: 1).
        class_counts: training positives per label (for ``class_weights=balanced``).
    """

    name = "multilabel"
    monitor = "val/f1_micro"
    thresholds: torch.Tensor  # buffers (C,), saved in every checkpoint
    class_weights: torch.Tensor
    pos_weight: torch.Tensor

    def __init__(
        self,
        num_labels: int,
        label_names: Sequence[str] | None = None,
        threshold: float | str = 0.5,
        class_weights: str | Sequence[float] | None = None,
        pos_weight: Sequence[float] | None = None,
        class_counts: Sequence[int] | None = None,
    ):
        super().__init__(num_labels, label_names)
        tune = threshold == "tune"
        if not tune and (isinstance(threshold, str) or not 0.0 < float(threshold) < 1.0):
            raise ConfigError(f"module.threshold={threshold!r}: use a number in (0, 1) or tune.")
        self.threshold_mode = "tune" if tune else float(threshold)
        self.weighting = class_weights if isinstance(class_weights, str) or class_weights is None else "list"
        self.register_buffer("thresholds", torch.full((num_labels,), 0.5 if tune else float(threshold)))
        self.register_buffer("class_weights", torch.ones(num_labels))
        self.register_buffer("pos_weight", torch.ones(num_labels))
        if class_weights == "balanced":
            if class_counts is not None:  # else a rebuilt run: the checkpoint holds the weights
                self.class_weights.copy_(torch.tensor(balanced_weights(class_counts)))
        elif class_weights is not None:
            self.class_weights.copy_(self._per_label("class_weights", class_weights))
        if pos_weight is not None:
            self.pos_weight.copy_(self._per_label("pos_weight", pos_weight))

    def _per_label(self, key: str, value: Any) -> torch.Tensor:
        if isinstance(value, str):
            allowed = "balanced, null" if key == "class_weights" else "null"
            raise ConfigError(f"module.{key}={value!r}: use {allowed}, or one positive number per label.")
        numbers = [float(v) for v in value]
        if len(numbers) != self.num_labels or any(v <= 0 for v in numbers):
            raise ConfigError(
                f"module.{key}={list(value)} must hold {self.num_labels} positive numbers, one per label in order "
                f"({self.label_names})."
            )
        return torch.tensor(numbers)

    def hparams(self) -> dict[str, Any]:
        return {"threshold": self.threshold_mode, "class_weights": self.weighting}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # (B, C) terms; each label's column weighted, then the mean over examples and labels
        return F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), weight=self.class_weights, pos_weight=self.pos_weight
        )

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"scores": MultiLabelScores(self)})

    def update_metrics(self, metrics: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
        metrics.update(logits, labels)

    def on_validation_epoch_end(self, metrics: Any) -> None:
        """Tune the thresholds on this epoch's validation outputs when computing them (``threshold=tune``)."""
        if self.threshold_mode == "tune":
            metrics["scores"].tune_next = True

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(logits.float()) >= self.thresholds.to(logits.device)).int()

    def decode(
        self, logits: torch.Tensor, items: Sequence[dict[str, Any]], top_k: int = 1
    ) -> list[dict[str, Any]]:
        names = self.label_names or [str(i) for i in range(logits.shape[-1])]
        probs = torch.sigmoid(logits.float()).tolist()
        chosen = self.hard(logits).tolist()
        return [
            {
                "input": item["input"],
                "labels": [name for name, on in zip(names, row, strict=True) if on],
                "probabilities": {name: p for name, p in zip(names, p_row, strict=True)},
            }
            for item, row, p_row in zip(items, chosen, probs, strict=True)
        ]

    def write_files(self, run_dir: Path) -> None:
        """``thresholds.json``: the per-label thresholds of the module as it is (the best checkpoint's, after test)."""
        from ftlab.runs.folder import THRESHOLDS_FILE

        names = self.label_names or [str(i) for i in range(self.num_labels)]
        record = {
            "mode": self.threshold_mode,
            "thresholds": dict(zip(names, self.thresholds.tolist(), strict=True)),
        }
        write_json(run_dir / THRESHOLDS_FILE, record)

    def evaluator(self) -> Evaluator:
        return MultiLabelEvaluator(self)


class MultiLabelEvaluator(Evaluator):
    """Adds ``per_label.csv``: threshold, precision, recall, F1, average precision and support of every label."""

    def finish(self, out_dir: Path, title: str) -> dict[str, float]:
        import pandas as pd
        from sklearn.metrics import average_precision_score, precision_recall_fscore_support

        values = self.headline()
        metric: MultiLabelScores = self.metrics["scores"]  # type: ignore[assignment]
        probs = torchmetrics.utilities.dim_zero_cat(metric.probs).numpy()
        labels = torchmetrics.utilities.dim_zero_cat(metric.labels).numpy().astype(int)
        task = self.task
        assert isinstance(task, MultiLabelTask)
        thresholds = task.thresholds.numpy()
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, (probs >= thresholds).astype(int), average=None, zero_division=0
        )
        ap = [
            average_precision_score(labels[:, i], probs[:, i]) if labels[:, i].any() else float("nan")
            for i in range(labels.shape[1])
        ]
        names = task.label_names or [str(i) for i in range(task.num_labels)]
        report = pd.DataFrame(
            {
                "label": names,
                "threshold": thresholds,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "average_precision": ap,
                "support": support,
                "predicted": (probs >= thresholds).sum(0),
            }
        )
        write_frame(out_dir / "per_label.csv", report, index=False)
        print("\n" + report.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return values
