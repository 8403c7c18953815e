"""The run record is the same under every strategy: 2-process CPU DDP (gloo, spawned ranks) vs one process."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import read_json, run_cli, tiny_reviews, tiny_text_overrides


def _train(tmp_path: Path, csv_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    run_dir = tmp_path / name
    args = [
        *(o for o in tiny_text_overrides(csv_path, tmp_path) if not o.startswith("trainer.devices")),
        "trainer.max_epochs=2",
        "scheduler=constant",
        "trainer.log_every_n_steps=2",  # step rows in both runs (two ranks take half the steps)
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    done = run_cli("train", args, cwd=tmp_path, timeout=900)  # two spawned ranks: minutes on a loaded machine
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout + done.stderr


def _csv(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_ddp_spawn_writes_the_single_process_record(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    tiny_reviews().to_csv(csv_path, index=False)
    single, _ = _train(tmp_path, csv_path, "single")
    ddp, output = _train(tmp_path, csv_path, "ddp", "trainer=ddp_cpu")  # ddp_spawn, 2 ranks
    assert "sync_dist" not in output  # no epoch-level-logging-without-sync_dist warning

    one, two = read_json(single / "metrics.json"), read_json(ddp / "metrics.json")
    assert list(one) == list(two)
    columns, rows = _csv(ddp)
    assert columns == _csv(single)[0]
    for run_dir, metrics in ((single, one), (ddp, two)):
        # the best score (lost in the spawned ranks before) is the best val/acc the CSV log holds, at its epoch
        val = [(float(r["val/acc"]), int(r["epoch"])) for r in _csv(run_dir)[1] if r["val/acc"]]
        assert len(val) == 2
        best, epoch = max(val, key=lambda v: (v[0], -v[1]))
        assert metrics["best/val/acc"] == pytest.approx(best)
        assert metrics["best_epoch"] == epoch
        status = read_json(run_dir / "status.json")
        assert status["status"] == "completed" and status["objective"] == pytest.approx(best)
        # the test row sits where fit ended (epoch 2, its last step), also when fit ran in spawned processes
        steps = [int(r["step"]) for r in _csv(run_dir)[1] if r["train/acc"]]
        test_row = next(r for r in _csv(run_dir)[1] if r["test/acc"])
        assert (int(test_row["epoch"]), int(test_row["step"])) == (2, steps[-1] + 1)
        assert float(test_row["test/acc"]) == pytest.approx(metrics["test/acc"])
    # two ranks shared each epoch's 64 examples in batches of 8: 4 steps an epoch instead of 8
    assert [int(r["step"]) for r in rows if r["train/acc"]] == [3, 7]

    # the DDP test metrics are those of the same checkpoint scored by one process over the whole split
    done = run_cli("evaluate", [f"run={ddp}", "split=test"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = read_json(ddp / "eval" / "test" / "metrics.json")
    for key in ("test/acc", "test/f1", "test/loss"):
        assert two[key] == pytest.approx(scored[key], abs=1e-6), key
