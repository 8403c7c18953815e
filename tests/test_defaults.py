"""Defaults that follow the model and the data (issue #20): per-family optimizer presets, the learning-rate
search, the image input size and augmentation chosen from the images."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from tests.conftest import compose_cfg, run_cli, tiny_text_overrides

from ftlab.data.image import ImagePreprocessing, build_transform
from ftlab.data.image_size import auto_input_size
from ftlab.lr_finder import CURVE_FILE, PLOT_FILE, tuned_lr
from ftlab.train import train
from ftlab.utils.budget import auto_epochs, short_run_hint, steps_per_epoch
from ftlab.utils.errors import ConfigError


@pytest.mark.parametrize(
    ("model", "lr", "weight_decay", "warmup"),
    [
        ("minilm", 1e-4, 0.01, 0.1),
        ("bert", 5e-5, 0.01, 0.1),
        ("resnet18", 1e-3, 1e-4, 0.05),
        ("smollm2", 1e-5, 0.0, 0.03),
    ],
)
def test_each_family_brings_its_optimizer_settings(model, lr, weight_decay, warmup):
    cfg = compose_cfg([f"model={model}"])
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.warmup) == (lr, weight_decay, warmup)


def test_a_set_value_beats_the_family_preset():
    cfg = compose_cfg(["model=resnet18", "optimizer.lr=0.05", "scheduler=cosine", "scheduler.warmup=0.2"])
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.warmup) == (0.05, 1e-4, 0.2)
    # SGD keeps its own learning rate: the family presets are AdamW's
    assert compose_cfg(["model=resnet18", "optimizer=sgd"]).optimizer.lr == 0.01


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records, at every step, the learning rate each named group was updated with."""

    seen: list[dict[str, float]] = []

    def step(self, closure=None):  # type: ignore[override]
        loss = super().step(closure)  # Lightning's closure (forward, backward, module hooks) runs inside
        RecordingAdamW.seen.append({g["name"]: g["lr"] for g in self.param_groups})
        return loss


