"""End to end: the train entry point, the run folder contract, resume, and user errors from the command line."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from ftlab.runs.rebuild import find_checkpoint
from ftlab.train import train
from ftlab.utils.errors import DataFileError

from conftest import ROOT, compose_cfg, only_run_dir, read_json, run_cli, tiny_reviews, tiny_text_overrides


@pytest.mark.parametrize("source", ["rotten_tomatoes", "debates_2016", "text_files"])
def test_fast_dev_run_for_each_offline_text_source(reviews_csv, tmp_path, source):
    overrides = tiny_text_overrides(reviews_csv, tmp_path) + ["debug=fdr"]
    if source != "text_files":
        overrides = [o for o in overrides if not o.startswith("data")] + [
            f"data={source}",
            "data.max_length=16",
        ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert {"test/acc", "test/f1", "test/loss", "trainable_params", "total_params"} <= set(metrics)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_cli_run_writes_the_run_folder_contract(reviews_csv, tmp_path):
    args = tiny_text_overrides(reviews_csv, tmp_path) + [
        f"paths.log_dir={tmp_path}/out",
        "trainer.max_epochs=4",
    ]
    proc = run_cli("train", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path / "out")
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "metrics.json",
        "labels.json",
        "csv/metrics.csv",
        "train.log",
    ):
        assert (run / name).is_file(), name
    metrics = read_json(run / "metrics.json")
    assert (
        metrics["test/acc"] >= 0.8
    )  # the tiny table is easy: the tiny model must have learnt it (chance: 0.5)
    assert metrics["best/val/acc"] is not None and metrics["best_epoch"] in (0, 1, 2, 3)
    assert metrics["overrides"] == args and metrics["wall_time_s"] > 0
    assert read_json(run / "labels.json") == {"task": "classification", "names": ["neg", "pos"]}
    csv = pd.read_csv(run / "csv" / "metrics.csv")
    assert {"train/loss_step", "val/acc", "val/f1", "test/acc"} <= set(csv.columns)
    epoch_loss = csv["train/loss_epoch"].dropna()
    assert len(epoch_loss) == 4 and epoch_loss.iloc[-1] < epoch_loss.iloc[0]
    assert "test/acc" in proc.stdout and str(run) in proc.stdout
    labels = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["hyper_parameters"][
        "label_names"
    ]
    assert labels == ["neg", "pos"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_resumed_run_ends_like_the_uninterrupted_one(reviews_csv, tmp_path):
    base = tiny_text_overrides(reviews_csv, tmp_path) + [
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
        "callbacks.early_stopping=null",
    ]
    whole = run_cli("train", base + [f"paths.log_dir={tmp_path}/whole"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    env_path = f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ["PYTHONPATH"] = env_path
    try:
        crash = ["+callbacks.crash._target_=crash_callback.CrashInEpoch", "+callbacks.crash.epoch=2"]
        broken = run_cli("train", base + [f"paths.log_dir={tmp_path}/broken", *crash], cwd=tmp_path)
        assert broken.returncode != 0 and "KeyboardInterrupt" in broken.stderr
        run = only_run_dir(tmp_path / "broken")
        assert not (run / "metrics.json").exists()
        assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 1
        resumed = run_cli("train", [f"resume={run}", "~callbacks.crash"], cwd=tmp_path)
    finally:
        os.environ["PYTHONPATH"] = env_path.split(os.pathsep, 1)[1]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (
        read_json(only_run_dir(tmp_path / "whole") / "metrics.json"),
        read_json(run / "metrics.json"),
    )
    for key in ("test/acc", "test/loss", "test/f1", "best/val/acc", "best_epoch"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    a, b = _weights(only_run_dir(tmp_path / "whole")), _weights(run)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert got["overrides"] == [
        *base,
        f"paths.log_dir={tmp_path}/broken",
        *crash,
    ]  # the run's record, not the resume
    assert sorted(p.name for p in (tmp_path / "broken" / "train").iterdir()) == [run.name]  # same folder


def test_help_lists_config_groups(tmp_path):
    proc = run_cli("train", ["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for group in (
        "data:",
        "model:",
        "finetune:",
        "optimizer:",
        "scheduler:",
        "trainer:",
        "logger:",
        "debug:",
    ):
        assert group in proc.stdout
    assert "rotten_tomatoes" in proc.stdout and "tiny_bert" in proc.stdout


def _bad_test_file(tmp_path: Path) -> str:
    path = tmp_path / "test.csv"
    pd.DataFrame({"review": ["fine", "odd"], "stars": ["pos", "meh"]}).to_csv(path, index=False)
    return f"data.test_file={path}"


ERRORS = {
    "missing_file": (lambda t: "data.train_file=/no/such/reviews.csv", "no such file"),
    "missing_column": (
        lambda t: "data.text_column=body",
        "is not a column of the train data; its columns are: review, stars",
    ),
    "empty_after_filtering": (lambda t: "data.labels=[zzz]", "is empty after"),
    "unseen_label": (_bad_test_file, "label(s) ['meh']"),
    "model_offline": (lambda t: "model=bert", "could not be loaded"),
    "unknown_key": (lambda t: "trainer.no_such_key=1", "no_such_key"),
    "null_lr": (
        lambda t: "optimizer.lr=null",
        "optimizer.lr=null: torch.optim.AdamW's lr takes a number, not null",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_errors_exit_non_zero_with_a_clear_message(reviews_csv, tmp_path, case):
    make_arg, message = ERRORS[case]
    args = [
        a
        for a in tiny_text_overrides(reviews_csv, tmp_path)
        if not (case == "model_offline" and a.startswith("model="))
    ]
    proc = run_cli("train", args + [f"paths.log_dir={tmp_path}/out", make_arg(tmp_path)], cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    if case != "unknown_key":  # ftlab's own errors: one paragraph, no traceback
        assert "Traceback" not in proc.stderr and proc.returncode == 2
    if case == "model_offline":
        assert "model=minilm" in proc.stderr


def test_a_new_run_never_overwrites_an_existing_run_folder(reviews_csv, tmp_path):
    args = tiny_text_overrides(reviews_csv, tmp_path) + ["debug=limit", f"paths.log_dir={tmp_path}/out"]
    assert run_cli("train", args, cwd=tmp_path).returncode == 0
    run = only_run_dir(tmp_path / "out")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli("train", args + [f"hydra.run.dir={run}", "seed=7"], cwd=tmp_path)
    assert proc.returncode == 2 and "already holds" in proc.stderr and "resume=" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_keep_checkpoints_false_leaves_the_metrics_and_drops_the_weights(reviews_csv, tmp_path):
    overrides = tiny_text_overrides(reviews_csv, tmp_path) + ["debug=limit", "keep_checkpoints=false"]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert (
        "test/acc" in metrics
        and read_json(tmp_path / "run" / "metrics.json")["test/acc"] == metrics["test/acc"]
    )
    assert (tmp_path / "run" / "labels.json").is_file() and not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(DataFileError, match="the run finished: keep_checkpoints=false deletes them"):
        find_checkpoint(tmp_path / "run")
    kept = train(compose_cfg(tiny_text_overrides(reviews_csv, tmp_path) + ["debug=limit"], tmp_path / "kept"))
    assert (tmp_path / "kept" / "checkpoints" / "best.ckpt").is_file() and "test/acc" in kept


def test_regression_task_learns_with_mse(tmp_path):
    """A score of -1 (negative review) or +1 (positive): the model must beat predicting the mean by far. (Centred
    scores: with 1 and 5 the head's bias alone would need ~1,000 Adam steps of lr 3e-3 to reach their mean.)"""
    path = tmp_path / "scores.csv"
    frame = tiny_reviews(40).assign(score=lambda f: (f["stars"] == "pos").astype(float) * 2 - 1)
    frame.to_csv(path, index=False)
    overrides = tiny_text_overrides(path, tmp_path) + [
        "data.task=regression",
        "data.label_column=score",
        "trainer.max_epochs=6",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert (
        metrics["monitor"] == "val/mse" and "best/val/mse" in metrics
    )  # the task's metric, without monitor=
    assert {"test/mse", "test/mae", "test/r2"} <= set(metrics) and "test/acc" not in metrics
    # the stratified test split holds as many -1s as +1s: predicting their mean (0) has MSE 1.0, any constant >= 1.0;
    # the model must at least halve that (measured here: 4 epochs on 48 texts already reach 0.42)
    assert metrics["test/mse"] < 0.5 and metrics["test/r2"] > 0.5, metrics


@pytest.mark.slow
def test_pretrained_minilm_learns_real_reviews_quickly(tmp_path):
    """The real path at a small budget: embedded MiniLM on 1,000 Rotten Tomatoes reviews, one epoch."""
    overrides = [
        "data.max_train_examples=1000",
        "data.max_length=32",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=10",
        "trainer.limit_test_batches=20",
        "callbacks.progress_bar.kind=log",
        "optimizer.lr=1e-4",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["test/acc"] >= 0.72  # majority class: 0.578; the full demo reaches 0.82
