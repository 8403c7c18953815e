"""SetFit-style few-shot (``finetune=setfit``, ftlab.setfit): label pairs, the contrastive body stage, the head on the
tuned body, the run folder, resume, and the errors; tiny_bert on the tiny review table."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ftlab.evaluate import evaluate
from ftlab.finetuning import FinetunePolicy
from ftlab.runs.rebuild import datamodule_for, load_run
from ftlab.setfit import ContrastiveModule, ContrastiveStage, check_run, make_pairs
from ftlab.train import train
from ftlab.utils.errors import ConfigError

from conftest import CONF_DIR, compose_cfg, read_json, tiny_reviews, tiny_text_overrides

ITERATIONS = 5  # pairs per example and kind: 16 examples -> 160 pairs, 10 steps of 16 per epoch


class Crash(RuntimeError):
    """A simulated failure (not KeyboardInterrupt: Lightning turns that into sys.exit)."""


class CrashInStageTwo(pl.Callback):
    """Fails in the second epoch of the head's training; ``last.ckpt`` is the first epoch's."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise Crash("simulated failure in stage 2")


def _overrides(tmp: Path, *extra: str) -> list[str]:
    csv = tmp / "reviews.csv"
    if not csv.exists():
        tiny_reviews().to_csv(csv, index=False)
    return tiny_text_overrides(csv, tmp) + [
        "finetune=setfit",
        "data.examples_per_class=8",
        f"finetune.contrastive.num_iterations={ITERATIONS}",
        "finetune.contrastive.lr=3e-3",  # the tiny random BERT separates the labels clearly in 20 steps
        "finetune.contrastive.epochs=2",
        "finetune.lr_multipliers.head=10",
        "trainer.max_epochs=2",
        "callbacks.early_stopping=null",
        *extra,
    ]


def _train(tmp: Path, name: str, *extra: str) -> dict:
    cfg = compose_cfg(_overrides(tmp, *extra), tmp / name)
    metrics = train(cfg)
    (tmp / name / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, tmp / name / ".hydra/config.yaml")  # what a Hydra run writes; train() alone does not
    return metrics


def _state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def setfit_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("setfit")
    _train(tmp, "run")
    return tmp


# --- pairs -----------------------------------------------------------------------------------------------------


def test_pairs_are_balanced_labelled_and_seeded():
    labels = np.array([0] * 3 + [1] * 4 + [2] * 5)
    pairs = make_pairs(labels, num_iterations=3, pairs=None, seed=7)
    assert pairs.shape == (2 * 3 * 12, 3)
    same = pairs[:, 2] == 1
    assert same.sum() == (~same).sum() == 36
    a, b = pairs[:, 0], pairs[:, 1]
    assert (labels[a[same]] == labels[b[same]]).all() and (a[same] != b[same]).all()
    assert (labels[a[~same]] != labels[b[~same]]).all()
    # every example anchors exactly num_iterations positive and num_iterations negative pairs
    assert np.bincount(a[same], minlength=12).tolist() == [3] * 12
    assert np.bincount(a[~same], minlength=12).tolist() == [3] * 12
    # partners are drawn, not fixed: every member of the biggest class is some positive partner
    assert set(b[same & (labels[a] == 2)]) == set(np.flatnonzero(labels == 2))
    np.testing.assert_array_equal(pairs, make_pairs(labels, 3, None, seed=7))
    assert not np.array_equal(pairs, make_pairs(labels, 3, None, seed=8))
    odd = make_pairs(labels, num_iterations=3, pairs=11, seed=7)
    assert len(odd) == 11 and odd[:, 2].sum() == 6


@pytest.mark.parametrize(
    ("labels", "message"),
    [([0, 0, 1], r"too few of \{'1': 1\}"), ([1, 1, 1], "at least 2 classes")],
)
def test_pairs_need_two_classes_of_two_examples(labels, message):
    with pytest.raises(ConfigError, match=message):
        make_pairs(np.array(labels), 2, None, seed=0)