def test_lr_search_keeps_the_policy_multipliers_and_trains_with_its_suggestion(reviews_csv, tmp_path):
    overrides = [
        *tiny_text_overrides(reviews_csv, tmp_path),
        "finetune=llrd",
        "finetune.lr_decay=0.5",
        "trainer.max_epochs=1",
        "tune.lr=true",
        "tune.num_training=30",
        "tune.max_lr=0.1",
        "tune.early_stop_threshold=null",
        "callbacks=no_early_stopping",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    RecordingAdamW.seen = []
    from ftlab.runs import rebuild

    original = rebuild.build_module

    def build(*args, **kwargs):
        module = original(*args, **kwargs)
        module.optimizer_factory = partial(RecordingAdamW, **module.optimizer_factory.keywords)
        return module

    rebuild_patch = pytest.MonkeyPatch()
    rebuild_patch.setattr("ftlab.train.build_module", build)
    try:
        metrics = train(cfg)
    finally:
        rebuild_patch.undo()
    record = json.loads((tmp_path / "run" / CURVE_FILE).read_text())
    assert (tmp_path / "run" / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert len(record["lr"]) == len(record["loss"]) == 30
    assert record["lr"] == sorted(record["lr"])  # the range test raises the learning rate step by step
    assert metrics["optimizer/lr"] == pytest.approx(record["suggestion"])
    search = RecordingAdamW.seen[: len(record["lr"])]
    # during the search the head (scale 1) and the embeddings (0.5 ** distance) keep their ratio
    head, embeddings = "head", "embeddings"
    ratios = {round(step[embeddings] / step[head], 6) for step in search}
    assert len(ratios) == 1 and 0 < ratios.pop() < 0.2, search[:2]
    assert search[-1][head] > 10 * search[0][head]
    # the training after it starts from the suggestion (warmup from 0: the first step's lr is below it)
    training = RecordingAdamW.seen[len(record["lr"]) :]
    assert training and max(step[head] for step in training) == pytest.approx(record["suggestion"], rel=1e-6)


def test_a_resumed_run_reuses_its_search(tmp_path: Path):
    (tmp_path / CURVE_FILE).write_text(json.dumps({"suggestion": 0.0123, "lr": [], "loss": []}))

    class Module:
        optimizer_factory = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01)

    module = Module()
    cfg = compose_cfg(["tune.lr=true"])
    lr = tuned_lr(cfg, trainer=None, module=module, datamodule=None, output_dir=tmp_path, resumed=True)  # type: ignore[arg-type]
    assert lr == 0.0123
    assert module.optimizer_factory.keywords == {"lr": 0.0123, "weight_decay": 0.01}


@pytest.mark.parametrize(
    ("shape", "native", "expected"),
    [((50, 28, 28), 224, 64), ((50, 8, 8), 224, 32), ((5, 47, 62), 224, 96), ((5, 480, 640), 224, 224)],
)
def test_auto_input_size_follows_the_images(shape, native, expected):
    assert auto_input_size(np.zeros(shape, dtype=np.uint8), native) == expected


def test_auto_augmentation_neither_flips_nor_crops_hard():
    from torchvision.transforms import v2

    steps = build_transform(ImagePreprocessing(64, 3, (0.5,) * 3, (0.5,) * 3), "auto", train=True).transforms
    assert not any(isinstance(step, v2.RandomHorizontalFlip) for step in steps)
    crops = [step for step in steps if isinstance(step, v2.RandomResizedCrop)]
    assert len(crops) == 1 and crops[0].scale == (0.85, 1.0)


def test_an_image_folder_run_trains_predicts_and_evaluates_at_the_size_auto_chose(tmp_path):
    from tests.test_image_data import make_folder

    from ftlab.runs.rebuild import datamodule_for, load_run

    root = make_folder(tmp_path / "images", {"ant": 12, "bee": 12}, size=20)  # 20 x 24 px
    overrides = [
        "model=tiny_resnet",
        "model.backbone.input_size=224",  # as an ImageNet backbone: auto must not blow 20 px up to 224
        "data=image_folder",
        f"data.root={root}",
        "data.num_workers=0",
        "data.batch_size=8",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_epochs=1",
        "callbacks.progress_bar.kind=log",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    metrics = train(cfg)
    assert metrics["optimizer/lr"] == 1e-4  # tiny_resnet's preset
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")  # what the CLI's Hydra run writes
    run = load_run(tmp_path / "run")
    assert run.module.hparams["input_size"] == 64  # min(224, max(32, 2 x 20 rounded up to 32))
    assert run.module.backbone.preprocessing.input_size == 64
    encoded = datamodule_for(run, setup=False).encode([str(next((root / "ant").iterdir()))])
    assert encoded[0]["pixel_values"].shape == (3, 64, 64)
    # evaluation rebuilds the data module: the run's size is kept, not chosen again
    datamodule = datamodule_for(run)
    assert datamodule.datasets["test"][0]["pixel_values"].shape == (3, 64, 64)


def test_the_panel_script_sweeps_defaults_and_five_rates_per_dataset(tmp_path):
    """scripts/defaults_panel.sh with a stand-in Python that records each sweep's command line: two sweeps per
    dataset (defaults only; the four other learning rates of five), 3 seeds each, every command composes to the
    defaults, and each dataset's two sweeps end in one ftlab-report table."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    record = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {record}\n')
    fake.chmod(0o755)
    (tmp_path / "data" / "mnist5k").mkdir(parents=True)  # the data writer is skipped
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "PANEL_DATA": str(tmp_path / "data"), "STAMP": "t"}
    done = subprocess.run(
        [
            "bash",
            "scripts/defaults_panel.sh",
            "mnist5k",
            "noun_share",
            "wnut16",
            "--",
            "hydra/launcher=parallel",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in record.read_text().splitlines()]
    calls = [c for c in lines if c[:2] == ["-m", "ftlab.train"]]
    reports = [c for c in lines if c[:2] == ["-m", "ftlab.report"]]
    assert len(calls) == 6 and all(c[2] == "-m" for c in calls) and len(lines) == 9
    # each dataset ends in its ftlab-report table: the default sweep, then the rate sweep, on the task's metric
    sweeps = [next(a.split("=", 1)[1] for a in c if a.startswith("hydra.sweep.dir=")) for c in calls]
    assert [r[2:] for r in reports] == [
        [sweeps[0], sweeps[1], "--metrics", "test/acc"],
        [sweeps[2], sweeps[3], "--metrics", "test/r2"],
        [sweeps[4], sweeps[5], "--metrics", "test/f1"],
    ]
    assert lines.index(reports[0]) == 2  # after the dataset's two sweeps
    names = [next(a for a in c if a.startswith("name=")) for c in calls]
    assert names == [
        f"name=panel_{d}_{kind}" for d in ("mnist5k", "noun_share", "wnut16") for kind in ("default", "lr")
    ]
    for call in calls:
        args = dict(a.split("=", 1) for a in call[3:] if "=" in a and not a.startswith(("hydra.", "paths.")))
        assert args.pop("seed") == "1,2,3" and args.pop("hydra/launcher") == "parallel"
        rates = args.pop("optimizer.lr", None)
        assert rates is None or len(rates.split(",")) == 4
        cfg = compose_cfg([f"{k}={v}" for k, v in args.items()])
        # nothing else is set: the model family's rate (the fifth, middle point: the default run), the image
        # defaults chosen from the data
        if rates is not None:
            swept = sorted(float(r) for r in rates.split(","))
            assert cfg.optimizer.lr not in swept and swept[1] < cfg.optimizer.lr < swept[2]
        if cfg.data.get("root"):
            assert (cfg.optimizer.lr, cfg.data.input_size, cfg.data.augment) == (1e-3, "auto", "auto")
        else:
            assert cfg.optimizer.lr == 1e-4 and cfg.model.backbone.name_or_path.endswith("all-MiniLM-L6-v2")
    noun = compose_cfg([a for a in calls[2][3:] if a.startswith("data")])
    assert (noun.data.task, noun.data.label_column) == ("regression", "target")


def test_the_panel_summary_compares_defaults_with_the_best_rate(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "panel_summary", root / "scripts" / "defaults_panel_summary.py"
    )
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)

    def write(
        sweep: str, rows: list[tuple[float, float]], task: str = "classification", metric: str = "test/acc"
    ):
        for i, (lr, score) in enumerate(rows):
            (tmp_path / sweep / str(i)).mkdir(parents=True)
            record = {"task": task, "optimizer/lr": lr, metric: score}
            (tmp_path / sweep / str(i) / "metrics.json").write_text(json.dumps(record))

    write("panel_digits_default_s", [(1e-3, 0.90), (1e-3, 0.92), (1e-3, 0.94)])
    write("panel_digits_lr_s", [(1e-3, 0.92), (1e-3, 0.92), (1e-2, 0.96), (1e-2, 0.98), (1e-4, 0.99)])
    write("panel_noun_share_default_s", [(1e-4, 0.5)], "regression", "test/r2")
    # the sweep leaves out the preset's rate (1e-3): the default runs are that point, and the best one here
    write("panel_lfw_default_s", [(1e-3, 0.80), (1e-3, 0.84)])
    write("panel_lfw_lr_s", [(1e-4, 0.70), (1e-4, 0.72), (1e-2, 0.79), (1e-2, 0.83)])
    table = summary.summarise(sorted(tmp_path.iterdir()))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    # the best rate by its mean over seeds (1e-4: 0.99 beats 1e-2: 0.97 and 1e-3: 0.92); 0.92 / 0.99 = 93%
    assert rows["digits"] == (
        "| digits | test/acc | 0.920 ± 0.020 (0.001) | 0.990 ± 0.000 (0.0001) | 93% "
        "| 0.0001: 0.990, 0.001: 0.920, 0.01: 0.970 |"
    )
    assert rows["lfw"] == (
        "| lfw | test/acc | 0.820 ± 0.028 (0.001) | 0.820 ± 0.028 (0.001) | 100% "
        "| 0.0001: 0.710, 0.001: 0.820, 0.01: 0.810 |"
    )
    assert "(incomplete)" in rows["noun_share"]


@pytest.mark.parametrize(
    ("per_epoch", "expected"),
    [(45, 14), (8, 50), (400, 2), (600, 2), (100, 6)],  # digits' 45 steps an epoch: 14 epochs for 600 steps
)
def test_auto_epochs_count_steps_within_bounds(per_epoch, expected):
    assert auto_epochs(per_epoch, min_steps=600, least=2, most=50) == expected


def test_steps_per_epoch_follow_devices_limits_and_accumulation():
    class Trainer:
        world_size, limit_train_batches, accumulate_grad_batches = 2, 1.0, 1

    assert steps_per_epoch(101, Trainer()) == 51  # each of 2 ranks gets ceil(101 / 2) batches
    Trainer.limit_train_batches, Trainer.accumulate_grad_batches = 0.5, 2
    assert steps_per_epoch(100, Trainer()) == 13  # 25 batches a rank, 2 per step
    Trainer.limit_train_batches = 4
    assert steps_per_epoch(100, Trainer()) == 2


def test_max_epochs_auto_trains_for_the_steps_asked(reviews_csv, tmp_path):
    """80 reviews, 64 for training at batch 8: 8 steps an epoch, so 20 steps need 3 epochs; recorded in
    metrics.json, and the trainer ran exactly those (early stopping off)."""
    overrides = [
        *tiny_text_overrides(reviews_csv, tmp_path),
        "trainer.max_epochs=auto",
        "auto_epochs.min_steps=20",
        "callbacks.early_stopping=null",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["trainer/max_epochs"] == 3
    logged = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    assert sorted(logged.dropna(subset=["train/loss_epoch"])["epoch"].astype(int)) == [0, 1, 2]
    assert "trainer/max_epochs" not in train(
        compose_cfg(tiny_text_overrides(reviews_csv, tmp_path), tmp_path / "b")
    )


def test_auto_epochs_bounds_are_checked(reviews_csv, tmp_path):
    overrides = [
        *tiny_text_overrides(reviews_csv, tmp_path),
        "trainer.max_epochs=auto",
        "auto_epochs.min=5",
        "auto_epochs.max=3",
    ]
    with pytest.raises(ConfigError, match=r"auto_epochs=.*min <= max"):
        train(compose_cfg(overrides, tmp_path / "run"))


def test_the_config_check_takes_auto_epochs_and_names_it(tmp_path):
    done = run_cli("train", ["trainer.max_epochs=forever"], cwd=tmp_path, timeout=120)
    assert done.returncode != 0 and "trainer.max_epochs" in done.stderr and "'auto'" in done.stderr, (
        done.stderr[-2000:]
    )


@pytest.mark.parametrize(
    ("overrides", "best_epoch", "steps", "hinted"),
    [
        ([], 1, 90, True),  # digits' 2 default epochs: best at the last one, 90 steps
        ([], 0, 90, False),  # the best epoch came earlier: the run had stopped improving
        ([], 1, 600, False),  # enough steps
        (["auto_epochs.min_steps=1000"], 1, 600, True),
        (["trainer.max_epochs=auto"], 1, 90, False),  # not resolved (train() skips resolved auto runs too)
        (["+trainer.max_steps=90"], 1, 90, False),  # a budget in steps was chosen
        ([], None, 90, False),  # nothing validated
        ([], 1, 0, False),  # the parent of spawned ranks saw no step
    ],
)
def test_a_short_run_still_improving_is_told_what_to_set(overrides, best_epoch, steps, hinted):
    class Trainer:
        global_step = steps

    hint = short_run_hint(compose_cfg(overrides), Trainer(), best_epoch)
    assert (hint is not None) == hinted
    if hinted:
        assert "trainer.max_epochs=auto" in hint and f"after {steps} optimizer steps" in hint


def test_a_one_epoch_run_logs_the_hint(reviews_csv, tmp_path, caplog):
    """One epoch: its best epoch is its last, 8 steps: the run says what to set. A max_epochs=auto run whose
    length was capped below min_steps (auto_epochs.max=1: 8 of 20 steps) does not: it already has auto."""
    base = [*tiny_text_overrides(reviews_csv, tmp_path), "callbacks.early_stopping=null"]
    with caplog.at_level(logging.INFO, logger="ftlab.train"):
        train(compose_cfg([*base, "trainer.max_epochs=1"], tmp_path / "one"))

    def hints() -> list[str]:  # the budget module's own "trainer.max_epochs=auto: N epochs" line is not one
        return [
            r.getMessage() for r in caplog.records if r.name == "ftlab.train" and "auto" in r.getMessage()
        ]

    assert hints() and "(1 of trainer.max_epochs=1), after 8 optimizer steps" in hints()[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftlab.train"):
        train(
            compose_cfg(
                [
                    *base,
                    "trainer.max_epochs=auto",
                    "auto_epochs.min_steps=20",
                    "auto_epochs.min=1",
                    "auto_epochs.max=1",
                ],
                tmp_path / "auto",
            )
        )
    assert not hints()
