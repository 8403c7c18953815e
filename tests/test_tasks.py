"""The Task interface and the design around it: task choice and options, the task-generic module, the typed
backbone contract, and prediction encoding raw inputs exactly as training does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ftlab.data import ImageClassificationDataModule, TextClassificationDataModule, TextPreprocessing
from ftlab.data.image import ImagePreprocessing
from ftlab.finetuning import FinetunePolicy
from ftlab.models import ClassificationHead, FinetuneModule
from ftlab.models.backbones import HFTextBackbone, TorchvisionResNet
from ftlab.models.backbones.contract import Backbone, SplittableBackbone, TokenBackbone, can_split
from ftlab.tasks import ClassificationTask, RegressionTask, Task, build_task
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError

from conftest import tiny_reviews

TOKENIZER = assets.resolve("embedded:all-MiniLM-L6-v2")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_text_backbone() -> HFTextBackbone:
    return HFTextBackbone("embedded:all-MiniLM-L6-v2", pretrained=False, config_overrides=TINY)


def test_unknown_task_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"data.task='ner'.*classification.*regression"):
        build_task("ner", 3)


def test_a_module_option_the_task_lacks_is_an_error_not_ignored():
    with pytest.raises(
        ConfigError, match=r"module.class_weights='balanced' does not apply to data.task=regression"
    ):
        build_task("regression", 1, None, {"class_weights": "balanced"})
    with pytest.raises(ConfigError, match="module.label_smoothing=0.1 does not apply"):
        build_task("regression", 1, None, {"label_smoothing": 0.1})
    # unset options (null, label smoothing 0) are the task's defaults, whatever the task
    assert isinstance(
        build_task("regression", 1, None, {"label_smoothing": 0.0, "loss": None}), RegressionTask
    )


def test_class_weights_list_must_match_the_labels():
    with pytest.raises(ConfigError, match=r"must hold 3 positive numbers.*\['a', 'b', 'c'\]"):
        build_task("classification", 3, ["a", "b", "c"], {"class_weights": [1.0, 2.0]})
    task = build_task("classification", 3, ["a", "b", "c"], {"class_weights": [1.0, 2.0, 4.0]})
    assert torch.equal(task.class_weights, torch.tensor([1.0, 2.0, 4.0]))


class TokenLevelStub(ClassificationTask):
    """A token-level task for the backbone check (the real one lives in ftlab.tasks.token)."""

    name = "token_stub"
    level = "token"


def test_a_task_the_backbone_cannot_serve_is_refused_at_construction():
    backbone = TorchvisionResNet("tiny_resnet", input_size=32)
    head = ClassificationHead(backbone.out_features, 3)
    with pytest.raises(ConfigError, match="needs one output per token.*TorchvisionResNet.*model=minilm"):
        FinetuneModule(backbone, head, FinetunePolicy(), TokenLevelStub(3), optimizer=torch.optim.SGD)


def test_the_module_asks_the_task_for_loss_metrics_and_logit_shape():
    backbone = tiny_text_backbone()
    batch = {
        "input_ids": torch.tensor([[101, 2307, 102, 0], [101, 6659, 2143, 102]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
    }
    regression = FinetuneModule(
        backbone, ClassificationHead(32, 1), FinetunePolicy(), RegressionTask(), optimizer=torch.optim.SGD
    )
    out = regression(batch)
    assert out.shape == (2,)  # RegressionTask.shape_logits drops the output axis
    assert set(regression.metrics["val_metrics"].keys()) == {"mse", "mae", "r2"}
    assert regression.hparams["task"] == "regression" and regression.hparams["num_classes"] == 1

    classifier = FinetuneModule(
        tiny_text_backbone(),
        ClassificationHead(32, 3),
        FinetunePolicy(),
        ClassificationTask(3, ["a", "b", "c"], class_weights=[1.0, 1.0, 5.0]),
        optimizer=torch.optim.SGD,
    )
    labels = torch.tensor([2, 0])
    logits = classifier(batch)
    assert logits.shape == (2, 3)
    expected = nn.functional.cross_entropy(logits, labels, weight=torch.tensor([1.0, 1.0, 5.0]))
    assert torch.allclose(classifier.task.loss(logits, labels), expected)
    # the weights are a buffer of the module: saved in every checkpoint
    assert torch.equal(classifier.state_dict()["task.class_weights"], torch.tensor([1.0, 1.0, 5.0]))


def test_backbones_satisfy_the_typed_contract_and_declare_their_abilities():
    text = tiny_text_backbone()
    image = TorchvisionResNet("tiny_resnet", input_size=32)
    assert isinstance(text, Backbone) and isinstance(image, Backbone)
    assert isinstance(text, TokenBackbone) and not isinstance(image, TokenBackbone)
    assert isinstance(text, SplittableBackbone) and can_split(text)
    assert not can_split(image)


def test_balanced_weights_follow_the_training_counts(reviews_csv: Path, tmp_path: Path):
    frame = tiny_reviews(40)
    frame = frame[(frame.stars == "pos") | (frame.index % 4 == 1)]  # 40 pos, 10 neg
    path = tmp_path / "imbalanced.csv"
    frame.to_csv(path, index=False)
    dm = TextClassificationDataModule(
        TextPreprocessing(TOKENIZER, 512),
        source="files",
        train_file=str(path),
        text_column="review",
        label_column="stars",
        max_length=16,
        cache_dir=None,
    )
    counts = dm.class_counts()
    assert counts is not None and sum(counts) == len(dm.datasets["train"])
    task = build_task("classification", 2, dm.label_names, {"class_weights": "balanced"}, counts)
    n = sum(counts)
    assert task.class_weights.tolist() == pytest.approx([n / (2 * c) for c in counts])


def test_prediction_encodes_raw_text_exactly_as_training(reviews_csv: Path, tmp_path: Path):
    table = tiny_reviews(6)
    table.loc[0, "review"] = "a much longer review that the eight token limit truncates for sure"
    test_csv = tmp_path / "test.csv"
    table.to_csv(test_csv, index=False)
    dm = TextClassificationDataModule(
        TextPreprocessing(TOKENIZER, 512),
        source="files",
        train_file=str(reviews_csv),
        test_file=str(test_csv),
        text_column="review",
        label_column="stars",
        max_length=8,  # the first review is truncated: truncation must match too
        cache_dir=str(tmp_path / "cache"),
    )
    trained = next(iter(dm.test_dataloader()))  # the test split is the file, in order
    raw = table["review"].tolist()[: len(trained["labels"])]
    fresh = TextClassificationDataModule(  # what predict builds: no setup, no training data read
        TextPreprocessing(TOKENIZER, 512), source="files", train_file="/nonexistent.csv", max_length=8
    )
    encoded = fresh.collator(cuda=False)(fresh.encode(raw))
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(encoded[key], trained[key]), key
    assert trained["attention_mask"][0].sum() == 8 and "labels" not in encoded


def test_prediction_encodes_raw_images_exactly_as_evaluation(tmp_path: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, size=(20, 26, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    pre = ImagePreprocessing(16, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    dm = ImageClassificationDataModule(
        pre, source="image_folder", root=str(tmp_path / "imgs"), augment="basic"
    )
    dm.setup("fit")
    dataset = dm.datasets["test"]
    paths = [str(p) for p in dataset.images]
    evaluated = next(iter(dm.test_dataloader()))
    fresh = ImageClassificationDataModule(pre, source="image_folder", root="/nowhere", augment="basic")
    encoded = fresh.collator(cuda=False)(fresh.encode(paths))
    assert torch.equal(encoded["pixel_values"], evaluated["pixel_values"][: len(paths)])


def test_task_is_a_module_so_its_state_travels_with_the_checkpoint():
    task = ClassificationTask(2, ["neg", "pos"], class_weights="balanced", class_counts=[30, 10])
    assert isinstance(task, Task) and isinstance(task, nn.Module)
    rebuilt = ClassificationTask(2, ["neg", "pos"], class_weights="balanced")  # no counts: ones until loaded
    assert torch.equal(rebuilt.class_weights, torch.ones(2))
    rebuilt.load_state_dict(task.state_dict())
    assert rebuilt.class_weights.tolist() == pytest.approx([40 / 60, 40 / 20])
