"""Hyperparameter search on Optuna (``hparams_search=optuna``): the sweeper's loop and the job's side of a trial.

The Hydra plugin (``hydra_plugins.ftlab_optuna_sweeper``) only declares the config and calls
:mod:`ftlab.search.sweeper`. A job finds its trial through :mod:`ftlab.search.study` and reports to it with
:class:`ftlab.search.pruning.OptunaPruning`. Optuna is the ``optuna`` extra: nothing here imports it until a
search runs, so ``ftlab-train`` without it stays as it is.
"""

from __future__ import annotations

import os
import sys
from typing import Any

TRIAL_ENV = "FTLAB_OPTUNA_TRIAL"  # set by the sweeper for each job (ftlab.search.study)


def pruning_callback(monitor: str) -> Any:
    """In a job of an Optuna search: the callback that reports ``monitor`` to its trial; else ``None``."""
    if not os.environ.get(TRIAL_ENV):
        return None
    from hydra.core.hydra_config import HydraConfig

    from ftlab.search.pruning import OptunaPruning
    from ftlab.search.study import job_trial

    trial = job_trial(HydraConfig.get().sweeper) if HydraConfig.initialized() else None
    return OptunaPruning(trial, monitor) if trial is not None else None


def pruned(err: BaseException) -> dict[str, Any] | None:
    """What ``status.json`` records of a job stopped by its pruner, or ``None`` for any other exception."""
    module = sys.modules.get("ftlab.search.pruning")
    if module is None or not isinstance(err, module.Pruned):
        return None
    return dict(err.record)


def register_sweeper() -> None:
    """Make ``hydra/sweeper=ftlab_optuna`` known to Hydra in every install.

    Hydra finds plugins by listing the ``hydra_plugins`` namespace package with ``pkgutil``; an editable install
    (``pip install -e .``) maps ``hydra_plugins.ftlab_optuna_sweeper`` through an import hook that ``pkgutil``
    cannot list, so the scan misses it there. Importing the module registers its configs; registering the class
    is a no-op where the scan found it (an installed wheel).
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.ftlab_optuna_sweeper.ftlab_optuna_sweeper import FtlabOptunaSweeper

    Plugins.instance().register(FtlabOptunaSweeper)


def check_sweeper(cfg: Any, overrides: list[str]) -> None:
    """``ftlab-train -m`` on ftlab's Optuna sweeper: its settings and search space, checked before anything runs
    (a ConfigError naming the key, so the CLI exits 2 with one paragraph)."""
    from omegaconf import OmegaConf

    sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
    if sweeper is None or not str(sweeper.get("_target_", "")).endswith("FtlabOptunaSweeper"):
        return
    from ftlab.search.sweeper import check_settings, plan

    conf: Any = OmegaConf.to_container(sweeper, resolve=True)
    check_settings(conf)
    is_grid = str((conf.get("sampler") or {}).get("_target_", "")).endswith("GridSampler")
    plan(conf.get("params"), [o for o in overrides if not o.lstrip("+~").startswith("hydra")], is_grid)
