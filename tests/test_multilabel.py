"""Multi-label: label sets from tables, multi-hot encoding, the task (loss, thresholds, metrics, decoding), and a run
through train, eval and predict; a slow end-to-end run on MNIST pairs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sklearn.metrics import average_precision_score, f1_score

from ftlab.data import ImageClassificationDataModule, TextClassificationDataModule, TextPreprocessing
from ftlab.data.image import ImagePreprocessing
from ftlab.data.image_sources import load_embedded
from ftlab.data.labels import LabelMap
from ftlab.data.multilabel import load_mnist_pairs, parse_label_sets
from ftlab.evaluate import evaluate
from ftlab.predict import predict
from ftlab.runs import folder, rebuild
from ftlab.tasks import MultiLabelTask, build_task
from ftlab.tasks.multilabel import GRID, tune_thresholds
from ftlab.train import train
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError

from conftest import CONF_DIR, compose_cfg, read_json

PRE = TextPreprocessing(tokenizer=assets.resolve("embedded:all-MiniLM-L6-v2"), max_length=512)
WORDS = {"action": "explosions", "comedy": "jokes", "drama": "tears"}


def entry_cfg(name: str, overrides: list[str]):
    """The composed config of ``ftlab-<name>`` (eval, predict)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tiny_genres(n: int = 90, seed: int = 0) -> pd.DataFrame:
    """Texts whose genres are the keywords they contain (each of the 7 non-empty sets), with filler words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        genres = [g for g, bit in zip(WORDS, ((i % 7) + 1) >> np.arange(3) & 1, strict=True) if bit]
        words = [WORDS[g] for g in genres] + list(rng.choice(["the", "a", "film", "long", "night"], 2))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" #{i}", "genres": "|".join(genres)})
    return pd.DataFrame(rows)


def test_label_sets_from_separators_json_and_lists():
    values = ["b|a", '["x", "y"]', ["q"], "", "solo", " c | d "]
    assert parse_label_sets(values, "|", "k") == [["a", "b"], ["x", "y"], ["q"], [], ["solo"], ["c", "d"]]
    assert parse_label_sets(["a;b"], ";", "k") == [["a", "b"]]
    with pytest.raises(DataError, match=r"data.label_column='g': the label list '\[oops' is not valid JSON"):
        parse_label_sets(["[oops"], "|", "data.label_column='g'")


def test_label_map_multi_hot_and_unseen_labels():
    labels = LabelMap.from_train([["b"], ["a", "c"], []], "multilabel")
    assert labels.names == ["a", "b", "c"]
    hot = labels.encode([["c", "a"], [], ["b"]], "test", "k")
    assert hot.dtype == np.float32 and hot.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    with pytest.raises(DataError, match=r"label\(s\) \['z'\]"):
        labels.encode([["a", "z"]], "test", "k")


def test_text_module_reads_separated_json_and_column_labels(tmp_path):
    frame = tiny_genres(30)
    frame.to_csv(tmp_path / "sep.csv", index=False)
    json_frame = frame.assign(genres=[json.dumps(g.split("|")) for g in frame.genres])
    json_frame.to_json(tmp_path / "lists.jsonl", orient="records", lines=True)
    columns = frame.assign(**{g: frame.genres.str.contains(g).astype(int) for g in WORDS}).drop(
        columns="genres"
    )
    columns.to_csv(tmp_path / "cols.csv", index=False)
    common = dict(source="files", task="multilabel", max_length=16, seed=3)
    modules = [
        TextClassificationDataModule(
            PRE, train_file=str(tmp_path / "sep.csv"), label_column="genres", **common
        ),
        TextClassificationDataModule(
            PRE, train_file=str(tmp_path / "lists.jsonl"), label_column="genres", **common
        ),
        TextClassificationDataModule(
            PRE, train_file=str(tmp_path / "cols.csv"), label_columns=list(WORDS), **common
        ),
    ]
    hots = []
    for dm in modules:
        dm.setup()
        assert dm.label_names == ["action", "comedy", "drama"]
        hots.append(np.concatenate([dm.datasets[s].labels for s in ("train", "validation", "test")]))
    assert hots[0].shape == (30, 3) and all(np.array_equal(hots[0], h) for h in hots[1:])
    batch = next(iter(modules[0].train_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape[1] == 3
    assert modules[0].class_counts() == modules[0].datasets["train"].labels.sum(0).astype(int).tolist()


def test_multilabel_option_errors(tmp_path):
    tiny_genres(20).assign(action=2).to_csv(tmp_path / "bad.csv", index=False)
    kwargs = dict(source="files", train_file=str(tmp_path / "bad.csv"), max_length=16)
    with pytest.raises(ConfigError, match="set data.task=multilabel"):
        TextClassificationDataModule(PRE, label_columns=["action", "comedy"], **kwargs)
    with pytest.raises(ConfigError, match="data.examples_per_class"):
        TextClassificationDataModule(PRE, task="multilabel", examples_per_class=3, **kwargs)
    with pytest.raises(DataError, match=r"column 'action' holds \['2'\]"):
        TextClassificationDataModule(
            PRE, task="multilabel", label_columns=["action", "text"], **kwargs
        ).setup()
    with pytest.raises(ConfigError, match="data.source='mnist5k' is not supported for data.task=multilabel"):
        ImageClassificationDataModule(IMAGE_PRE, source="mnist5k", task="multilabel")
    with pytest.raises(ConfigError, match="module.threshold=1.5"):
        MultiLabelTask(3, threshold=1.5)
    with pytest.raises(ConfigError, match="module.loss='focal' does not apply to data.task=multilabel"):
        build_task("multilabel", 3, None, {"loss": "focal"})


LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0], [-1.0, 3.0, 0.0], [0.0, -2.0, 4.0]])
TARGET = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def test_loss_is_weighted_bce_with_logits():
    p = torch.sigmoid(LOGITS)
    terms = -(TARGET * p.log() + (1 - TARGET) * (1 - p).log())
    assert float(MultiLabelTask(3).loss(LOGITS, TARGET)) == pytest.approx(float(terms.mean()), rel=1e-5)
    w, pw = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 1.0])
    weighted = -(pw * TARGET * p.log() + (1 - TARGET) * (1 - p).log()) * w
    task = MultiLabelTask(3, class_weights=w.tolist(), pos_weight=pw.tolist())
    assert float(task.loss(LOGITS, TARGET)) == pytest.approx(float(weighted.mean()), rel=1e-5)
    balanced = build_task("multilabel", 3, None, {"class_weights": "balanced"}, class_counts=[10, 30, 20])
    torch.testing.assert_close(balanced.class_weights, torch.tensor([2.0, 2 / 3, 1.0]))


def test_metrics_match_sklearn_at_the_thresholds():
    task = MultiLabelTask(3)
    task.thresholds.copy_(torch.tensor([0.5, 0.7, 0.9]))
    metrics = task.metrics()
    task.update_metrics(metrics, LOGITS[:2], TARGET[:2])
    task.update_metrics(metrics, LOGITS[2:], TARGET[2:])
    values = {k: float(v) for k, v in metrics.compute().items()}
    probs = torch.sigmoid(LOGITS).numpy()
    predicted = (probs >= np.array([0.5, 0.7, 0.9])).astype(int)
    assert values["f1"] == pytest.approx(
        f1_score(TARGET.numpy(), predicted, average="macro", zero_division=0)
    )
    assert values["f1_micro"] == pytest.approx(f1_score(TARGET.numpy(), predicted, average="micro"))
    assert values["acc"] == pytest.approx((predicted == TARGET.numpy()).all(1).mean())
    assert values["map"] == pytest.approx(average_precision_score(TARGET.numpy(), probs, average="macro"))
    assert task.hard(LOGITS).tolist() == predicted.tolist()


def test_thresholds_are_tuned_per_label_for_f1():
    probs = torch.tensor([[0.30, 0.9, 0.2], [0.35, 0.8, 0.1], [0.10, 0.6, 0.3], [0.05, 0.4, 0.1]])
    labels = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    tuned = tune_thresholds(probs, labels)
    # label 0: positives at 0.30/0.35, negatives at <= 0.10 -> the best range is (0.10, 0.30], nearest 0.5 = 0.30
    assert tuned[0].item() == pytest.approx(0.30)
    assert tuned[1].item() == pytest.approx(0.65)  # above the 0.6 negative, below 0.8; nearest 0.5
    assert tuned[2].item() == 0.5  # no positive: kept
    assert set(np.round(tuned.numpy(), 4)) <= set(np.round(GRID.numpy(), 4)) | {0.5}


def test_tuning_happens_on_the_validation_metrics_only_and_scores_with_the_tuned_thresholds():
    probs = torch.tensor([[0.30, 0.9], [0.35, 0.8], [0.10, 0.6], [0.05, 0.4]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    logits = torch.logit(probs)
    task = MultiLabelTask(2, ["a", "b"], threshold="tune")
    val, test = task.metrics(), task.metrics()
    for metrics in (val, test):
        task.update_metrics(metrics, logits, labels)
    assert float(test.compute()["f1"]) < 1.0  # at 0.5: label a's positives (0.30, 0.35) are missed
    task.on_validation_epoch_end(val)
    assert float(val.compute()["f1"]) == pytest.approx(1.0)  # scored at the thresholds just tuned
    torch.testing.assert_close(task.thresholds, torch.tensor([0.30, 0.65]))
    test.reset()
    task.update_metrics(test, logits, labels)
    task.thresholds.fill_(0.2)
    test.compute()  # not the validation collection: never tunes
    torch.testing.assert_close(task.thresholds, torch.full((2,), 0.2))
    fixed = MultiLabelTask(2, threshold=0.4)
    metrics = fixed.metrics()
    fixed.update_metrics(metrics, logits, labels)
    fixed.on_validation_epoch_end(metrics)
    metrics.compute()
    torch.testing.assert_close(fixed.thresholds, torch.full((2,), 0.4))


def test_the_module_tunes_at_validation_epoch_end(tuned_run):
    module = rebuild.load_run(tuned_run[0]).module
    module.task.thresholds.fill_(0.5)
    probs = torch.tensor([[0.30, 0.9, 0.7], [0.35, 0.8, 0.2], [0.10, 0.6, 0.1], [0.05, 0.4, 0.2]])
    labels = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    module.task.update_metrics(module.metrics["val_metrics"], torch.logit(probs), labels)
    with warnings.catch_warnings():  # self.log outside a Trainer: Lightning warns (once a process) and skips
        warnings.simplefilter("ignore", UserWarning)
        module.on_validation_epoch_end()
    torch.testing.assert_close(module.task.thresholds, tune_thresholds(probs, labels))
    assert module.task.thresholds[0].item() == pytest.approx(0.30)


def test_decode_gives_label_sets_with_probabilities():
    task = MultiLabelTask(3, ["a", "b", "c"])
    rows = task.decode(LOGITS[:2], [{"input": "x"}, {"input": "y"}])
    assert rows[0]["labels"] == ["a", "c"] and rows[1]["labels"] == ["a", "b"]
    assert rows[0]["probabilities"]["b"] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())
    assert task.same_predictions(LOGITS, LOGITS + 0.01)
    assert not task.same_predictions(LOGITS, LOGITS - torch.tensor([0.0, 0.0, 0.6]))


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multilabel")
    tiny_genres(120).to_csv(tmp / "genres.csv", index=False)
    overrides = [
        "model=tiny_bert",
        "data=text_files",
        f"data.train_file={tmp / 'genres.csv'}",
        "data.label_column=genres",
        "data.task=multilabel",
        "data.max_length=16",
        "data.batch_size=8",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        f"paths.cache_dir={tmp}/cache",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_epochs=4",
        "callbacks.progress_bar.kind=log",
        "optimizer.lr=3e-3",
        "module.threshold=tune",
        "monitor=val/f1_micro",
    ]
    cfg = compose_cfg(overrides, tmp / "run")
    metrics = train(cfg)
    (tmp / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp / "run" / ".hydra" / "config.yaml")
    return tmp / "run", metrics


def test_the_best_checkpoint_carries_thresholds_tuned_on_its_validation_outputs(tuned_run):
    run_dir, metrics = tuned_run
    assert {"test/f1", "test/f1_micro", "test/map", "test/acc", "test/loss"} <= set(metrics)
    run = rebuild.load_run(run_dir)
    saved = run.module.task.thresholds
    written = read_json(run_dir / folder.THRESHOLDS_FILE)
    assert written["mode"] == "tune" and list(written["thresholds"]) == ["action", "comedy", "drama"]
    torch.testing.assert_close(torch.tensor(list(written["thresholds"].values())), saved)
    dm = rebuild.datamodule_for(run)
    outputs = list(rebuild.batches(run.module, dm.val_dataloader(), torch.device("cpu")))
    probs = torch.sigmoid(torch.cat([o for _, o in outputs]))
    labels = torch.cat([b["labels"] for b, _ in outputs])
    torch.testing.assert_close(tune_thresholds(probs, labels), saved)
    assert metrics["test/f1_micro"] > 0.6  # keywords decide the labels: learnable in 4 epochs


def test_eval_writes_a_per_label_report_and_predict_writes_label_sets(tuned_run, tmp_path):
    run_dir, recorded = tuned_run
    metrics = evaluate(entry_cfg("eval", [f"run={run_dir}", "split=test"]))
    for key in ("test/f1", "test/f1_micro", "test/map", "test/acc", "test/loss"):
        assert metrics[key] == pytest.approx(recorded[key], abs=1e-5), key
    report = pd.read_csv(run_dir / "eval" / "test" / "per_label.csv")
    assert report["label"].tolist() == ["action", "comedy", "drama"]
    assert report["f1"].mean() == pytest.approx(metrics["test/f1"], abs=1e-6)
    assert report["threshold"].tolist() == pytest.approx(
        rebuild.load_run(run_dir).module.task.thresholds.tolist()
    )
    out = tmp_path / "pred.jsonl"
    texts = ["explosions and jokes", "tears"]
    predict(entry_cfg("predict", [f"run={run_dir}", f"inputs={json.dumps(texts)}", f"output={out}"]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == texts
    for row in rows:
        assert set(row["probabilities"]) == {"action", "comedy", "drama"}
        thresholds = read_json(run_dir / folder.THRESHOLDS_FILE)["thresholds"]
        assert row["labels"] == [k for k, p in row["probabilities"].items() if p >= thresholds[k]]


IMAGE_PRE = ImagePreprocessing(input_size=32, channels=1, mean=(0.5,), std=(0.5,))


def test_mnist_pairs_are_deterministic_digit_pairs():
    images, sets = load_mnist_pairs()["train"]
    mnist, digits = load_embedded("mnist5k")["train"]
    assert images.shape == (2500, 56, 56) and images.dtype == np.uint8
    order = np.random.default_rng(0).permutation(5000)
    for i in (0, 1234, 2499):
        left, right = order[2 * i], order[2 * i + 1]
        assert np.array_equal(images[i, 14:42, :28], mnist[left])
        assert np.array_equal(images[i, 14:42, 28:], mnist[right])
        assert sets[i] == sorted({digits[left], digits[right]})
    assert np.array_equal(
        load_mnist_pairs.__wrapped__()["train"][0], images
    )  # not the cache: rebuilt the same
    dm = ImageClassificationDataModule(IMAGE_PRE, source="mnist_pairs", task="multilabel")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (32, 1, 32, 32) and batch["labels"].shape == (32, 10)
    assert batch["labels"].sum(1).min() >= 1 and batch["labels"].sum(1).max() <= 2


@pytest.mark.slow
def test_mnist_pairs_end_to_end_beats_the_trivial_predictor(tmp_path):
    overrides = [
        "data=mnist_pairs",
        "model=resnet18",
        "model.backbone.input_size=32",  # each digit ~16 px wide: enough, and a third of the work of 56 px
        "data.batch_size=64",
        "trainer.max_epochs=3",
        "optimizer.lr=1e-3",
        "monitor=val/f1_micro",
        "module.threshold=tune",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    # the best constant predictor (every digit always on) scores micro-F1 = 2p / (1 + p), p the share of positives
    images, sets = load_mnist_pairs()["train"]
    p = sum(len(s) for s in sets) / (10 * len(sets))
    trivial = 2 * p / (1 + p)
    print({k: v for k, v in metrics.items() if k.startswith(("test/", "best/"))}, "trivial", trivial)
    assert trivial < 0.35 and metrics["test/f1_micro"] > 2 * trivial, metrics
    assert metrics["test/map"] > 0.7, metrics  # chance level: the positive share, ~0.19


def _write_image_table(root: Path, n: int = 48) -> pd.DataFrame:
    """``root/img_<i>.png``: red and/or green squares; the labels are the colours present (a label set)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colours = [
            c for c, bit in zip(("red", "green"), ((i % 3) + 1) >> np.arange(2) & 1, strict=True) if bit
        ]
        pixels = np.zeros((12, 12, 3), dtype=np.uint8)
        pixels[..., 0] = 255 if "red" in colours else 0
        pixels[..., 1] = 255 if "green" in colours else 0
        Image.fromarray(pixels).save(root / f"img_{i}.png")
        rows.append({"file": f"img_{i}.png", "colours": "|".join(colours), "first": colours[0]})
    return pd.DataFrame(rows)


