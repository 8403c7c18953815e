"""One ``ftlab-train`` job, alone or inside a Hydra sweep: status record, failures, sweep resume, CPU threads, W&B.

``run_job(train, cfg)`` is what the Hydra main calls. What it adds around ``train(cfg)``:

- ``status.json`` in the run folder: ``completed`` (with the objective), ``failed`` (error, type, traceback) or,
  in an Optuna search, ``pruned`` (the validation, epoch and value at which the pruner stopped the trial).
- In a multirun a failing job returns ``None`` instead of raising, so the other jobs go on; the Optuna sweeper
  records a ``None`` as a failed trial (``hparams_search/optuna.yaml`` sets ``max_failure_rate: 1.0``). A single
  run still raises (exit status non-zero).
- ``-m ... resume=true hydra.sweep.dir=<sweep>`` (or ``-m ... resume=<sweep>``): a job whose ``metrics.json`` is
  complete is skipped and returns its recorded objective; an unfinished job continues from its ``last.ckpt`` or
  starts again.
- ``strategy=ddp`` under a multirun is switched to ``ddp_spawn`` (plain DDP re-launches the script, and each rank
  would start a sweep of its own; see STACK.md).
- Under the joblib launcher each job uses ``cores // n_jobs`` torch threads; ``FTLAB_TORCH_THREADS`` overrides.
- The W&B run (if any) gets the full resolved config and the metrics as its summary, and is finished, so the next
  job in the same process starts a new run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab import search
from ftlab.runs import folder
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import atomic_write, disk_errors

log = logging.getLogger("ftlab.jobs")

THREADS_ENV = "FTLAB_TORCH_THREADS"
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run stopped on a preemption signal; continue it later


class Preempted(Exception):
    """Training stopped on a preemption signal after saving its position (raised by ftlab.preemption)."""


# Spawning strategies start their ranks from inside the job; these re-run the script (and Hydra's sweep) per rank.
_RELAUNCHING = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_name(default: str) -> str:
    """The sweep folder's name inside a multirun job (its W&B group), else ``default``."""
    if not is_multirun():
        return default
    return Path(HydraConfig.get().runtime.output_dir).parent.name


def _run_name() -> str:
    """The job's overrides (``hydra.job.override_dirname``), or ``default`` for a run without any."""
    if not HydraConfig.initialized():
        return "default"
    return HydraConfig.get().job.override_dirname or "default"


def _tags(name: str) -> list[str]:
    """W&B tags: the experiment name and the model / data / finetune choices (when inside a Hydra job)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return [name, *(str(choices[g]) for g in ("model", "data", "finetune") if choices.get(g))]


def _launcher(key: str, default: Any) -> Any:
    """``${ftlab.launcher:nodes,1}``: the Hydra launcher's value (trainer=ddp_slurm), else ``default``."""
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else {}
    value = launcher.get(key) if key in launcher else None
    return default if value is None else value


# metrics where lower is better (``val/loss``, ``val/mse``, ``val/loss_epoch``, ...); any other is maximised
_LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "perplexity", "ece", "brier", "error")


# the built-in tasks' ``Task.monitor``, so composing and checking a config never imports torch (a test keeps the
# two in step)
BUILTIN_MONITORS = {
    "classification": "val/acc",
    "regression": "val/mse",
    "multilabel": "val/f1_micro",
    "token_classification": "val/f1",
    "causal_lm": "val/loss",
    "masked_lm": "val/perplexity",
}


def _task_monitor(task: str) -> str:
    """``monitor``'s default: the metric the task ``data.task`` declares (``Task.monitor``)."""
    if task in BUILTIN_MONITORS:
        return BUILTIN_MONITORS[task]
    from ftlab.tasks import TASKS  # a task the user registered (importing it already imported torch)

    cls = TASKS.get(task)  # an unknown task is refused with its own message later; val/acc until then
    return cls.monitor if cls is not None else "val/acc"


