"""Preemption: a signal mid-epoch saves the exact position; the continued run ends like the uninterrupted one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from ftlab.data.samplers import LengthBucketSampler, SeededShuffleSampler
from ftlab.preemption import EXIT_PREEMPTED, consumed_batches, requeue_if_slurm, resume_sampler

from conftest import ROOT, only_run_dir, read_json, run_cli, tiny_text_overrides


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def _base(reviews_csv: Path, tmp_path: Path) -> list[str]:
    return tiny_text_overrides(reviews_csv, tmp_path) + [
        "trainer.max_epochs=2",
        "callbacks.early_stopping=null",
        "scheduler=linear",  # a per-step schedule: its state must resume at the same step
    ]


def _cut(base: list[str], tmp_path: Path, signal_name: str) -> Path:
    """Train with ``signal_name`` sent to the process at batch 3 of epoch 1 (of 8); the preempted run folder."""
    kill = [
        "+callbacks.kill._target_=signal_callback.SignalInEpoch",
        "+callbacks.kill.epoch=1",
        "+callbacks.kill.batch=3",
        f"+callbacks.kill.signal_name={signal_name}",
    ]
    cut = run_cli("train", [*base, f"paths.log_dir={tmp_path}/cut", *kill], cwd=tmp_path)
    assert cut.returncode == EXIT_PREEMPTED, cut.stderr[-3000:]
    run = only_run_dir(tmp_path / "cut")
    status = read_json(run / "status.json")
    assert status["status"] == "preempted" and signal_name in status["error"]
    assert not (run / "metrics.json").exists()
    position = _last(run)
    # saved after batch 3 of epoch 1 finished (8 steps of epoch 0 + 4): mid-epoch, not the epoch's end
    assert position["epoch"] == 1 and position["global_step"] == 12
    return run


def test_sigusr1_mid_epoch_then_resume_ends_like_the_uninterrupted_run(reviews_csv, tmp_path, monkeypatch):
    base = _base(reviews_csv, tmp_path)
    whole = run_cli("train", [*base, f"paths.log_dir={tmp_path}/whole"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = _cut(base, tmp_path, "SIGUSR1")
    resumed = run_cli("train", [f"resume={run}", "~callbacks.kill"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = only_run_dir(tmp_path / "whole")
    expected, got = read_json(reference / "metrics.json"), read_json(run / "metrics.json")
    for key in ("test/acc", "test/loss", "test/f1", "best/val/acc", "best_epoch"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    a, b = _last(reference), _last(run)
    assert a["global_step"] == b["global_step"] == 16
    # the same batches, dropout masks and learning rates after the cut: the same weights
    assert all(torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6) for k in a["state_dict"])
    assert read_json(run / "status.json")["status"] == "completed"
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader restarted mid-epoch


def test_sigterm_mid_epoch_saves_the_position_and_exits_for_requeue(reviews_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = _cut([*_base(reviews_csv, tmp_path), "data.bucketing=false"], tmp_path, "SIGTERM")
    assert read_json(run / "status.json")["requeued"] is False  # not under SLURM


class _Progress:
    def __init__(self, processed: int):
        self.processed = processed


class _FakeTrainer:
    def __init__(self, restarting: bool, processed: int, world_size: int = 1):
        loop = type("Loop", (), {})()
        loop.restarting = restarting
        loop.epoch_loop = type("EpochLoop", (), {})()
        loop.epoch_loop.batch_progress = type("BP", (), {"current": _Progress(processed)})()
        self.fit_loop, self.world_size = loop, world_size


def test_resume_sampler_skips_only_the_consumed_batches_of_a_cut_epoch():
    plain = SeededShuffleSampler(20, seed=1, epoch=3)
    order = list(plain)
    assert resume_sampler(plain, None, 4) is plain  # no trainer (prediction, caches): untouched
    trainer = _FakeTrainer(False, 2)
    wrapped = resume_sampler(plain, trainer, 4)
    assert list(wrapped) == order  # a fresh run: every index
    trainer.fit_loop.restarting = True  # the loops' progress is restored after the loader is built
    assert list(wrapped) == order[8:]  # the resumed epoch goes on after its 2 consumed batches of 4
    assert list(wrapped) == order and len(wrapped) == 20  # once: later epochs whole
    assert list(resume_sampler(plain, _FakeTrainer(True, 5), 4)) == order  # 5 x 4: the epoch had ended
    # a sampler that shards by rank itself stays a DistributedSampler (Lightning leaves it alone) and skips per rank
    buckets = LengthBucketSampler(list(range(40)), batch_size=4, seed=0, epoch=1, num_replicas=2, rank=1)
    wrapped = resume_sampler(buckets, _FakeTrainer(True, 3, world_size=2), 4)
    assert isinstance(wrapped, torch.utils.data.DistributedSampler)
    assert list(wrapped) == list(buckets)[12:]
    assert consumed_batches(None, 20, 4) == 0


def test_requeue_calls_scontrol_for_the_slurm_job(tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_if_slurm() is False and not log.exists()  # not under SLURM: nothing to requeue
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_if_slurm() is True
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_if_slurm() is True
    assert log.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]
