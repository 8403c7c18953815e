"""Zero-shot classification as a run (``zero_shot=embedding``): the head is the label descriptions' embeddings, nothing
trains, and the run folder is a run folder (metrics.json, best.ckpt that ftlab's rebuild reads)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
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


# --- zero_shot=llm: label words scored by a causal LM (a tiny random Llama with a word-level tokenizer) -----------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from test_causal_lm import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("llama"), chat_template=False)


def _llm_overrides(tiny_llama: Path, tmp_path: Path, *extra: str) -> list[str]:
    rows = [
        {"text": "great film", "label": "fresh"},
        {"text": "awful boring long film", "label": "rotten"},
    ] * 20
    csv = tmp_path / "films.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return [
        "zero_shot=llm",
        f"model.backbone.name_or_path={tiny_llama}",
        "data=text_files",
        f"data.train_file={csv}",
        "data.val_fraction=0.25",
        "data.test_fraction=0.5",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
        *extra,
    ]


def test_llm_label_scores_are_the_label_tokens_log_probabilities(tiny_llama):
    from transformers import AutoModelForCausalLM

    from ftlab.zero_shot_llm import label_log_likelihoods

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts, words = (
        [[5, 6, 7], [5, 8, 9, 10, 11, 6]],
        [[12], [13, 14]],
    )  # prompts of different lengths: padded
    with torch.no_grad():
        scores = label_log_likelihoods(model, prompts, words, pad_id=0)
        for i, prompt in enumerate(prompts):
            for c, word in enumerate(words):
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + word])).logits[0], -1)
                expected = sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(word))
                torch.testing.assert_close(scores[i, c], expected, atol=1e-4, rtol=1e-4)


def test_llm_zero_shot_run_writes_metrics_and_trains_nothing(tiny_llama, tmp_path):
    cfg = compose_cfg(_llm_overrides(tiny_llama, tmp_path), tmp_path / "run")
    assert cfg.model.backbone._target_.endswith("HFCausalLM")  # zero_shot=llm chose model=smollm2_lm
    check_config(cfg, "train")
    metrics = train(cfg)
    assert metrics == read_json(tmp_path / "run/metrics.json")
    assert {"test/acc", "test/f1", "test/loss", "best/val/acc"} <= set(metrics)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["zero_shot"] == "llm"
    assert metrics["trainable_params"] == 0 and metrics["total_params"] > 0


def test_llm_prompt_without_text_field_is_a_config_error(tiny_llama, tmp_path):
    cfg = compose_cfg(_llm_overrides(tiny_llama, tmp_path, "zero_shot.prompt=Sentiment:"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"must contain the field \{text\}"):
        train(cfg)
    assert not (tmp_path / "run/metrics.json").exists()
