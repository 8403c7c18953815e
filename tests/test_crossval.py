"""k-fold cross-validation: the splits, a k-fold sweep end to end, its report and its out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ftlab.crossval import collect_oof, label_issues
from ftlab.data.folds import check_folds, fold_indices
from ftlab.report import report
from ftlab.utils.errors import ConfigError, DataError, DataFileError

from conftest import run_cli, tiny_reviews, tiny_text_overrides


def _labels(n: int = 120) -> np.ndarray:
    return np.array(["a"] * (n // 2) + ["b"] * (n // 3) + ["c"] * (n - n // 2 - n // 3))


def test_folds_partition_the_pool_stratified_around_one_test_split():
    labels = _labels()
    splits = [fold_indices(labels, None, 5, i, seed=3, test_fraction=0.2) for i in range(5)]
    test = splits[0]["test"]
    assert len(test) == 24 and all(np.array_equal(s["test"], test) for s in splits)  # held out once
    validation = np.concatenate([s["validation"] for s in splits])
    pool = np.setdiff1d(np.arange(len(labels)), test)
    assert np.array_equal(np.sort(validation), pool)  # every pool example validated by exactly one fold
    for s in splits:
        assert not set(s["train"]) & set(s["validation"]) and not set(s["train"]) & set(test)
        assert len(s["train"]) + len(s["validation"]) == len(pool)
        # stratified: each validation fold has the pool's class shares (a: 1/2, b: 1/3, c: 1/6 of 19 or 20)
        counts = pd.Series(labels[s["validation"]]).value_counts()
        assert (
            abs(counts["a"] - len(s["validation"]) / 2) <= 1
            and abs(counts["c"] - len(s["validation"]) / 6) <= 1
        )
    again = fold_indices(labels, None, 5, 2, seed=3, test_fraction=0.2)
    other = fold_indices(labels, None, 5, 2, seed=4, test_fraction=0.2)
    assert np.array_equal(again["validation"], splits[2]["validation"])  # seeded
    assert not np.array_equal(other["validation"], splits[2]["validation"])
    # a source with its own test split: nothing held out, the folds cover all rows
    whole = fold_indices(labels, None, 4, 0, seed=3, test_fraction=None)
    assert "test" not in whole and len(whole["train"]) + len(whole["validation"]) == len(labels)


def test_grouped_folds_keep_each_group_in_one_fold():
    labels = _labels()
    groups = np.array([f"patient{i // 4}" for i in range(len(labels))])  # 30 groups of 4 rows
    test = None
    for i in range(3):
        s = fold_indices(labels, groups, 3, i, seed=0, test_fraction=0.2)
        test = s["test"] if test is None else test
        assert np.array_equal(s["test"], test)
        sets = [set(groups[s[k]]) for k in ("train", "validation", "test")]
        assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    with pytest.raises(DataError, match="data.group_column has 2 distinct groups"):
        fold_indices(labels, np.array(["x", "y"] * 60), 5, 0, seed=0, test_fraction=None)


@pytest.mark.parametrize(
    ("folds", "fold", "group", "message"),
    [
        (1, 0, None, r"data.folds=1 must be a whole number of at least 2"),
        (5, 5, None, r"data.fold=5 must be one of 0..4 .*range\(5\)"),
        (None, 0, "author", r"data.group_column='author' .* data.folds is null"),
    ],
)
def test_bad_fold_settings_are_named(folds, fold, group, message):
    with pytest.raises(ConfigError, match=message):
        check_folds(folds, fold, group)


def test_kfold_sweep_reports_mean_over_folds_and_writes_out_of_fold_predictions(tmp_path):
    csv = tmp_path / "reviews.csv"
    frame = tiny_reviews(30)
    frame["author"] = [f"author{i // 3}" for i in range(len(frame))]  # 20 authors
    frame.to_csv(csv, index=False)
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *tiny_text_overrides(csv, tmp_path),
        "data.folds=3",
        "data.fold=range(3)",
        "data.group_column=author",
        "trainer.max_epochs=1",
        "callbacks.progress_bar.kind=log",
        f"hydra.sweep.dir={sweep}",
    ]
    done = run_cli("train", args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    oof = collect_oof(sweep)
    # the 3 validation folds cover the 54 rows outside the test split (2 of 20 authors: 1/10) exactly once
    assert len(oof) == 54 and oof["index"].is_unique and sorted(oof["fold"].unique()) == [0, 1, 2]
    probs = oof[["prob/neg", "prob/pos"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and set(oof["label"]) == {0, 1}
    authors = frame["author"].to_numpy()
    assert all(
        len(set(oof.loc[oof["index"].isin(np.flatnonzero(authors == a)), "fold"])) <= 1 for a in authors
    )

    result = report([sweep], plots=False)
    table = result["table"]
    assert len(table) == 1 and table["n"].iloc[0] == 3  # one setting, averaged over its 3 folds
    accs = [float(v) for v in result["jobs"]["test/acc"]]
    assert table["test/acc mean"].iloc[0] == pytest.approx(np.mean(accs))
    assert table["test/acc std"].iloc[0] == pytest.approx(np.std(accs, ddof=1))

    issues = label_issues(sweep, top=None)
    assert set(issues.columns) == {"index", "fold", "label", "predicted", "label_prob"}
    assert set(issues["index"]) <= set(oof["index"])


def test_collect_oof_refuses_overlapping_or_missing_predictions(tmp_path):
    with pytest.raises(DataFileError, match="holds no"):
        collect_oof(tmp_path)
    for job in ("0", "1"):
        (tmp_path / job).mkdir()
        pd.DataFrame({"index": [1, 2], "fold": [0, 0], "label": [0, 1], "prob/a": [0.5, 0.5]}).to_csv(
            tmp_path / job / "oof_predictions.csv", index=False
        )
    with pytest.raises(DataFileError, match="2 examples have predictions from several runs"):
        collect_oof(tmp_path)
