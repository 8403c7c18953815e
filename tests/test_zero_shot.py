"""Zero-shot classification as a run (``zero_shot=embedding``): the head is the label descriptions' embeddings, nothing
trains, and the run folder is a run folder (metrics.json, best.ckpt that ftlab's rebuild reads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ftlab.checks import check_config
from ftlab.runs.rebuild import batches, datamodule_for, load_run
from ftlab.train import train
from ftlab.utils.errors import ConfigError

from conftest import compose_cfg, read_json, tiny_reviews, tiny_text_overrides

TEMPLATES = '["a {label} review","this film is {label}"]'


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    csv = tmp_path / "reviews.csv"
    tiny_reviews().to_csv(csv, index=False)
    # half the table as test: a zero-shot run needs no training data, and 40 test texts make accuracy meaningful
    return tiny_text_overrides(csv, tmp_path) + [
        "zero_shot=embedding",
        "data.val_fraction=0.25",
        "data.test_fraction=0.5",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("zero_shot")
    cfg = compose_cfg(_overrides(tmp, f"zero_shot.templates={TEMPLATES}"), tmp / "run")
    check_config(cfg, "train")  # what ftlab-train checks before running: the zero_shot node fits its target
    train(cfg)
    (tmp / "run/.hydra").mkdir()
    OmegaConf.save(cfg, tmp / "run/.hydra/config.yaml")  # what a Hydra run writes; train() alone does not
    return tmp / "run"


def _embed(module, datamodule, texts: list[str]) -> torch.Tensor:
    """Normalised mean-pooled embeddings of ``texts``, one row each, in eval mode."""
    module.eval()
    batch = datamodule.collator(cuda=False)(datamodule.encode(texts))
    with torch.no_grad():
        features = module.backbone({k: v for k, v in batch.items() if torch.is_tensor(v)})
    return torch.nn.functional.normalize(features, dim=-1)


def test_head_rows_are_the_normalised_mean_of_the_template_embeddings(tiny_run):
    run = load_run(tiny_run)  # ftlab-eval / ftlab-predict's rebuild of the folder
    datamodule = datamodule_for(run, setup=False)
    rows = run.module.head.weight.detach()
    assert run.label_names == ["neg", "pos"]
    for row, label in zip(rows, run.label_names, strict=True):
        per_template = _embed(run.module, datamodule, [f"a {label} review", f"this film is {label}"])
        expected = torch.nn.functional.normalize(per_template.mean(0), dim=0)
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-4)
        # averaged: the row is neither template's embedding alone
        assert all((row - single).abs().max() > 1e-3 for single in per_template)
    assert not torch.allclose(rows[0], rows[1])


def test_nothing_trains_and_the_run_folder_is_complete(tiny_run, tmp_path):
    metrics = read_json(tiny_run / "metrics.json")
    assert {"test/acc", "test/f1", "test/loss", "best/val/acc"} <= set(metrics)
    assert metrics["zero_shot"] == "embedding" and metrics["zero_shot/templates"] == 2
    assert metrics["trainable_params"] == 0 and metrics["total_params"] > 0
    checkpoint = torch.load(tiny_run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 0  # no optimizer step
    # the backbone's weights are the ones the seeded config builds (tiny_bert: random, seeded), unchanged
    cfg = compose_cfg(_overrides(tmp_path), tmp_path / "unused")
    pl.seed_everything(cfg.seed)
    fresh = instantiate(cfg.model.backbone).state_dict()
    saved = {
        k.removeprefix("backbone."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("backbone.")
    }
    assert saved.keys() == fresh.keys()
    assert all(torch.equal(saved[k], fresh[k]) for k in fresh)
    logged = (tiny_run / "csv/metrics.csv").read_text()
    assert "train/loss" not in logged and "test/acc" in logged


def test_the_rebuilt_run_reproduces_its_test_accuracy(tiny_run):
    run = load_run(tiny_run)
    datamodule = datamodule_for(run)
    correct = total = 0
    for batch, logits in batches(run.module, datamodule.test_dataloader(), torch.device("cpu")):
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    assert total == 40
    assert correct / total == pytest.approx(read_json(tiny_run / "metrics.json")["test/acc"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('zero_shot.templates=["a review"]', "must contain the field {label}"),
        ('zero_shot.templates=["a {label} {kind} review"]', "no other field"),
        ("zero_shot.templates=[]", "non-empty list"),
        ("zero_shot.label_words={good:positive}", "not labels of the data"),
    ],
)
def test_bad_templates_or_label_words_are_a_clear_config_error(tmp_path, override, message):
    cfg = compose_cfg(_overrides(tmp_path, override), tmp_path / "run")
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        train(cfg)
    assert not (tmp_path / "run/metrics.json").exists()


def test_minilm_zero_shot_beats_chance_on_clear_reviews(tmp_path):
    """The real embedded all-MiniLM-L6-v2, its label descriptions only: well above chance (0.5) on clear texts."""
    overrides = _overrides(tmp_path, "model=minilm", "zero_shot.label_words={pos:positive,neg:negative}")
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["test/acc"] >= 0.75
