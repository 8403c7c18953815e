"""Metric updates deferred off the training step (``ftlab.models.module.PendingUpdates``): the same epoch metrics as
per-step updates, flushed before anything reads them, and the progress bars still showing the step loss."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics

from ftlab.callbacks import STEP_LOSS, LogProgress
from ftlab.models.module import FinetuneModule, PendingUpdates
from ftlab.tasks import build_task
from ftlab.train import train
from ftlab.utils.devices import compile_backbone
from ftlab.utils.errors import ConfigError

from conftest import compose_cfg, tiny_text_overrides

Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


def _batches(kind: str, n: int = 40) -> tuple[Any, list[Step]]:
    g = torch.Generator().manual_seed(0)
    steps: list[Step] = []
    if kind == "token":
        task = build_task("token_classification", 5, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    elif kind == "regression":
        task = build_task("regression", 1)
    else:
        task = build_task("classification", 3, ["a", "b", "c"])
    for i in range(n):
        batch = 1 + i % 7  # uneven batch sizes, as the last batch of an epoch
        if kind == "token":
            width = 3 + i % 5  # every batch its own width: nothing to concatenate
            logits = torch.randn(batch, width, 5, generator=g)
            labels = torch.randint(0, 5, (batch, width), generator=g)
            labels[:, -1] = -100  # padding
        elif kind == "regression":
            logits, labels = torch.randn(batch, generator=g), torch.randn(batch, generator=g)
        else:
            logits, labels = torch.randn(batch, 3, generator=g), torch.randint(0, 3, (batch,), generator=g)
        # distillation: some rows have no label (all of them in every fifth batch)
        labelled = (
            torch.rand(batch, generator=g) > (1.0 if i % 5 == 0 else 0.3) if kind == "distill" else None
        )
        steps.append((logits, labels, labelled, torch.rand((), generator=g)))
    return task, steps


@pytest.mark.parametrize("kind", ["classification", "distill", "regression", "token"])
def test_deferred_updates_give_the_per_step_metrics(kind):
    task, steps = _batches(kind)
    direct, deferred = task.metrics(), task.metrics()
    direct_loss, deferred_loss = (torchmetrics.MeanMetric(nan_strategy="disable") for _ in range(2))
    for logits, labels, labelled, loss in steps:  # what the step did before: an update per step
        kept_logits, kept = (logits[labelled], labels[labelled]) if labelled is not None else (logits, labels)
        if len(kept):
            task.update_metrics(direct, kept_logits, kept)
        direct_loss.update(loss.expand(len(labels)))
    pending = PendingUpdates()
    calls = 0
    for logits, labels, labelled, loss in steps:
        pending.add("train", logits, labels, labelled, loss)
    for logits, labels, losses in pending.take("train"):
        calls += 1
        if len(labels):
            task.update_metrics(deferred, logits, labels)
        deferred_loss.update(losses)
    expected, got = direct.compute(), deferred.compute()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    torch.testing.assert_close(deferred_loss.compute(), direct_loss.compute())
    # sequence-level outputs are joined into one update; token batches of different widths are not
    assert calls == (len(steps) if kind == "token" else 1)
    assert pending.take("train") == []  # taken once


def test_pending_updates_are_full_after_max_steps_or_max_bytes():
    pending = PendingUpdates()
    for _ in range(PendingUpdates.MAX_STEPS - 1):
        pending.add("train", torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), None, torch.tensor(1.0))
    assert not pending.full("train") and not pending.full("val")
    pending.add("train", torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), None, torch.tensor(1.0))
    assert pending.full("train")
    pending.take("train")
    big = torch.zeros(PendingUpdates.MAX_BYTES // 4 + 1)  # one step of a language model's logits
    pending.add("val", big, torch.zeros(1), None, torch.tensor(1.0))
    assert pending.full("val") and not pending.full("train")


class _CountUpdates(pl.Callback):
    """Rows and update calls the training metrics receive in each epoch."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.calls: list[int] = []
        self.batches: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: Any) -> None:
        self.rows.append(0)
        self.calls.append(0)
        self.batches.append(0)
        if not getattr(module.task, "_counted", False):
            original = module.task.update_metrics

            def counted(metrics: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
                if metrics is module.metrics["train_metrics"]:
                    self.rows[-1] += len(labels)
                    self.calls[-1] += 1
                original(metrics, logits, labels)

            module.task.update_metrics = counted
            module.task._counted = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batches[-1] += 1

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def test_a_run_gives_every_training_row_to_the_metrics_once_per_epoch(reviews_csv, tmp_path, monkeypatch):
    """80 reviews, 64 for training at batch 8: 8 steps an epoch. With flushes every 3 steps the epoch's rows reach
    the metrics in ceil(8 / 3) = 3 updates, all of them before the epoch's values are computed and logged."""
    monkeypatch.setattr(PendingUpdates, "MAX_STEPS", 3)
    global COUNTER
    COUNTER = counter = _CountUpdates()
    overrides = [
        *tiny_text_overrides(reviews_csv, tmp_path),
        "trainer.max_epochs=2",
        "+callbacks.count._target_=test_pending_metrics.counter",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert counter.batches == [8, 8]
    assert counter.rows == [64, 64] and counter.calls == [3, 3]
    assert 0.0 <= counter.logged["train/acc"] <= 1.0 and counter.logged["train/loss_epoch"] > 0
    assert "test/acc" in metrics


COUNTER: _CountUpdates | None = None


def counter() -> _CountUpdates:
    assert COUNTER is not None
    return COUNTER


def test_progress_lines_show_the_step_loss_without_a_per_step_conversion(reviews_csv, tmp_path, caplog):
    """train/loss_step is no progress-bar value for Lightning (which would convert it after every step); the log
    bar still prints it, converted once per logged value."""
    seen: dict[str, Any] = {}

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            seen.setdefault("pbar", set()).update(trainer.progress_bar_metrics)
            seen.setdefault("callback", set()).update(trainer.callback_metrics)

    overrides = [
        *tiny_text_overrides(reviews_csv, tmp_path),
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=2",
        "+callbacks.progress_bar.every_n_steps=4",
        "+callbacks.look._target_=test_pending_metrics.look",
    ]
    global LOOK
    LOOK = Look()
    with caplog.at_level(logging.INFO, logger="ftlab.callbacks"):
        train(compose_cfg(overrides, tmp_path / "run"))
    assert STEP_LOSS in seen["callback"] and STEP_LOSS not in seen["pbar"]
    lines = [r.getMessage() for r in caplog.records if " step 4/" in r.getMessage()]
    assert lines and f"{STEP_LOSS}=" in lines[0], lines


LOOK: pl.Callback | None = None


def look() -> pl.Callback:
    assert LOOK is not None
    return LOOK


def test_log_progress_converts_a_logged_value_once():
    bar = LogProgress()

    class Trainer:  # what get_metrics reads
        callback_metrics = {STEP_LOSS: torch.tensor(0.25)}
        progress_bar_metrics: dict[str, float] = {}
        loggers: list[Any] = []

    class Value(torch.Tensor):
        conversions = 0

        def __float__(self) -> float:
            Value.conversions += 1
            return super().__float__()

    value = torch.tensor(0.5).as_subclass(Value)
    Trainer.callback_metrics = {STEP_LOSS: value}
    for _ in range(3):
        assert bar.get_metrics(Trainer(), None)[STEP_LOSS] == 0.5  # type: ignore[arg-type]
    assert Value.conversions == 1


def test_compile_setting_checked_and_mode_passed():
    calls: list[dict[str, Any]] = []

    class Backbone(torch.nn.Module):
        def compile(self, **kwargs: Any) -> None:  # type: ignore[override]
            calls.append(kwargs)

    compile_backbone(Backbone(), False)
    compile_backbone(Backbone(), None)
    assert calls == []
    compile_backbone(Backbone(), True)
    compile_backbone(Backbone(), "reduce-overhead")
    assert calls == [{"mode": None}, {"mode": "reduce-overhead"}]
    with pytest.raises(ConfigError, match=r"compile='fast'.*reduce-overhead"):
        compile_backbone(Backbone(), "fast")


def test_module_flushes_before_reading(monkeypatch):
    """Every place that reads a stage's metrics takes the waiting steps first."""
    flushed: list[str] = []
    monkeypatch.setattr(FinetuneModule, "flush_metrics", lambda self, stage: flushed.append(stage))

    class Fake:
        metrics = {
            f"{s}_metrics": torchmetrics.MetricCollection({"m": torchmetrics.MeanMetric()})
            for s in ("train", "val", "test")
        }
        losses = {f"{s}_loss": torchmetrics.MeanMetric() for s in ("train", "val", "test")}

        class task:
            @staticmethod
            def on_validation_epoch_end(metrics: Any) -> None:
                flushed.append("task reads val")

        def log(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_dict(self, *args: Any, **kwargs: Any) -> None:
            pass

    fake = Fake()
    fake.flush_metrics = lambda stage: flushed.append(stage)  # type: ignore[attr-defined]
    fake._log_epoch_metrics = lambda stage: FinetuneModule._log_epoch_metrics(fake, stage)  # type: ignore[attr-defined]
    for stage in ("train", "val", "test"):
        fake.metrics[f"{stage}_metrics"].update(torch.tensor(1.0))
    FinetuneModule.on_validation_epoch_end(fake)  # type: ignore[arg-type]
    FinetuneModule.on_train_epoch_end(fake)  # type: ignore[arg-type]
    FinetuneModule.on_test_epoch_end(fake)  # type: ignore[arg-type]
    assert flushed == ["val", "task reads val", "val", "train", "test"]
