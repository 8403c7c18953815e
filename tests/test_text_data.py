"""TextClassificationDataModule: sources, file formats, splits, sampling, caching, padding, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ftlab.data import TextClassificationDataModule, TextPreprocessing
from ftlab.data.text import tokenize_cached
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError, DataFileError

from conftest import tiny_reviews

TOKENIZER = assets.resolve("embedded:all-MiniLM-L6-v2")
PRE = TextPreprocessing(tokenizer=TOKENIZER, max_length=512)


def files_module(path: Path, tmp_path: Path, **kwargs) -> TextClassificationDataModule:
    kwargs = {"text_column": "review", "label_column": "stars", "max_length": 16, **kwargs}
    return TextClassificationDataModule(
        PRE, source="files", train_file=str(path), cache_dir=str(tmp_path / "c"), **kwargs
    )


def write(frame: pd.DataFrame, path: Path) -> Path:
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".parquet": lambda: frame.to_parquet(path),
    }[path.suffix]()
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_reads_each_file_format_to_the_same_examples(tmp_path, suffix):
    frame = tiny_reviews(20)
    dm = files_module(write(frame, tmp_path / f"reviews{suffix}"), tmp_path)
    dm.setup()
    assert dm.label_names == ["neg", "pos"]
    assert sum(len(d) for d in dm.datasets.values()) == len(frame)
    # every table row comes back out of the token ids (uncased tokenizer; compare without spaces)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    decoded = {
        tok.decode(ds[i]["input_ids"], skip_special_tokens=True).replace(" ", "")
        for ds in dm.datasets.values()
        for i in range(len(ds))
    }
    assert decoded == {t.lower().replace(" ", "") for t in frame["review"]}


def test_split_is_seeded_stratified_and_sized(tmp_path):
    frame = tiny_reviews(50)  # 100 rows, 50/50
    path = write(frame, tmp_path / "r.csv")
    dm1, dm2, dm3 = (
        files_module(path, tmp_path, seed=s, val_fraction=0.2, test_fraction=0.1) for s in (1, 1, 2)
    )
    for dm in (dm1, dm2, dm3):
        dm.setup()
    assert [len(dm1.datasets[s]) for s in ("train", "validation", "test")] == [70, 20, 10]
    for split in ("validation", "test"):
        labels = dm1.datasets[split].labels
        assert (labels == 0).sum() == (labels == 1).sum()  # stratified: 50/50 kept
    assert np.array_equal(dm1.datasets["test"].ids, dm2.datasets["test"].ids)  # same seed, same split
    assert not np.array_equal(dm1.datasets["test"].ids, dm3.datasets["test"].ids)


def test_given_validation_and_test_files_are_used_as_they_are(tmp_path):
    frame = tiny_reviews(30)
    train, val, test = frame.iloc[:40], frame.iloc[40:50], frame.iloc[50:]
    paths = [write(f, tmp_path / n) for f, n in ((train, "t.csv"), (val, "v.jsonl"), (test, "s.parquet"))]
    dm = files_module(paths[0], tmp_path, validation_file=str(paths[1]), test_file=str(paths[2]))
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "validation", "test")] == [40, 10, 10]


def test_max_train_examples_and_few_shot(tmp_path):
    path = write(tiny_reviews(50), tmp_path / "r.csv")
    dm = files_module(path, tmp_path, max_train_examples=20)
    dm.setup()
    assert len(dm.datasets["train"]) == 20 and (dm.datasets["train"].labels == 1).sum() == 10
    dm = files_module(path, tmp_path, examples_per_class=3)
    dm.setup()
    assert sorted(dm.datasets["train"].labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_max_eval_examples_cuts_validation_and_test_stratified_and_seeded(tmp_path):
    path = write(tiny_reviews(100), tmp_path / "r.csv")  # 200 rows: 20 validation, 20 test held out
    full = files_module(path, tmp_path, seed=1, examples_per_class=5)
    cut, again = (
        files_module(path, tmp_path, seed=1, examples_per_class=5, max_eval_examples=8) for _ in "ab"
    )
    for dm in (full, cut, again):
        dm.setup()
    for split in ("validation", "test"):
        labels = cut.datasets[split].labels
        assert len(labels) == 8 and (labels == 0).sum() == 4  # stratified
        texts = cut.raw_inputs(split)[0]
        assert set(texts) < set(full.raw_inputs(split)[0])  # a subset of the whole split
        assert texts == again.raw_inputs(split)[0]  # seeded
    assert cut.raw_inputs("train") == full.raw_inputs("train")  # training data untouched
    # a source's own validation/test files are cut the same way; a shorter split stays whole
    frame = tiny_reviews(30)
    paths = [write(f, tmp_path / n) for f, n in ((frame.iloc[:40], "t.csv"), (frame.iloc[40:], "v.csv"))]
    given = files_module(paths[0], tmp_path, validation_file=str(paths[1]), max_eval_examples=6)
    given.setup()
    assert len(given.datasets["validation"]) == 6 and len(given.datasets["test"]) == 4
    with pytest.raises(ConfigError, match="data.max_eval_examples=0 must be positive"):
        files_module(path, tmp_path, max_eval_examples=0)
    with pytest.raises(ConfigError, match="data.max_eval_examples=8 cannot be used with data.folds=5"):
        files_module(path, tmp_path, max_eval_examples=8, folds=5)


def test_split_seed_fixes_validation_and_test_while_the_seed_draws_the_training_subset(tmp_path):
    path = write(tiny_reviews(100), tmp_path / "r.csv")
    kwargs = {"max_train_examples": 40, "max_eval_examples": 10}
    runs = [files_module(path, tmp_path, seed=s, split_seed=0, **kwargs) for s in (1, 2)]
    plain = [files_module(path, tmp_path, seed=s, **kwargs) for s in (1, 2)]
    for dm in (*runs, *plain):
        dm.setup()
    for split in ("validation", "test"):  # one held-out set (and subset) for every seed
        assert runs[0].raw_inputs(split) == runs[1].raw_inputs(split)
        assert plain[0].raw_inputs(split) != plain[1].raw_inputs(split)  # without it, the seed moves them
        assert (runs[0].datasets[split].labels == 0).sum() == 5  # still stratified
    assert runs[0].raw_inputs("train") != runs[1].raw_inputs("train")  # the seeds draw their own subsets
    held = set(runs[0].raw_inputs("validation")[0]) | set(runs[0].raw_inputs("test")[0])
    assert not held & set(runs[1].raw_inputs("train")[0])  # never trained on by any seed
    # split_seed=<seed> is the default split of that seed
    same = files_module(path, tmp_path, seed=1, split_seed=1, **kwargs)
    same.setup()
    assert all(same.raw_inputs(s) == plain[0].raw_inputs(s) for s in ("train", "validation", "test"))
    with pytest.raises(ConfigError, match="data.split_seed=0 cannot be used with data.folds=5"):
        files_module(path, tmp_path, split_seed=0, folds=5)


def test_sentence_pairs_get_token_type_ids(tmp_path):
    frame = tiny_reviews(10).assign(other="and a second sentence")
    dm = files_module(write(frame, tmp_path / "p.csv"), tmp_path, text_pair_column="other", max_length=32)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert (batch["token_type_ids"] == 1).any() and (batch["token_type_ids"] == 0).any()


def test_dynamic_padding_pads_to_the_longest_in_the_batch(tmp_path):
    frame = pd.DataFrame(
        {
            "review": ["short", "a much longer review with many more words in it"] * 10,
            "stars": ["neg", "pos"] * 10,
        }
    )
    dm = files_module(write(frame, tmp_path / "r.csv"), tmp_path, max_length=64, batch_size=4)
    dm.setup()
    ds = dm.datasets["train"]
    batch = dm.collate([ds[i] for i in range(len(ds))][:2])
    longest = max(ds.length(0), ds.length(1))
    assert batch["input_ids"].shape[1] == longest
    assert batch["attention_mask"].sum().item() == ds.length(0) + ds.length(1)


def test_truncates_to_max_length(tmp_path):
    frame = pd.DataFrame({"review": [" ".join(["word"] * 100)] * 10, "stars": ["a", "b"] * 5})
    dm = files_module(write(frame, tmp_path / "r.csv"), tmp_path, max_length=12)
    dm.setup()
    assert max(dm.datasets["train"].length(i) for i in range(len(dm.datasets["train"]))) == 12


def test_tokenization_is_cached_and_keyed_by_what_determines_it(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    calls = []
    original = type(tok).__call__
    monkeypatch.setattr(
        type(tok), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    texts = ["one text", "another text"]
    first = tokenize_cached(tok, texts, None, 16, tmp_path)
    again = tokenize_cached(tok, texts, None, 16, tmp_path)
    assert len(calls) == 1 and np.array_equal(first["input_ids"], again["input_ids"])
    tokenize_cached(tok, texts, None, 8, tmp_path)  # other max_length
    tokenize_cached(tok, ["one text", "changed"], None, 16, tmp_path)  # other data
    assert len(calls) == 3
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 3


def test_integer_labels_and_regression(tmp_path):
    frame = pd.DataFrame({"review": [f"text {i}" for i in range(30)], "stars": [1, 5, 3] * 10})
    dm = files_module(write(frame, tmp_path / "r.csv"), tmp_path)
    dm.setup()
    assert dm.label_names == ["1", "3", "5"] and dm.num_classes == 3
    dm = files_module(tmp_path / "r.csv", tmp_path, task="regression")
    dm.setup()
    assert dm.num_classes == 1 and dm.datasets["train"].labels.dtype == np.float32


def test_embedded_sources_load_real_data(tmp_path):
    dm = TextClassificationDataModule(PRE, source="rotten_tomatoes", max_length=16, cache_dir=None)
    dm.setup()
    sizes = {s: len(d) for s, d in dm.datasets.items()}
    assert sum(sizes.values()) == 12752 and dm.label_names == ["fresh", "rotten"]
    assert sizes["test"] == 1275
    dm = TextClassificationDataModule(PRE, source="debates_2016", max_length=16, cache_dir=None)
    dm.setup()
    assert dm.label_names == ["Democratic", "Moderator", "Republican"]


# --- errors: each names the key and the way out -------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataFileError, match=r"data.train_file=.*nope.csv.*no such file"):
        files_module(tmp_path / "nope.csv", tmp_path).setup()


def test_unreadable_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(DataFileError, match="could not be read as parquet"):
        files_module(path, tmp_path).setup()


def test_missing_column_names_the_existing_ones(tmp_path):
    path = write(tiny_reviews(5), tmp_path / "r.csv")
    with pytest.raises(DataError, match=r"data.text_column='text' is not a column.*review, stars"):
        files_module(path, tmp_path, text_column="text").setup()


def test_label_only_in_test_data(tmp_path):
    train = write(tiny_reviews(10), tmp_path / "t.csv")
    test = write(pd.DataFrame({"review": ["x", "y"], "stars": ["pos", "meh"]}), tmp_path / "s.csv")
    with pytest.raises(DataError, match=r"test data has label\(s\) \['meh'\]"):
        files_module(train, tmp_path, test_file=str(test)).setup()


def test_empty_after_filtering(tmp_path):
    path = write(tiny_reviews(5), tmp_path / "r.csv")
    with pytest.raises(DataError, match="empty"):
        files_module(path, tmp_path, labels=["nonexistent"]).setup()


def test_bad_settings(tmp_path):
    path = write(tiny_reviews(5), tmp_path / "r.csv")
    with pytest.raises(ConfigError, match="data.max_length=1000"):
        files_module(path, tmp_path, max_length=1000)
    with pytest.raises(ConfigError, match="data.source='nope'"):
        TextClassificationDataModule(PRE, source="nope").setup()
    with pytest.raises(ConfigError, match="data.test_fraction=1.5"):
        files_module(path, tmp_path, test_fraction=1.5)


def test_batches_move_to_the_device_as_flat_tensor_dicts():
    from ftlab.data.base import TensorDictDataModule

    module = TensorDictDataModule()
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}
    moved = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert set(moved) == set(batch) and all(torch.equal(moved[k], batch[k]) for k in batch)
    nested = {"inputs": [torch.ones(2)], "labels": torch.tensor([1])}  # not flat: Lightning's generic walk
    assert torch.equal(
        module.transfer_batch_to_device(nested, torch.device("cpu"), 0)["inputs"][0], torch.ones(2)
    )