def _monitor_mode(monitor: str) -> str:
    """``monitor_mode``'s default: ``min`` for a loss or error (see ``_LOWER_IS_BETTER``), else ``max``."""
    name = str(monitor).rsplit("/", 1)[-1]
    return "min" if any(name == w or name.startswith(f"{w}_") for w in _LOWER_IS_BETTER) else "max"


OmegaConf.register_new_resolver("ftlab.task_monitor", _task_monitor, replace=True)
OmegaConf.register_new_resolver("ftlab.monitor_mode", _monitor_mode, replace=True)
OmegaConf.register_new_resolver("ftlab.sweep_name", _sweep_name, replace=True)
OmegaConf.register_new_resolver("ftlab.launcher", _launcher, replace=True)
OmegaConf.register_new_resolver("ftlab.tags", _tags, replace=True)
OmegaConf.register_new_resolver("ftlab.run_name", _run_name, replace=True)
OmegaConf.register_new_resolver(
    "ftlab.direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode], replace=True
)
search.register_sweeper()  # hparams_search=optuna's sweeper plugin, also in an editable install


def completed_metrics(run_dir: Path, monitor: str) -> dict[str, Any] | None:
    """A finished run's ``metrics.json``, or ``None`` if it is missing or lacks ``best/<monitor>``."""
    try:
        metrics = json.loads((run_dir / folder.METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and f"best/{monitor}" in metrics else None


def _objective(metrics: dict[str, Any], monitor: str) -> float | None:
    # None (not NaN) for "no value": the Optuna sweeper records None as a failed trial, but NaN crashes it.
    value = metrics.get(f"best/{monitor}")
    return float(value) if value is not None and math.isfinite(float(value)) else None


def write_status(run_dir: Path, status: str, **fields: Any) -> None:
    if not folder.is_rank_zero():
        return  # one record per job, from rank 0
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(run_dir / folder.STATUS_FILE, lambda tmp: tmp.write_text(text), point="status")


def set_threads(launcher: Any = None) -> int:
    """Give each job its share of the CPU cores: ``FTLAB_TORCH_THREADS``, else cores // n_jobs under joblib."""
    import torch

    if launcher is None:
        launcher = HydraConfig.get().launcher if HydraConfig.initialized() else {}
    threads = int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV) else None
    if threads is None and "joblib" in str(launcher.get("_target_", "")).lower():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n_jobs = int(launcher.get("n_jobs") or 1)
        n_jobs = cores + 1 + n_jobs if n_jobs < 0 else n_jobs  # joblib's convention: -1 = all cores
        threads = max(1, cores // max(1, n_jobs))
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("torch threads: %d", threads)
    return torch.get_num_threads()


def _setting(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.startswith(("resume=", "hydra.", "hydra/")))


def _check_same_setting(output_dir: Path, recorded: list[str]) -> None:
    """A resumed sweep must be the same grid: never hand one setting's result to another (e.g. an Optuna trial)."""
    current = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if _setting(recorded) != _setting(current):
        raise ConfigError(
            f"resume: {output_dir} holds the run of {' '.join(_setting(recorded))}, but this job is "
            f"{' '.join(_setting(current))}. Resume a sweep with the same command and grid it was started with; "
            "an Optuna search samples new settings, so persist its study (hydra.sweeper.storage) instead."
        )


def _prepare_multirun(cfg: DictConfig, output_dir: Path) -> None:
    strategy = cfg.trainer.get("strategy")
    slurm_ranks = int(os.environ.get("SLURM_NTASKS", "1")) > 1  # ranks are SLURM tasks: plain ddp is right
    if isinstance(strategy, str) and strategy in _RELAUNCHING and not slurm_ranks:
        log.warning(
            "trainer.strategy=%s inside a multirun: using ddp_spawn (plain ddp re-runs the script per rank, and "
            "every rank would start its own sweep).",
            strategy,
        )
        cfg.trainer.strategy = "ddp_spawn"
    if (
        cfg.get("resume") is None
        and _status(output_dir) == "preempted"
        and (output_dir / folder.LAST_CKPT).is_file()
    ):
        log.info("%s was preempted: continuing it from %s", output_dir, folder.LAST_CKPT)  # a requeued job
        with open_dict(cfg):
            cfg.resume = str(output_dir)
    if cfg.get("resume") is True:
        # The sweep variant of resume: continue this job's own run if it was cut off, else start it afresh. A job
        # killed between writing best.ckpt and last.ckpt has best.ckpt alone: it continues from there.
        saved = any((output_dir / name).is_file() for name in (folder.LAST_CKPT, folder.BEST_CKPT))
        with open_dict(cfg):
            cfg.resume = str(output_dir) if saved else None


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / folder.STATUS_FILE).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _stop_preempted(cfg: DictConfig, output_dir: Path, err: Preempted, threads: int) -> None:
    """Record the preemption, requeue the SLURM job if there is one, and exit with :data:`EXIT_PREEMPTED`."""
    from ftlab.preemption import requeue_if_slurm

    requeued = requeue_if_slurm() if folder.is_rank_zero() else False
    write_status(output_dir, "preempted", error=str(err), requeued=requeued, torch_threads=threads)
    _finish_wandb(cfg, None, exit_code=EXIT_PREEMPTED)
    log.warning(
        "preempted (%s)%s; record: %s", err, ", requeued" if requeued else "", output_dir / folder.STATUS_FILE
    )
    sys.exit(EXIT_PREEMPTED)  # also ends a local sweep: -m ... resume=<sweep> continues it


def _finish_wandb(cfg: DictConfig, metrics: dict[str, Any] | None, exit_code: int) -> None:
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is None:
        return
    wandb.run.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
    if metrics is not None:
        wandb.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})
    wandb.finish(exit_code=exit_code)


