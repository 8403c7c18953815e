"""Class imbalance: class weights (balanced / a list), focal loss, the balanced sampler and class_fraction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sklearn.utils.class_weight import compute_class_weight
from torch.nn import functional as F

from ftlab.data import ImageClassificationDataModule, TextClassificationDataModule, TextPreprocessing
from ftlab.data.image import ImagePreprocessing
from ftlab.data.imbalance import BalancedClassSampler, cut_classes
from ftlab.evaluate import evaluate
from ftlab.runs import rebuild
from ftlab.tasks import ClassificationTask, build_task
from ftlab.train import train
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError

from conftest import CONF_DIR, compose_cfg, tiny_reviews, tiny_text_overrides

PRE = TextPreprocessing(tokenizer=assets.resolve("embedded:all-MiniLM-L6-v2"), max_length=512)
LOGITS = torch.tensor(
    [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0], [1.5, 1.0, -2.0]]
)
LABELS = torch.tensor([0, 2, 1, 2, 1])


def entry_cfg(name: str, overrides: list[str]):
    """The composed config of ``ftlab-<name>`` (eval, predict)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_weighted_loss_equals_hand_computed_weighted_cross_entropy():
    weights = [1.0, 3.0, 0.5]
    task = ClassificationTask(3, ["a", "b", "c"], class_weights=weights)
    nll = -LOGITS.log_softmax(-1)[torch.arange(5), LABELS]  # per example
    w = torch.tensor(weights)[LABELS]
    expected = (w * nll).sum() / w.sum()
    assert float(task.loss(LOGITS, LABELS)) == pytest.approx(float(expected), rel=1e-6)
    plain = ClassificationTask(3, ["a", "b", "c"]).loss(LOGITS, LABELS)
    assert float(plain) == pytest.approx(float(nll.mean()), rel=1e-6)
    assert abs(float(plain) - float(expected)) > 1e-3  # the weights change the loss


