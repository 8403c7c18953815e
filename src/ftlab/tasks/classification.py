"""One class per example (cross-entropy, optional class weights or focal loss) and one number (regression)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from torch.nn import functional as F

from ftlab.tasks.base import Evaluator, Task
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import write_frame

LOSSES = ("cross_entropy", "focal")


def balanced_weights(counts: Sequence[int]) -> list[float]:
    """sklearn's ``class_weight="balanced"``: ``n_examples / (n_classes * count)``; a class absent from training
    gets the largest weight of the others rather than infinity."""
    counts_ = np.asarray(counts, dtype=np.float64)
    weights = counts_.sum() / (len(counts_) * np.where(counts_ > 0, counts_, np.nan))
    return np.nan_to_num(weights, nan=float(np.nanmax(weights))).tolist()


class ClassificationTask(Task):
    """Single-label classification.

    Args:
        label_smoothing: for cross-entropy.
        class_weights: ``null``; ``balanced`` (from the training split's class counts, ``class_counts``); or one
            weight per class in label order. Stored in the checkpoint.
        loss: ``cross_entropy`` or ``focal`` (Lin et al. 2017: ``(1 - p_t)^gamma`` down-weights easy examples).
        focal_gamma: the focusing parameter of the focal loss.
        class_counts: training examples per class (needed for ``class_weights=balanced`` when training).
    """

    name = "classification"
    class_weights: torch.Tensor

    def __init__(
        self,
        num_labels: int,
        label_names: Sequence[str] | None = None,
        label_smoothing: float = 0.0,
        class_weights: str | Sequence[float] | None = None,
        loss: str = "cross_entropy",
        focal_gamma: float = 2.0,
        class_counts: Sequence[int] | None = None,
    ):
        super().__init__(num_labels, label_names)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"module.label_smoothing={label_smoothing} must be in [0, 1).")
        if loss not in LOSSES:
            raise ConfigError(f"module.loss={loss!r} is not one of {', '.join(LOSSES)}.")
        if focal_gamma < 0:
            raise ConfigError(f"module.focal_gamma={focal_gamma} must be >= 0 (0 is plain cross-entropy).")
        self.label_smoothing, self.loss_name, self.focal_gamma = label_smoothing, loss, focal_gamma
        self.weighting = class_weights if isinstance(class_weights, str) or class_weights is None else "list"
        # always a buffer (ones = unweighted), so a rebuilt module loads the trained weights from the checkpoint
        self.register_buffer("class_weights", torch.ones(num_labels), persistent=True)
        if class_weights is not None:
            self.class_weights.copy_(torch.tensor(self._weights(class_weights, class_counts)))

    def _weights(self, value: str | Sequence[float], counts: Sequence[int] | None) -> list[float]:
        if isinstance(value, str):
            if value != "balanced":
                raise ConfigError(
                    f"module.class_weights={value!r}: use balanced, null, or one weight per class "
                    f"({self.num_labels} numbers in label order: {self.label_names})."
                )
            if counts is None:  # rebuilding a trained run: the checkpoint holds the weights
                return [1.0] * self.num_labels
            return balanced_weights(counts)
        weights = [float(w) for w in value]
        if len(weights) != self.num_labels or any(w <= 0 for w in weights):
            raise ConfigError(
                f"module.class_weights={list(value)} must hold {self.num_labels} positive numbers, one per class in "
                f"label order ({self.label_names})."
            )
        return weights

    def hparams(self) -> dict[str, Any]:
        return {"loss": self.loss_name, "class_weights": self.weighting}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class ids (B,), or class probabilities (B, C) (MixUp/CutMix soft targets: ``ftlab.augment.mix``)."""
        weight = self.class_weights if self.weighting is not None else None
        smoothing = self.label_smoothing
        if self.loss_name == "cross_entropy" and weight is not None and labels.is_floating_point():
            # torch averages weighted soft targets over the batch; divide by the weights, as for class ids
            per_example = F.cross_entropy(logits, labels, weight, label_smoothing=smoothing, reduction="none")
            return per_example.sum() / (labels @ weight).sum()
        if self.loss_name == "cross_entropy":  # takes ids or probabilities
            return F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)
        if labels.is_floating_point():
            return self._soft_focal(logits, labels, weight)
        log_p = F.log_softmax(logits.float(), -1)
        ce = F.nll_loss(log_p, labels, reduction="none")  # (B,) unweighted: p_t below is the true class's
        p_t = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1).exp()
        focal = (1 - p_t) ** self.focal_gamma * ce
        if weight is None:
            return focal.mean()
        w = weight[labels]
        return (w * focal).sum() / w.sum()

    def _soft_focal(
        self, logits: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        """Focal loss with probability targets: ``sum_c y_c (1 - p_c)^gamma (-log p_c)``; equals the hard-label
        loss for one-hot rows (a class weight: the target-weighted mean of the classes' weights)."""
        log_p = F.log_softmax(logits.float(), -1)
        focal = -(probs * (1 - log_p.exp()) ** self.focal_gamma * log_p).sum(-1)  # (B,)
        if weight is None:
            return focal.mean()
        w = probs @ weight
        return (w * focal).sum() / w.sum()

    def metrics(self) -> torchmetrics.MetricCollection:
        # validate_args=False: predictions are argmax indices and labels were checked when the data was read; the
        # per-update checks (value ranges, torch.unique) are host work every step and a device sync on GPU
        kw: dict[str, Any] = {"task": "multiclass", "num_classes": self.num_labels, "validate_args": False}
        return torchmetrics.MetricCollection(
            {
                "acc": torchmetrics.Accuracy(**kw, average="micro"),
                "f1": torchmetrics.F1Score(**kw, average="macro"),
                "precision": torchmetrics.Precision(**kw, average="macro"),
                "recall": torchmetrics.Recall(**kw, average="macro"),
            }
        )

    def update_metrics(self, metrics: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if labels.is_floating_point():  # soft targets (MixUp/CutMix): scored against the dominant class
            labels = labels.argmax(-1)
        metrics.update(logits.argmax(-1), labels)

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def decode(
        self, logits: torch.Tensor, items: Sequence[dict[str, Any]], top_k: int = 1
    ) -> list[dict[str, Any]]:
        names = self.label_names or [str(i) for i in range(logits.shape[-1])]
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        rows = []
        for item, p_row, i_row in zip(items, top_p.tolist(), top_i.tolist(), strict=True):
            rows.append(
                {
                    "input": item["input"],
                    "label": names[i_row[0]],
                    "probability": p_row[0],
                    "top_k": [
                        {"label": names[i], "probability": p} for i, p in zip(i_row, p_row, strict=True)
                    ],
                }
            )
        return rows

    def evaluator(self) -> Evaluator:
        return ClassificationEvaluator(self)


class ClassificationEvaluator(Evaluator):
    """Adds micro F1, ``per_class.csv``, ``confusion_matrix.csv`` and its plot."""

    def __init__(self, task: ClassificationTask):
        super().__init__(task)
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        super().add(logits, labels)
        self.preds.append(logits.argmax(-1).cpu())
        self.labels.append(labels.cpu())

    def finish(self, out_dir: Path, title: str) -> dict[str, float]:
        from ftlab.tasks.reports import per_class, plot_confusion

        values = self.headline()
        preds, labels = torch.cat(self.preds), torch.cat(self.labels)
        n = self.task.num_labels
        micro = torchmetrics.F1Score(task="multiclass", num_classes=n, average="micro")
        values["f1_micro"] = float(micro(preds, labels))
        names = self.task.label_names or [str(i) for i in range(n)]
        report, matrix = per_class(preds.numpy(), labels.numpy(), names)
        write_frame(out_dir / "per_class.csv", report, index=False)
        write_frame(out_dir / "confusion_matrix.csv", matrix)
        plot_confusion(matrix, out_dir / "confusion_matrix.png", title)
        print("\n" + report.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return values


class RegressionTask(Task):
    """One number per example: MSE loss; MSE, MAE and R² metrics."""

    name = "regression"
    monitor = "val/mse"

    def __init__(self, num_labels: int = 1, label_names: Sequence[str] | None = None, **_: Any):
        if num_labels != 1:
            raise ConfigError(
                f"task=regression predicts one number; the data has {num_labels} label columns."
            )
        super().__init__(1, None)

    def shape_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1)  # (B,)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits, labels.to(logits.dtype))

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "mse": torchmetrics.MeanSquaredError(),
                "mae": torchmetrics.MeanAbsoluteError(),
                "r2": torchmetrics.R2Score(),
            }
        )

    def update_metrics(self, metrics: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
        metrics.update(logits, labels.to(logits.dtype))

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def same_predictions(self, expected: torch.Tensor, got: torch.Tensor) -> bool:
        return True  # a number has no discrete prediction: the max |Δ| tolerance is the check

    def decode(
        self, logits: torch.Tensor, items: Sequence[dict[str, Any]], top_k: int = 1
    ) -> list[dict[str, Any]]:
        return [
            {"input": item["input"], "value": float(v)}
            for item, v in zip(items, logits.tolist(), strict=True)
        ]

    def evaluator(self) -> Evaluator:
        return Evaluator(self)