def run_job(train: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> float | None:
    """Run ``train(cfg)`` as one job; returns the objective ``best/<monitor>`` (``None`` for a failed job)."""
    output_dir = Path(cfg.paths.output_dir)
    multirun = is_multirun()
    if cfg.get("resume") is True and not multirun:
        raise ConfigError(
            "resume=true resumes a sweep: use it with -m and hydra.sweep.dir=<sweep folder> (or give -m "
            "resume=<sweep folder>). To continue a single run, give its folder: resume=<run folder>."
        )
    if multirun and cfg.get("resume") is True:
        done = completed_metrics(output_dir, cfg.monitor)
        if done is not None:
            _check_same_setting(output_dir, done.get("overrides") or [])
            log.info("resume: %s is complete; skipped", output_dir)
            return _objective(done, cfg.monitor)
    if multirun:
        _prepare_multirun(cfg, output_dir)
    threads = set_threads()
    try:
        with disk_errors(output_dir):  # a full disk or read-only folder: one paragraph naming the folder
            metrics = train(cfg)
    except Preempted as err:
        _stop_preempted(cfg, output_dir, err, threads)
    except Exception as err:
        pruned = search.pruned(err)  # an Optuna trial stopped by its pruner: recorded, not a failure
        if pruned is not None:
            write_status(output_dir, "pruned", **pruned, torch_threads=threads)
            _finish_wandb(cfg, None, exit_code=0)
            log.info("trial pruned (%s); record: %s", err, output_dir / folder.STATUS_FILE)
            return None
        err = folder.user_error(err) or err  # the user error behind Hydra's InstantiationException, if any
        write_status(
            output_dir,
            "failed",
            error=str(err),
            type=type(err).__name__,
            traceback=traceback.format_exc(limit=-8),
            torch_threads=threads,
        )
        _finish_wandb(cfg, None, exit_code=1)
        if not multirun:
            raise
        log.error(
            "job failed (%s: %s); the sweep goes on. Record: %s",
            type(err).__name__,
            err,
            output_dir / folder.STATUS_FILE,
        )
        return None
    objective = _objective(metrics, cfg.monitor)
    write_status(output_dir, "completed", objective=objective, torch_threads=threads)
    _finish_wandb(cfg, metrics, exit_code=0)
    return objective