def test_balanced_weights_equal_sklearn():
    y = np.array([0] * 50 + [1] * 7 + [2] * 13)
    counts = np.bincount(y).tolist()
    task = build_task("classification", 3, ["a", "b", "c"], {"class_weights": "balanced"}, counts)
    sk = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(task.class_weights.numpy(), sk, rtol=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_examples():
    for weights in (None, [1.0, 3.0, 0.5]):
        ce = ClassificationTask(3, class_weights=weights).loss(LOGITS, LABELS)
        focal0 = ClassificationTask(3, class_weights=weights, loss="focal", focal_gamma=0.0).loss(
            LOGITS, LABELS
        )
        assert float(focal0) == pytest.approx(float(ce), rel=1e-6)
    focal2 = ClassificationTask(3, loss="focal", focal_gamma=2.0)
    p_t = LOGITS.softmax(-1)[torch.arange(5), LABELS]
    expected = ((1 - p_t) ** 2 * -p_t.log()).mean()
    assert float(focal2.loss(LOGITS, LABELS)) == pytest.approx(float(expected), rel=1e-6)
    assert float(focal2.loss(LOGITS, LABELS)) < float(F.cross_entropy(LOGITS, LABELS))


def test_bad_class_weights_and_loss_are_config_errors():
    with pytest.raises(ConfigError, match="2 positive numbers"):
        ClassificationTask(2, ["a", "b"], class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="module.class_weights='inverse'"):
        ClassificationTask(2, ["a", "b"], class_weights="inverse")
    with pytest.raises(ConfigError, match="module.loss='hinge'"):
        ClassificationTask(2, loss="hinge")


def _imbalanced_csv(tmp_path):
    frame = tiny_reviews(30)
    frame = pd.concat([frame[frame.stars == "pos"], frame[frame.stars == "neg"].iloc[:10]])
    path = tmp_path / "imbalanced.csv"
    frame.to_csv(path, index=False)
    return path  # 30 pos, 10 neg


def test_balanced_weights_are_saved_and_used_by_a_rebuilt_run(tmp_path):
    csv = _imbalanced_csv(tmp_path)
    overrides = tiny_text_overrides(csv, tmp_path) + [
        "module.class_weights=balanced",
        "trainer.max_epochs=1",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    recorded = train(cfg)
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")
    run = rebuild.load_run(tmp_path / "run")
    # 20 training examples: 15 pos, 5 neg -> n / (2 * count)
    expected = torch.tensor([20 / (2 * 5), 20 / (2 * 15)])
    torch.testing.assert_close(run.module.task.class_weights, expected)
    metrics = evaluate(entry_cfg("eval", [f"run={tmp_path / 'run'}", "split=test"]))
    assert metrics["test/loss"] == pytest.approx(recorded["test/loss"], abs=1e-5)
    # ftlab-eval's loss is the weighted one: unweighted cross-entropy on the same outputs differs
    dm = rebuild.datamodule_for(run)
    outputs = list(rebuild.batches(run.module, dm.test_dataloader(), torch.device("cpu")))
    logits = torch.cat([o for _, o in outputs])
    labels = torch.cat([b["labels"] for b, _ in outputs])
    assert metrics["test/loss"] == pytest.approx(float(run.module.task.loss(logits, labels)), abs=1e-5)
    assert abs(metrics["test/loss"] - float(F.cross_entropy(logits, labels))) > 1e-3


def test_balanced_sampler_draws_classes_equally_deterministically_per_epoch():
    labels = np.array([0] * 900 + [1] * 100)
    sampler = BalancedClassSampler(labels, seed=7)
    first = list(sampler)
    assert len(first) == 1000 and first == list(BalancedClassSampler(labels, seed=7))
    share = np.bincount(labels[first], minlength=2) / len(first)
    assert abs(share[1] - 0.5) < 0.06  # the 10% class is drawn about half the time
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    # resume: a sampler built at epoch 1 (as a resumed run builds it) draws what set_epoch(1) did
    assert list(BalancedClassSampler(labels, seed=7, epoch=1)) == second
    assert list(BalancedClassSampler(labels, seed=8)) != first


def test_balanced_sampler_splits_one_global_draw_across_ranks():
    labels = np.array([0] * 20 + [1] * 3 + [2] * 8)  # 31 examples: padded to 32 draws for 2 ranks
    ranks = [list(BalancedClassSampler(labels, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 16
    global_draws = BalancedClassSampler(labels, seed=1, num_replicas=2).draws().tolist()
    assert [i for pair in zip(*ranks, strict=True) for i in pair] == global_draws


def test_text_module_uses_the_balanced_sampler_and_cuts_classes(tmp_path):
    csv = tmp_path / "r.csv"
    tiny_reviews(40).to_csv(csv, index=False)
    kwargs = dict(
        source="files", train_file=str(csv), text_column="review", label_column="stars", max_length=16
    )
    dm = TextClassificationDataModule(PRE, class_fraction={"neg": 0.25}, sampler="balanced", **kwargs)
    dm.setup()
    total = {s: np.bincount(d.labels, minlength=2) for s, d in dm.datasets.items()}
    assert sum(total.values()).tolist() == [10, 40]  # neg cut from 40 to 10, before val/test are held out
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedClassSampler)
    drawn = np.concatenate([b["labels"].numpy() for b in loader])
    assert len(drawn) == len(dm.datasets["train"])
    default = TextClassificationDataModule(PRE, **kwargs)
    assert not isinstance(default.train_dataloader().sampler, BalancedClassSampler)
    with pytest.raises(ConfigError, match="data.sampler='oversample'"):
        TextClassificationDataModule(PRE, sampler="oversample", **kwargs)
    with pytest.raises(ConfigError, match="needs data.task=classification"):
        TextClassificationDataModule(PRE, sampler="balanced", task="regression", **kwargs)
    with pytest.raises(ConfigError, match="data.class_fraction.neg=0"):
        TextClassificationDataModule(PRE, class_fraction={"neg": 0}, **kwargs)
    with pytest.raises(DataError, match=r"\['meh'\]"):
        TextClassificationDataModule(PRE, class_fraction={"meh": 0.5}, **kwargs).setup()


def test_cut_classes_is_seeded_and_keeps_the_others():
    labels = np.array(["a"] * 50 + ["b"] * 50)
    kept = cut_classes(labels, {"b": 0.1}, seed=3)
    assert (labels[kept] == "a").sum() == 50 and (labels[kept] == "b").sum() == 5
    assert kept.tolist() == cut_classes(labels, {"b": 0.1}, seed=3).tolist()
    assert kept.tolist() != cut_classes(labels, {"b": 0.1}, seed=4).tolist()


def test_image_module_uses_the_balanced_sampler():
    pre = ImagePreprocessing(input_size=8, channels=1, mean=(0.5,), std=(0.5,))
    dm = ImageClassificationDataModule(pre, source="digits", sampler="balanced", class_fraction={"3": 0.1})
    dm.setup()
    counts = dm.class_counts()
    assert counts[3] < counts[4] / 5
    sampler = dm.train_sampler(dm.datasets["train"])
    drawn = np.bincount(dm.datasets["train"].labels[list(sampler)], minlength=10)
    assert drawn[3] > counts[3] * 3  # the cut class is drawn several times over
