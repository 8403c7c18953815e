"""The job wrapper without Hydra: status records, failures in single runs vs sweeps, sweep resume, DDP, threads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.runs import folder, jobs
from ftlab.utils.errors import ConfigError, DataFileError


def _cfg(tmp_path: Path, **extra):
    base = {
        "paths": {"output_dir": str(tmp_path / "job")},
        "monitor": "val/acc",
        "resume": None,
        "trainer": {"devices": 2},
    }
    return OmegaConf.merge(base, extra)


def _status(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / folder.STATUS_FILE).read_text())


def _ok(cfg):
    return {"best/val/acc": 0.75, "test/acc": 0.7}


def _broken(cfg):
    raise ValueError("Invalid learning rate: -1")


def test_completed_job_records_status_and_returns_objective(tmp_path):
    cfg = _cfg(tmp_path)
    assert jobs.run_job(_ok, cfg) == 0.75
    assert _status(cfg)["status"] == "completed" and _status(cfg)["objective"] == 0.75


def test_failed_single_run_raises_and_records(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        jobs.run_job(_broken, cfg)
    status = _status(cfg)
    assert status["status"] == "failed" and status["type"] == "ValueError"
    assert status["error"] == "Invalid learning rate: -1" and "_broken" in status["traceback"]


def test_failed_sweep_job_returns_none(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(jobs, "is_multirun", lambda: True)
    cfg = _cfg(tmp_path)
    with caplog.at_level(logging.ERROR, logger="ftlab.jobs"):
        assert jobs.run_job(_broken, cfg) is None
    assert _status(cfg)["status"] == "failed" and "the sweep goes on" in caplog.text


def test_sweep_resume_skips_complete_jobs_and_continues_cut_off_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "is_multirun", lambda: True)
    done = _cfg(tmp_path, resume=True)
    job = Path(done.paths.output_dir)
    job.mkdir()
    folder.write_metrics(job / folder.METRICS_FILE, {"best/val/acc": 0.61, "test/acc": 0.6})
    assert jobs.run_job(_broken, done) == pytest.approx(0.61)  # not called: the record is complete

    seen = {}
    cut_off = _cfg(tmp_path / "b", resume=True)
    (Path(cut_off.paths.output_dir) / "checkpoints").mkdir(parents=True)
    (Path(cut_off.paths.output_dir) / folder.LAST_CKPT).write_bytes(b"")
    assert jobs.run_job(lambda c: seen.setdefault("resume", c.resume) and _ok(c), cut_off) == 0.75
    assert seen["resume"] == cut_off.paths.output_dir  # continues from its own last.ckpt

    fresh = _cfg(tmp_path / "c", resume=True)
    jobs.run_job(lambda c: seen.update(fresh=c.resume) or _ok(c), fresh)
    assert seen["fresh"] is None  # partial metrics.json or nothing: starts again


def test_resume_true_outside_a_sweep_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resume=<run folder>"):
        jobs.run_job(_ok, _cfg(tmp_path, resume=True))


def test_ddp_becomes_ddp_spawn_in_a_sweep(tmp_path, caplog):
    cfg = _cfg(tmp_path, trainer={"strategy": "ddp"})
    with caplog.at_level(logging.WARNING, logger="ftlab.jobs"):
        jobs._prepare_multirun(cfg, tmp_path)
    assert cfg.trainer.strategy == "ddp_spawn" and "ddp_spawn" in caplog.text
    kept = _cfg(tmp_path, trainer={"strategy": "ddp_fork"})
    jobs._prepare_multirun(kept, tmp_path)
    assert kept.trainer.strategy == "ddp_fork"


def test_threads_fair_share_under_joblib(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(jobs.THREADS_ENV, raising=False)
    monkeypatch.setattr(jobs.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    try:
        joblib = {
            "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
            "n_jobs": 3,
        }
        assert jobs.set_threads(joblib) == 2  # 8 cores // 3 jobs
        assert jobs.set_threads({**joblib, "n_jobs": -1}) == 1  # -1: one job per core
        monkeypatch.setenv(jobs.THREADS_ENV, "3")
        assert jobs.set_threads({}) == 3
    finally:
        torch.set_num_threads(before)


def test_resume_argv_variants(tmp_path):
    assert folder.resume_argv(["-m", "seed=1,2", "resume=true"]) == ["-m", "seed=1,2", "resume=true"]
    assert folder.resume_argv(["resume=true"]) == ["resume=true"]  # the job explains it (ConfigError)
    (tmp_path / "multirun.yaml").write_text("{}\n")
    argv = folder.resume_argv(["-m", "seed=1,2", f"resume={tmp_path}"])
    assert argv == ["-m", "seed=1,2", f"hydra.sweep.dir={tmp_path.resolve()}", "resume=true"]
    with pytest.raises(DataFileError, match="multirun.yaml"):
        folder.resume_argv(["-m", f"resume={tmp_path / 'nope'}"])


def test_direction_resolver():
    cfg = OmegaConf.create({"monitor_mode": "min", "d": "${ftlab.direction:${monitor_mode}}"})
    assert cfg.d == "minimize"


def test_sweep_resume_refuses_a_folder_of_another_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "is_multirun", lambda: True)
    cfg = _cfg(tmp_path, resume=True)
    Path(cfg.paths.output_dir).mkdir()
    record = {"best/val/acc": 0.6, "overrides": ["optimizer.lr=0.1", "resume=true", "hydra.sweep.dir=/x"]}
    folder.write_metrics(Path(cfg.paths.output_dir) / folder.METRICS_FILE, record)
    with pytest.raises(ConfigError, match="holds the run of optimizer.lr=0.1, but this job is"):
        jobs.run_job(_ok, cfg)  # this job (no Hydra here) has no overrides: another setting
