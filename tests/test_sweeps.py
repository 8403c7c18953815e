"""End-to-end sweeps with the tiny BERT: grid + failure + report + resume, Optuna, submitit_local, joblib + W&B.

Each test starts ``python -m ftlab.train -m ...`` in a subprocess (one Hydra multirun, a few seconds per job).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftlab import report

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = [
    "model=tiny_bert", "debug=limit", "data.max_train_examples=64", "trainer.max_epochs=1",
    "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0", "data.batch_size=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # tokenized data shared by the sweeps of this file


def sweep(tmp: Path, cache: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "ftlab.train",
        "-m",
        *TINY,
        f"paths.log_dir={tmp}",
        f"paths.cache_dir={cache}",
    ]
    done = subprocess.run([*cmd, *overrides], env=full_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _status(job: Path) -> str:
    return json.loads((job / "status.json").read_text())["status"]


@pytest.mark.slow
def test_grid_with_a_failing_setting_report_and_resume(tmp_path, cache):
    sweep_dir = tmp_path / "grid"
    grid = ["seed=1,2", "optimizer.lr=0.001,0.003,-1"]  # lr=-1: torch refuses it, those jobs fail
    sweep(tmp_path, cache, *grid, f"hydra.sweep.dir={sweep_dir}")
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3", "4", "5"]  # one folder per job, job number as name
    failed = [p for p in jobs if _status(p) == "failed"]
    assert len(failed) == 2 and all(not (p / "metrics.json").exists() for p in failed)
    assert "Invalid learning rate" in json.loads((failed[0] / "status.json").read_text())["error"]

    result = report.report([sweep_dir])
    table = result["table"].set_index("optimizer.lr")
    assert sorted(table.index) == ["0.001", "0.003"] and list(table["n"]) == [2, 2]
    for lr in ("0.001", "0.003"):
        values = [json.loads((p / "metrics.json").read_text())["test/acc"] for p in jobs
                  if f"optimizer.lr={lr}" in yaml.safe_load((p / ".hydra/overrides.yaml").read_text())
                  and _status(p) == "completed"]  # fmt: skip
        assert len(values) == 2
        assert table.loc[lr, "test/acc mean"] == pytest.approx(statistics.mean(values))
        assert table.loc[lr, "test/acc std"] == pytest.approx(statistics.stdev(values))
    md = (sweep_dir / "results.md").read_text()
    assert "Excluded (2 failed or unfinished jobs)" in md and "Invalid learning rate" in md

    # A cut-off job (no metrics.json) is redone on resume; complete ones are skipped, failed ones retried.
    cut = jobs[0]
    (cut / "metrics.json").unlink()
    (cut / "status.json").unlink()
    mtimes = {p: (p / "metrics.json").stat().st_mtime_ns for p in jobs[1:] if p not in failed}
    failed_mtimes = {p: (p / "status.json").stat().st_mtime_ns for p in failed}
    done = sweep(tmp_path, cache, *grid, f"resume={sweep_dir}")
    assert (cut / "metrics.json").is_file() and _status(cut) == "completed"
    assert all((p / "metrics.json").stat().st_mtime_ns == t for p, t in mtimes.items())
    assert all(
        (p / "status.json").stat().st_mtime_ns != t and _status(p) == "failed"
        for p, t in failed_mtimes.items()
    )
    assert (done.stdout + done.stderr).count("is complete; skipped") == 3
    assert not list(tmp_path.glob("multirun/*"))  # the resumed sweep wrote into the old folder only


@pytest.mark.slow
def test_optuna_three_trials_one_failing(tmp_path, cache):
    sweep_dir = tmp_path / "optuna"
    sweep(tmp_path, cache, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "optimizer.lr=choice(-1.0,1e-3)",
          f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    statuses = sorted(_status(sweep_dir / str(i)) for i in range(3))
    assert statuses == ["completed", "completed", "failed"]  # the search went on after the failed trial
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = max(json.loads((sweep_dir / str(i) / "metrics.json").read_text())["best/val/acc"]
               for i in range(3) if _status(sweep_dir / str(i)) == "completed")  # fmt: skip
    assert results["best_value"] == pytest.approx(best)  # maximised: monitor_mode=max -> direction maximize
    assert results["best_params"]["optimizer.lr"] == 1e-3
    assert results["trials"] == {"complete": 2, "fail": 1}  # ftlab's sweeper on current Optuna (ftlab.search)


@pytest.mark.slow
def test_submitit_local_two_jobs(tmp_path, cache):
    sweep_dir = tmp_path / "submitit"
    sweep(tmp_path, cache, "hydra/launcher=submitit_local", "seed=1,2", f"hydra.sweep.dir={sweep_dir}")
    seeds = [json.loads((sweep_dir / str(i) / "metrics.json").read_text())["seed"] for i in range(2)]
    assert seeds == [1, 2] and all(_status(sweep_dir / str(i)) == "completed" for i in range(2))
    assert list((sweep_dir / ".submitit").glob("*/*_log.out"))


def _wandb_run(path: Path) -> dict:
    """Read an offline run's records (wandb 0.31 keeps config and summary in run-<id>.wandb, a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""  # 7-byte file header; 7-byte record headers
    found: dict = {"config": {}, "summary": {}}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a record header never straddles a block: the rest is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one protobuf Record
            record = pb.Record()
            record.ParseFromString(buf)
            buf, which = b"", record.WhichOneof("record_type")
            if which == "run":
                run = record.run
                found.update(id=run.run_id, name=run.display_name, group=run.run_group, tags=list(run.tags))
                found["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif which in ("config", "summary"):
                items = getattr(record, which).update
                found[which].update({i.key: json.loads(i.value_json) for i in items})
    return found


@pytest.mark.slow
def test_wandb_offline_one_run_per_job(tmp_path, cache):
    """Both jobs run in one process (basic launcher): without wandb.finish() the second would reuse the first run."""
    sweep_dir = tmp_path / "wandb_sweep"
    sweep(tmp_path, cache, "logger=wandb", "seed=1,2", f"hydra.sweep.dir={sweep_dir}",
          env={"WANDB_DIR": str(tmp_path / "wandb")})  # fmt: skip
    ids = []
    for i, seed in enumerate((1, 2)):
        files = list((sweep_dir / str(i) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1
        run, metrics = _wandb_run(files[0]), json.loads((sweep_dir / str(i) / "metrics.json").read_text())
        assert run["config"]["seed"] == seed and run["config"]["model"]["backbone"]["pretrained"] is False
        assert run["config"]["paths"]["output_dir"] == str(sweep_dir / str(i))  # the resolved config
        assert run["tags"] == ["train", "tiny_bert", "rotten_tomatoes", "full"]
        assert f"seed={seed}" in run["name"] and "paths." not in run["name"] and run["group"] == "wandb_sweep"
        assert run["summary"]["best/val/acc"] == pytest.approx(metrics["best/val/acc"])
        assert run["summary"]["test/acc"] == pytest.approx(metrics["test/acc"])
        ids.append(run["id"])
    assert len(set(ids)) == 2
