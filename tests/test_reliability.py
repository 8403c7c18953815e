"""Faults (issue 18): resume with the original command, untrusted files, full disks, shared caches, kills.

Every test runs the tiny BERT on the tiny review table, on the CPU, through the real command line where the
behaviour is the command line's.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, only_run_dir, read_json, run_cli, tiny_reviews, tiny_text_overrides

QUICK = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "trainer.num_sanity_val_steps=0", "seed=7"]  # fmt: skip


def _epoch(run: Path) -> int:
    return torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run stopped after its first epoch (copied by the tests that change it), and its command line."""
    tmp = tmp_path_factory.mktemp("started")
    csv = tmp / "reviews.csv"
    tiny_reviews().to_csv(csv, index=False)
    first = [*tiny_text_overrides(csv, tmp), *QUICK, f"paths.log_dir={tmp}/out"]
    proc = run_cli("train", [*first, "trainer.max_epochs=1"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(tmp / "out"), first


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "out" / "train" / run.name))


def test_resume_with_the_command_the_run_was_started_with(started, tmp_path):
    run, first = _copy(started[0], tmp_path), started[1]
    assert _epoch(run) == 0

    # up-arrow, resume=<run> added, one more epoch: model=tiny_bert and data=text_files are the run's own choices
    resumed = run_cli("train", [*first, "trainer.max_epochs=2", f"resume={run}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _epoch(run) == 1  # the value override applied: a second epoch, in the same folder
    first_record = [*first, "trainer.max_epochs=1"]
    assert read_json(run / "metrics.json")["overrides"] == first_record  # the record of the first start
    assert [p.name for p in run.parent.iterdir()] == [run.name]
    assert [p.name for p in started[0].parent.iterdir()] == [
        run.name
    ]  # paths.log_dir of the command: no new run

    before = (run / "checkpoints/last.ckpt").read_bytes()
    other = run_cli("train", [*first, "finetune=head_only", f"resume={run}"], cwd=tmp_path)
    assert other.returncode == 2
    message = other.stderr.strip().splitlines()
    assert "finetune=head_only is not the choice the run was started with (finetune=full)" in message[-1]
    assert "Traceback" not in other.stderr and (run / "checkpoints/last.ckpt").read_bytes() == before


def _limited(args: list[str], cwd: Path, max_bytes: int) -> subprocess.CompletedProcess:
    """``python -m ftlab.train args`` with files limited to ``max_bytes`` (``ulimit -f``; root ignores chmod)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ftlab.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)  # fmt: skip


def test_a_full_disk_stops_the_run_in_one_paragraph_and_keeps_the_good_checkpoint(started, tmp_path):
    run = _copy(started[0], tmp_path)
    kept = {p: p.read_bytes() for p in (run / "checkpoints/last.ckpt", run / "checkpoints/best.ckpt")}
    proc = _limited([f"resume={run}", "trainer.max_epochs=2"], tmp_path, 1 << 20)  # a checkpoint is 12 MB
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert f"ftlab could not write to {run} (File too large)" in message and "ulimit -f" in message
    assert "Traceback" not in proc.stderr
    assert all(path.read_bytes() == data for path, data in kept.items())  # the good checkpoints, untouched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]  # no temp left
    assert read_json(run / "status.json")["type"] == "DiskWriteError"


SHARED = ["model=tiny_bert", "finetune=head_only", "data.max_train_examples=48", "trainer.max_epochs=2",
          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
          "trainer.num_sanity_val_steps=0", "optimizer.lr=0.001,0.002,0.003"]  # fmt: skip


def _cache_contents(cache: Path) -> dict[str, object]:
    """Every cache entry (by its key) as arrays: token ids per split and the feature tensors."""
    import numpy as np

    out: dict[str, object] = {}
    for path in sorted((cache / "tokens").glob("*.npz")):
        with np.load(path) as arrays:
            out[path.name] = {k: arrays[k].tolist() for k in arrays.files}
    for path in sorted((cache / "features").glob("*.pt")):
        saved = torch.load(path, weights_only=True)
        out[path.name] = {split: [t.tolist() for t in tensors] for split, tensors in saved.items()}
    return out


@pytest.mark.slow  # two sweeps and a run: about a minute of CPU
def test_two_sweeps_started_together_share_a_cold_cache(tmp_path):
    cache, env = tmp_path / "cache", {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}

    def sweep(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "ftlab.train", "-m", *SHARED, f"paths.cache_dir={cache}",
                f"hydra.sweep.dir={tmp_path / name}", "callbacks.progress_bar.kind=log", *extra]  # fmt: skip

    held = {**env, "FTLAB_FAULT": "tokens:sleep=0.5,features:sleep=0.5"}  # each write held open: they overlap
    sweeps = [subprocess.Popen(sweep(name), cwd=tmp_path, env=held, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]  # fmt: skip
    logs = [sweep.communicate(timeout=400)[0] for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    statuses = [read_json(tmp_path / n / str(i) / "status.json")["status"] for n in "ab" for i in range(3)]
    assert statuses == ["completed"] * 6
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left behind

    alone = tmp_path / "alone"  # the same run, alone, with a cache of its own
    single = [o.replace("0.001,0.002,0.003", "0.001") for o in SHARED]
    proc = run_cli(
        "train", [*single, f"paths.cache_dir={alone}", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = _cache_contents(cache)
    assert shared and any(k.endswith(".pt") for k in shared) and shared == _cache_contents(alone)

    # resume=<sweep> with the sweep's own command: its complete jobs are skipped; another model is refused
    again = subprocess.run(sweep("a", f"resume={tmp_path / 'a'}"), env=env, capture_output=True, text=True)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("is complete; skipped") == 3
    other = [
        o.replace("model=tiny_bert", "model=tiny_resnet") for o in sweep("a", f"resume={tmp_path / 'a'}")
    ]
    refused = subprocess.run(other, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "model=tiny_resnet is not the choice the run was started with (model=tiny_bert)" in refused.stderr


def test_a_kill_inside_a_write_leaves_the_previous_file_whole(tmp_path):
    """SIGKILL at the ``metrics`` write point, after half of the new file is written: the old one is intact."""
    path = tmp_path / "metrics.json"
    path.write_text('{"old": 1}\n')
    code = "from pathlib import Path; from ftlab.runs import folder; folder.write_metrics(Path(r'%s'), {'new': 2})"
    env = {**os.environ, "FTLAB_FAULT": "metrics"}
    proc = subprocess.run([sys.executable, "-c", code % path], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9  # killed by SIGKILL, inside the write
    assert read_json(path) == {"old": 1}
    [left] = [
        p for p in tmp_path.iterdir() if p != path
    ]  # the half-written temporary file, never read as valid
    assert left.name.startswith(".metrics.json.") and left.name.endswith(".tmp")


def test_resume_falls_back_to_the_previous_good_checkpoint_with_a_warning(tmp_path, caplog):
    from ftlab.runs import folder

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert folder.resume_checkpoint(tmp_path) is None  # stopped before its first checkpoint: start again
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, ckpts / "best.ckpt")
    torch.save({"epoch": 2, "state_dict": {"w": torch.ones(300)}}, ckpts / "last.ckpt")
    os.truncate(ckpts / "last.ckpt", 600)  # cut off
    with caplog.at_level("WARNING"):
        assert folder.resume_checkpoint(tmp_path) == ckpts / "best.ckpt"
    assert "last.ckpt could not be read" in caplog.text and "previous good checkpoint" in caplog.text


@pytest.mark.slow  # six tiny runs in subprocesses: about a minute of CPU
def test_runs_and_sweeps_killed_inside_checkpoint_writes_resume_to_the_uninterrupted_metrics(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fault_injection
    finally:
        sys.path.pop(0)
    run = fault_injection.main(["--cases", "damaged_last", "--random", "0", "--out", str(tmp_path)])
    assert (run["kills"], run["recovered"], run["lost"]) == (1, 1, 0), run
    assert run["cases"][0]["fell_back"]  # last.ckpt cut off after the kill: best.ckpt used, with a warning

    # a two-job sweep, its second job killed between writing best.ckpt and last.ckpt; -m ... resume=<sweep>
    sweep = fault_injection.main(["--sweep", "--cases", "checkpoint_epoch0_save2#2", "--random", "0",
                                  "--out", str(tmp_path)])  # fmt: skip
    assert (sweep["kills"], sweep["recovered"], sweep["lost"]) == (1, 1, 0), sweep
    jobs = tmp_path / "sweep_checkpoint_epoch0_save2_n2"
    assert [read_json(jobs / j / "status.json")["status"] for j in "01"] == ["completed", "completed"]


def test_a_write_that_fails_leaves_the_previous_file_whole_and_no_temporary(tmp_path, monkeypatch):
    """labels.json, thresholds.json, predictions (CSV, JSONL), eval reports and plots: temporary name, then rename."""
    import errno

    import numpy as np

    from ftlab.data.labels import LabelMap
    from ftlab.predict import write_rows
    from ftlab.tasks.classification import ClassificationTask
    from ftlab.tasks.multilabel import MultiLabelTask
    from ftlab.tasks.reports import per_class, plot_confusion
    from ftlab.utils import safe_files

    rows = [
        {"input": "a", "label": "pos", "probability": 0.9, "top_k": [{"label": "pos", "probability": 0.9}]}
    ]
    evaluator = ClassificationTask(2, ["neg", "pos"]).evaluator()
    evaluator.add(torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), torch.tensor([0, 1, 1]))
    matrix = per_class(np.array([0, 1]), np.array([0, 1]), ["neg", "pos"])[1]
    writers = {
        "labels.json": lambda path: LabelMap(["neg", "pos"]).save(path),
        "thresholds.json": lambda path: MultiLabelTask(2, ["a", "b"]).write_files(path.parent),
        "predictions.csv": lambda path: write_rows(rows, path),
        "predictions.jsonl": lambda path: write_rows(rows, path),
        "per_class.csv": lambda path: evaluator.finish(path.parent, "eval"),  # ftlab-eval's first report file
        "confusion_matrix.png": lambda path: plot_confusion(matrix, path, "eval"),
    }
    paths = {name: tmp_path / name.replace(".", "_") / name for name in writers}
    for path in paths.values():
        path.parent.mkdir()
        path.write_bytes(b"the previous good file")

    def full(src, dst):  # the rename fails, as a write that runs out of room would
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    with monkeypatch.context() as patch:
        patch.setattr(safe_files.os, "replace", full)
        for name, write in writers.items():
            with pytest.raises(OSError, match="No space left"):
                write(paths[name])
    for name, path in paths.items():
        assert path.read_bytes() == b"the previous good file", name
        assert [p.name for p in path.parent.iterdir()] == [name], name  # no temporary file left behind
    for name, write in writers.items():  # the same writers, with room: the new file replaces the old one
        write(paths[name])
        assert paths[name].read_bytes() != b"the previous good file", name


def test_an_export_that_fails_midway_leaves_the_earlier_model_file_and_no_temporary_file(tmp_path):
    from ftlab.deploy.formats import _atomically

    model = tmp_path / "model.onnx"
    model.write_bytes(b"the earlier export")

    def half_then_crash(tmp):
        assert tmp.suffix == ".onnx" and tmp.parent == tmp_path  # exporters go by the suffix
        tmp.write_bytes(b"half a")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _atomically(model, half_then_crash)
    assert model.read_bytes() == b"the earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    _atomically(model, lambda tmp: tmp.write_bytes(b"new"))
    assert model.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1
