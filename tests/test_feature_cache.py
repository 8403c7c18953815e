"""Feature cache: a linear probe on cached features trains exactly like the uncached one; stale keys never match."""

from __future__ import annotations

import logging

import pytest
import torch
from hydra.utils import instantiate

from ftlab.finetuning.feature_cache import CachedFeatureDataModule, cache_key, maybe_cache_features, why_not
from ftlab.models.module import ClassificationModule
from ftlab.train import train

from conftest import compose_cfg, tiny_text_overrides


def _build(cfg):
    torch.manual_seed(0)
    backbone = instantiate(cfg.model.backbone)
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    datamodule.setup("fit")
    head = instantiate(cfg.model.head, in_features=backbone.out_features, num_classes=datamodule.num_classes)
    module = ClassificationModule(
        backbone, head, instantiate(cfg.finetune), optimizer=instantiate(cfg.optimizer), num_classes=2
    )
    return module, datamodule


def _cached_and_uncached(base: list[str], tmp_path, caplog, computed: str = "Feature cache: computed"):
    """Train with the cache (asserting it was computed) and without it, from the same overrides."""
    with caplog.at_level(logging.INFO, logger="ftlab"):
        cached = train(compose_cfg(base, tmp_path / "cached"))
    assert computed in caplog.text
    uncached = train(compose_cfg([*base, "feature_cache=false"], tmp_path / "uncached"))
    return cached, uncached


def test_head_only_on_cached_features_matches_the_uncached_run(reviews_csv, tmp_path, caplog):
    base = tiny_text_overrides(reviews_csv, tmp_path) + ["finetune=head_only", "trainer.max_epochs=3"]
    cached, uncached = _cached_and_uncached(base, tmp_path, caplog)
    for key in ("test/acc", "test/loss", "test/f1", "best/val/acc"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-5), key
    assert cached["test/loss"] != pytest.approx(0.6931, abs=1e-3)  # the head did learn something
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftlab"):
        again = train(compose_cfg(base, tmp_path / "again"))
    assert "Feature cache: read" in caplog.text and again["test/loss"] == pytest.approx(cached["test/loss"])


def test_cache_key_changes_with_weights_data_and_preprocessing(reviews_csv, tmp_path):
    base = tiny_text_overrides(reviews_csv, tmp_path) + ["finetune=head_only"]
    module, datamodule = _build(compose_cfg(base))
    key = cache_key(module, datamodule)
    assert cache_key(*_build(compose_cfg(base))) == key  # same model, data and preprocessing: same entry
    with torch.no_grad():
        next(module.backbone.parameters())[0, 0] += 1e-3
    assert cache_key(module, datamodule) != key  # weights
    assert cache_key(*_build(compose_cfg([*base, "data.max_length=6"]))) != key  # preprocessing: truncation
    assert cache_key(*_build(compose_cfg([*base, "data.padding=max_length"]))) != key  # collator
    assert cache_key(*_build(compose_cfg([*base, "data.val_fraction=0.2"]))) != key  # data


def test_freeze_bottom_runs_only_the_top_layers_on_cached_hidden_states_with_the_same_metrics(
    reviews_csv, tmp_path, caplog
):
    base = tiny_text_overrides(reviews_csv, tmp_path) + [
        "finetune=freeze_bottom",
        "finetune.k=2",  # embeddings and layer.0 cached; layer.1 and the head train
        "trainer.max_epochs=2",
        "feature_cache=prefix",
    ]
    computed = "Feature cache: computed the frozen layers' outputs once (2 groups"
    cached, uncached = _cached_and_uncached(base, tmp_path, caplog, computed)
    for key in ("test/acc", "test/loss", "best/val/acc"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-4), key


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["finetune=full"], "freezes no backbone group"),
        (["finetune=head_only", "+finetune.frozen_dropout=true"], "frozen_dropout"),
        (["finetune=freeze_bottom", "finetune.k=2", "finetune.train_bn=true"], "train_bn"),
    ],
)
def test_falls_back_with_a_reason_when_the_frozen_layers_are_not_deterministic(
    reviews_csv, tmp_path, overrides, reason
):
    cfg = compose_cfg(tiny_text_overrides(reviews_csv, tmp_path) + overrides)
    module, datamodule = _build(cfg)
    assert reason in why_not(module, datamodule, 2)
    assert maybe_cache_features(module, datamodule, 2, str(tmp_path)) is datamodule