def test_examples_per_class_is_the_same_seeded_subset_for_every_method(tmp_path):
    """data.examples_per_class: N of every class, chosen from the labels and data.seed alone (not the model or the
    fine-tuning method), after the held-out splits; what few_shot_curve compares methods on."""
    tiny_reviews().to_csv(tmp_path / "reviews.csv", index=False)
    base = tiny_text_overrides(tmp_path / "reviews.csv", tmp_path) + ["data.examples_per_class=4"]

    preprocessing = instantiate(compose_cfg(base).model.backbone).preprocessing  # the tokenizer

    def splits(*extra: str) -> tuple[list[str], list[str], list[int]]:
        datamodule = instantiate(compose_cfg([*base, *extra]).data, preprocessing=preprocessing)
        datamodule.setup("fit")
        counts = np.bincount(datamodule.datasets["train"].labels).tolist()
        return datamodule.raw_inputs("train")[0], datamodule.raw_inputs("test")[0], counts

    setfit = splits("finetune=setfit")
    assert setfit[2] == [4, 4]
    assert splits("finetune=head_only", "model.head.dropout=0.5") == setfit
    other = splits("finetune=setfit", "seed=7")  # data.seed is the run's seed unless set
    assert other[0] != setfit[0] and other[1] != setfit[1] and other[2] == [4, 4]


# --- a whole run -----------------------------------------------------------------------------------------------


def test_run_folder_record_and_stage_two_trains_the_head_only(setfit_run, tmp_path):
    run = setfit_run / "run"
    metrics = read_json(run / "metrics.json")
    assert metrics["setfit/pairs"] == 2 * ITERATIONS * 16
    assert {"test/acc", "test/f1", "best/val/acc"} <= set(metrics)
    assert metrics["trainable_params"] == metrics["params/head/total"]  # stage 2: the head alone
    logged = pd.read_csv(run / "csv/metrics.csv")
    assert logged["setfit/loss_step"].notna().any()
    per_epoch = logged["setfit/loss_epoch"].dropna().tolist()  # the contrastive loss, logged and falling
    assert (
        len(per_epoch) == 2
        and per_epoch[1] < per_epoch[0]
        and metrics["setfit/loss_epoch"] == pytest.approx(per_epoch[1], abs=1e-5)
    )
    body = torch.load(run / "setfit_body.pt", map_location="cpu", weights_only=True)["state_dict"]
    best = _state(run / "checkpoints/best.ckpt", "backbone.")
    assert best.keys() == body.keys() and all(
        torch.equal(best[k], body[k]) for k in body
    )  # body fixed in stage 2
    # stage 1 changed the seeded initial body; stage 2 changed the seeded initial head
    cfg = compose_cfg(_overrides(setfit_run), tmp_path / "unused")
    pl.seed_everything(cfg.seed)
    fresh = instantiate(cfg.model.backbone)
    assert sum(not torch.equal(fresh.state_dict()[k], body[k]) for k in body) > len(body) // 2
    head = instantiate(cfg.model.head, in_features=fresh.out_features, num_classes=2)
    trained = _state(run / "checkpoints/last.ckpt", "head.")
    assert any(not torch.equal(v, trained[k]) for k, v in head.state_dict().items())


def _similarities(backbone: torch.nn.Module, datamodule) -> tuple[float, float]:
    """Mean cosine similarity of the training split's same-label and different-label pairs (eval mode)."""
    train = datamodule.datasets["train"]
    batch = datamodule.collator(cuda=False)([train[i] for i in range(len(train))])
    labels = batch.pop("labels")
    backbone.eval()
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(backbone(batch)[:, None], backbone(batch)[None], dim=-1)
    same = labels[:, None] == labels[None]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return float(cos[same & off_diagonal].mean()), float(cos[~same].mean())


def test_stage_one_pulls_same_label_embeddings_together(setfit_run):
    run = load_run(setfit_run / "run")
    datamodule = datamodule_for(run)
    assert len(datamodule.datasets["train"]) == 16  # data.examples_per_class=8, 2 classes
    tuned_same, tuned_other = _similarities(run.module.backbone, datamodule)
    pl.seed_everything(run.cfg.seed)
    initial_same, initial_other = _similarities(instantiate(run.cfg.model.backbone), datamodule)
    # a random BERT embeds every text alike (all similarities ~0.93); the tuned body separates the labels
    assert initial_same - initial_other < 0.05
    assert tuned_same - tuned_other > 0.5 and tuned_other < initial_other - 0.5


def test_eval_reproduces_the_runs_test_metrics(setfit_run):
    run = setfit_run / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"run={run}", "split=test"])
    metrics = evaluate(cfg)  # ftlab-eval
    recorded = read_json(run / "metrics.json")
    for key in ("test/acc", "test/f1", "test/loss"):
        assert metrics[key] == pytest.approx(recorded[key], abs=1e-5), key


# --- resume ----------------------------------------------------------------------------------------------------


