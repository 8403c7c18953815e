"""The Task interface: what a kind of target means for the model, the loss, the metrics and the outputs.

A task is an ``nn.Module`` held by the LightningModule (``module.task``), so what it learns or is given at training
time (class weights, tuned multi-label thresholds) lives in its buffers and travels in every checkpoint. Train,
eval, predict, export, the feature cache and the report ask the task; none of them branches on the kind of target.

Batches (dicts of tensors) carry ``labels`` in the task's own shape:

============================  =====================  ==========================  =============================
task                          labels                 head output (``logits``)    a prediction
============================  =====================  ==========================  =============================
``classification``            (B,) long              (B, C)                      a label + probabilities
``regression``                (B,) float             (B,)                        a number
``multilabel``                (B, C) float 0/1       (B, C)                      a label set + probabilities
``token_classification``      (B, T) long, -100 =    (B, T, C)                   tags per word / entity spans
                              not scored
============================  =====================  ==========================  =============================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchmetrics
from torch import nn

IGNORE_INDEX = -100  # labels of positions that are not scored (subword continuations, padding)


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, C) vs (B, T): the mean cross-entropy over scored positions (labels != IGNORE_INDEX); a batch with
    none gives 0 (still attached to the graph), not NaN."""
    flat = labels.reshape(-1)
    if not bool((flat != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX
    )


class Task(nn.Module):
    """Base of the tasks. Subclasses set ``name`` and ``level`` and implement the methods that raise here.

    Args:
        num_labels: classes / labels / tags; 1 for regression.
        label_names: names in id order (``None`` for regression).
    """

    name: ClassVar[str]
    # "sequence": one output per example from the backbone's pooled features; "token": one per token
    level: ClassVar[str] = "sequence"
    # the validation metric checkpointing, early stopping and sweeps watch unless the user sets ``monitor=``
    monitor: ClassVar[str] = "val/acc"

    def __init__(self, num_labels: int, label_names: Sequence[str] | None = None):
        super().__init__()
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names is not None else None

    # --- model ------------------------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        """The head's output size."""
        return self.num_labels

    def make_head(self, backbone: nn.Module, configured: Callable[[], nn.Module]) -> nn.Module:
        """The head: ``configured()`` builds ``model.head``; a task whose head comes from the backbone (the
        masked-LM decoder tied to the word embeddings) builds its own."""
        return configured()

    def shape_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's raw output in the task's logits shape (regression drops the last axis)."""
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- metrics ----------------------------------------------------------------------------------------------
    def metrics(self) -> torchmetrics.MetricCollection:
        """A fresh collection of this task's metrics (one per stage); names become ``<stage>/<name>``."""
        raise NotImplementedError

    def update_metrics(
        self, metrics: torchmetrics.MetricCollection, logits: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """Feed one batch (detached logits) to ``metrics``."""
        raise NotImplementedError

    # --- outputs ----------------------------------------------------------------------------------------------
    def decode(
        self, logits: torch.Tensor, items: Sequence[dict[str, Any]], top_k: int = 1
    ) -> list[dict[str, Any]]:
        """One prediction row per example: ``items`` are what the data module's ``encode`` made of the raw inputs
        (``item["input"]`` is the raw input), ``logits`` the module's output for their collated batch."""
        raise NotImplementedError

    def same_predictions(self, expected: torch.Tensor, got: torch.Tensor) -> bool:
        """Whether two sets of logits for the same batch decode to the same predictions (export checks)."""
        return bool(torch.equal(self.hard(expected), self.hard(torch.as_tensor(got))))

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        """The decoded prediction as a tensor (ids, 0/1 sets, values) for comparisons."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        """Collects a split's outputs for ``ftlab-eval`` and writes the task's report."""
        raise NotImplementedError

    # --- training hooks ---------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, metrics: torchmetrics.MetricCollection) -> None:
        """Called with the validation metrics before they are computed (multi-label tunes its thresholds then)."""

    def write_files(self, run_dir: Path) -> None:
        """Files the task adds to the run folder after testing (multi-label: ``thresholds.json``)."""

    # --- checkpoint hyper-parameters --------------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """What rebuilding the task needs besides ``num_labels``/``label_names`` (saved with the module)."""
        return {}


class Evaluator:
    """Accumulates ``(logits, labels)`` batch by batch; ``finish`` returns metrics and writes report files."""

    def __init__(self, task: Task):
        self.task = task
        self.metrics = task.metrics()
        self.losses: list[tuple[float, int]] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.float().cpu(), labels.cpu()
        self.task.update_metrics(self.metrics, logits, labels)
        self.losses.append((float(self.task.loss(logits, labels)), len(labels)))

    def headline(self) -> dict[str, float]:
        """The training metrics' definitions over the whole split, plus the example-weighted mean loss."""
        values = {k: float(v) for k, v in self.metrics.compute().items()}
        total = sum(n for _, n in self.losses) or 1
        values["loss"] = sum(v * n for v, n in self.losses) / total
        return values

    def finish(self, out_dir: Path, title: str) -> dict[str, float]:
        """Metrics over the split; subclasses also write per-class / per-label files into ``out_dir``."""
        return self.headline()