def test_falls_back_when_a_frozen_group_holds_trainable_parameters(reviews_csv, tmp_path):
    cfg = compose_cfg(tiny_text_overrides(reviews_csv, tmp_path) + ["finetune=head_only"])
    module, datamodule = _build(cfg)
    assert isinstance(maybe_cache_features(module, datamodule, 2, None), CachedFeatureDataModule)
    next(module.backbone.parameters()).requires_grad_(
        True
    )  # as a PEFT adapter inside a frozen layer would be
    assert "trainable parameters" in why_not(module, datamodule, 2)


IMAGE = [
    "data=digits",
    "model=tiny_resnet",
    "model.backbone.input_size=16",
    "data.max_train_examples=300",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "callbacks.progress_bar.kind=log",
]


def test_image_head_only_on_cached_features_matches_the_uncached_run(tmp_path, caplog):
    base = [*IMAGE, f"paths.cache_dir={tmp_path}/cache", "finetune=head_only", "trainer.max_epochs=3"]
    base.append("optimizer.lr=1e-3")  # the head at 0.1 (x100): random tiny-ResNet features learn in 3 epochs
    cached, uncached = _cached_and_uncached(base, tmp_path, caplog)
    for key in ("test/acc", "test/loss", "best/val/acc"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-4), key
    assert cached["test/acc"] > 0.2  # 10 classes: the head learned something


def test_image_cache_key_follows_pixels_and_transform_and_augmentation_turns_it_off(tmp_path):
    base = [*IMAGE, f"paths.cache_dir={tmp_path}/cache", "finetune=head_only"]
    module, datamodule = _build(compose_cfg(base))
    assert why_not(module, datamodule, 2) is None
    key = cache_key(module, datamodule)
    assert cache_key(*_build(compose_cfg(base))) == key
    assert cache_key(*_build(compose_cfg([*base, "model.backbone.input_size=24"]))) != key  # transform
    assert cache_key(*_build(compose_cfg([*base, "data.max_train_examples=200"]))) != key  # data
    datamodule.datasets["test"].images[0, 0, 0] += 1  # one pixel
    assert cache_key(module, datamodule) != key
    module, datamodule = _build(compose_cfg([*base, "data.augment=basic"]))
    assert "data.augment=basic" in why_not(module, datamodule, 2)
    assert maybe_cache_features(module, datamodule, 2, str(tmp_path)) is datamodule


def test_multilabel_on_cached_hidden_states_matches_the_uncached_run(tmp_path, caplog):
    """A multi-hot (C,) label row is one example's, not per token: the prefix cache keeps it whole."""
    from test_multilabel import tiny_genres

    tiny_genres(80).to_csv(tmp_path / "genres.csv", index=False)
    base = [
        "model=tiny_bert",
        "data=text_files",
        f"data.train_file={tmp_path / 'genres.csv'}",
        "data.label_column=genres",
        "data.task=multilabel",
        "data.max_length=16",
        "data.batch_size=8",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_epochs=2",
        "callbacks.progress_bar.kind=log",
        "optimizer.lr=3e-3",
        "monitor=val/f1_micro",
        "finetune=freeze_bottom",
        "finetune.k=2",
        "feature_cache=prefix",
    ]
    computed = "Feature cache: computed the frozen layers' outputs once (2 groups"
    cached, uncached = _cached_and_uncached(base, tmp_path, caplog, computed)
    for key in ("test/f1_micro", "test/loss", "best/val/f1_micro"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-4), key