def _same_weights(a: Path, b: Path) -> bool:
    first, second = _state(a / "checkpoints/last.ckpt", ""), _state(b / "checkpoints/last.ckpt", "")
    return first.keys() == second.keys() and all(
        torch.allclose(first[k], second[k], atol=1e-6) for k in first
    )


def test_resume_after_stage_one_reads_the_body_and_ends_like_the_whole_run(setfit_run, monkeypatch):
    crash = ["+callbacks.crash._target_=test_setfit.CrashInStageTwo"]
    with pytest.raises(Crash):
        _train(setfit_run, "stopped_in_head", *crash)
    folder = setfit_run / "stopped_in_head"
    assert (folder / "setfit_body.pt").exists() and not (folder / "metrics.json").exists()

    def never(*args, **kwargs):
        raise AssertionError("stage 1 ran again on resume")

    monkeypatch.setattr(ContrastiveModule, "training_step", never)
    metrics = train(compose_cfg(_overrides(setfit_run, f"resume={folder}"), folder))
    assert metrics["test/acc"] == pytest.approx(read_json(setfit_run / "run/metrics.json")["test/acc"])
    assert metrics["setfit/pairs"] == 2 * ITERATIONS * 16  # the record kept from stage 1
    assert _same_weights(folder, setfit_run / "run")


def test_resume_during_stage_one_runs_it_again_from_the_start(setfit_run, monkeypatch):
    original, calls = ContrastiveModule.training_step, itertools.count()

    def fails_at_step_three(self, batch, batch_idx):
        if next(calls) == 3:
            raise Crash("simulated failure in stage 1")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ContrastiveModule, "training_step", fails_at_step_three)
    with pytest.raises(Crash):
        _train(setfit_run, "stopped_in_body")
    folder = setfit_run / "stopped_in_body"
    assert not (folder / "setfit_body.pt").exists() and not (folder / "checkpoints").exists()
    train(compose_cfg(_overrides(setfit_run, f"resume={folder}"), folder))
    assert next(calls) > 3 + 20  # all 20 steps again
    assert _same_weights(folder, setfit_run / "run")


def test_resume_with_other_stage_one_settings_or_a_fresh_run_in_the_folder_is_refused(setfit_run):
    folder = setfit_run / "run"
    changed = _overrides(setfit_run, "finetune.contrastive.num_iterations=6", f"resume={folder}")
    with pytest.raises(ConfigError, match="other finetune.contrastive settings"):
        train(compose_cfg(changed, folder))
    (setfit_run / "again").mkdir()
    (setfit_run / "again/setfit_body.pt").write_bytes((folder / "setfit_body.pt").read_bytes())
    with pytest.raises(ConfigError, match="already holds a SetFit body"):
        train(compose_cfg(_overrides(setfit_run), setfit_run / "again"))


# --- errors ----------------------------------------------------------------------------------------------------


def test_image_data_other_tasks_fsdp_and_one_example_per_class_are_refused(tmp_path):
    image = ["data=digits", "model=tiny_resnet", "finetune=setfit", f"paths.cache_dir={tmp_path}/cache"]
    with pytest.raises(ConfigError, match="single-label text classification.*image data"):
        train(compose_cfg([*image, "trainer.accelerator=cpu"], tmp_path / "image"))
    with pytest.raises(ConfigError, match="at least 2 examples of every class"):
        train(compose_cfg(_overrides(tmp_path, "data.examples_per_class=1"), tmp_path / "one"))
    for folder in ("image", "one"):
        assert not (tmp_path / folder / "metrics.json").exists()
    # the same check as the image data's, before stage 1
    for task in ("regression", "multilabel", "token_classification"):
        with pytest.raises(ConfigError, match=f"data.task={task} on text data"):
            check_run(SimpleNamespace(modality="text", task=task))
    fsdp = {"_target_": "pytorch_lightning.strategies.FSDPStrategy"}
    with pytest.raises(ConfigError, match="does not run under FSDP"):
        check_run(SimpleNamespace(modality="text", task="classification"), fsdp)


def test_bad_stage_settings_and_peft_are_named():
    with pytest.raises(ConfigError, match="finetune.contrastive.num_iterations=0"):
        ContrastiveStage(num_iterations=0)
    with pytest.raises(ConfigError, match="finetune.contrastive.pairs=1"):
        ContrastiveStage(pairs=1)
    with pytest.raises(ConfigError, match="does not combine with finetune.peft"):
        FinetunePolicy(contrastive=ContrastiveStage(), peft=object())