def test_image_table_gives_label_sets_or_classes_read_lazily(tmp_path):
    from ftlab.data.image import ImageClassificationDataModule, ImagePreprocessing

    table = _write_image_table(tmp_path / "imgs")
    table.to_csv(tmp_path / "labels.csv", index=False)
    pre = ImagePreprocessing(8, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    common = dict(
        source="image_table",
        labels_file=str(tmp_path / "labels.csv"),
        root=str(tmp_path / "imgs"),
        image_column="file",
        augment="none",
    )
    multi = ImageClassificationDataModule(pre, task="multilabel", label_column="colours", **common)
    multi.setup("fit")
    assert multi.label_names == ["green", "red"]
    assert multi.datasets["train"].images.dtype == object  # paths, decoded per item
    batch = next(iter(multi.train_dataloader()))
    # each image's multi-hot row says which colour channels are on: red is channel 0, green channel 1
    on = batch["pixel_values"].mean((2, 3))[:, :2] > 0
    assert torch.equal(batch["labels"].bool(), on[:, [1, 0]])
    single = ImageClassificationDataModule(pre, label_column="first", **common)
    assert single.label_names == ["green", "red"] and single.task == "classification"
    with pytest.raises(DataError, match="has no column 'colour'.*data.image_column"):
        ImageClassificationDataModule(pre, task="multilabel", label_column="colour", **common).setup("fit")
    with pytest.raises(ConfigError, match="image_table needs data.labels_file"):
        ImageClassificationDataModule(pre, source="image_table")


def test_image_table_multilabel_run_trains_and_predicts_label_sets(tmp_path):
    _write_image_table(tmp_path / "imgs", 60).to_csv(tmp_path / "labels.csv", index=False)
    cfg = compose_cfg(
        [
            "model=tiny_resnet",
            "data=image_table",
            "data.task=multilabel",
            f"data.labels_file={tmp_path / 'labels.csv'}",
            f"data.root={tmp_path / 'imgs'}",
            "data.image_column=file",
            "data.label_column=colours",
            "data.augment=none",
            "data.batch_size=8",
            "data.num_workers=0",
            f"paths.cache_dir={tmp_path}/cache",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.max_epochs=3",
            "callbacks.progress_bar.kind=log",
            "optimizer.lr=1e-2",
            "monitor=val/f1_micro",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    # two colour channels: a tiny CNN separates them well above the trivial answer (micro-F1 0.8 for "both")
    assert metrics["task"] == "multilabel" and metrics["test/f1_micro"] > 0.9
