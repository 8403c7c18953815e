"""The ask-and-tell loop behind ``hydra/sweeper=ftlab_optuna`` (the plugin in ``hydra_plugins.ftlab_optuna_sweeper``).

Per batch: count the study's trials against ``n_trials`` (over every process that shares the study), ask up to
``n_jobs`` trials, hand each to its job (``study.job_env``), launch the batch with Hydra's launcher, and tell the
study each job's objective (``None`` or a non-finite value: failed). A job that was pruned has told the study
itself. Job folders are named by trial number, so processes sharing one study and sweep folder never collide.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import Trial, TrialState

from ftlab.search import space
from ftlab.search import study as shared
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import write_text

log = logging.getLogger("ftlab.search")


def check_settings(conf: Any) -> None:
    """The sweeper's settings (``hydra.sweeper``), as a ConfigError naming the key."""
    if conf["direction"] not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={conf['direction']!r} must be 'minimize' or 'maximize'.")
    if not 0.0 <= conf["max_failure_rate"] <= 1.0:
        raise ConfigError(f"hydra.sweeper.max_failure_rate={conf['max_failure_rate']} must be within [0, 1].")
    if conf["n_trials"] < 1 or conf["n_jobs"] < 1:
        raise ConfigError(
            f"hydra.sweeper.n_trials={conf['n_trials']} and hydra.sweeper.n_jobs={conf['n_jobs']} must be at "
            "least 1."
        )
    if not 0 < conf["heartbeat_interval"] < conf["grace_period"]:
        raise ConfigError(
            f"hydra.sweeper.heartbeat_interval={conf['heartbeat_interval']} must be above 0 and below "
            f"hydra.sweeper.grace_period={conf['grace_period']}, or live trials would be taken for lost ones."
        )


def plan(params: Any, arguments: list[str], is_grid: bool) -> tuple[dict, dict, dict | None]:
    """The search space of ``hydra.sweeper.params`` and the command line; the grid of ``sampler=grid``."""
    search_space, fixed = space.parse([f"{k}={v}" for k, v in (params or {}).items()] + list(arguments))
    return search_space, fixed, space.grid(search_space) if is_grid else None


class OptunaSearch:
    """The sweeper's work; arguments as in ``FtlabOptunaSweeperConf`` (the plugin's config)."""

    def __init__(self, **conf: Any) -> None:
        check_settings(conf)
        self.conf = conf

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def _storage_url(self) -> str | None:
        """The study's storage; in memory only when the jobs run in this process (the basic launcher)."""
        url = self.conf["storage"]
        in_process = type(self.launcher).__name__ == "BasicLauncher"
        if url or in_process:
            return url
        journal = Path(self.config.hydra.sweep.dir).resolve() / "optuna_journal.log"
        log.info("storage: null with %s: the study is kept in %s", type(self.launcher).__name__, journal)
        return shared.JOURNAL + str(journal)

    def _study(self, url: str | None, grid: dict[str, list[Any]] | None) -> optuna.Study:
        sampler = self.conf["sampler"]  # Hydra instantiated sampler and pruner with the sweeper
        if grid is not None:
            sampler = sampler(search_space=grid)  # GridSampler is _partial_: its grid comes from params
        return optuna.create_study(
            study_name=self.conf["study_name"],
            storage=shared.open_storage(url),
            sampler=sampler,
            pruner=self.conf["pruner"],
            direction=self.conf["direction"],
            load_if_exists=True,
        )

    def sweep(self, arguments: list[str]) -> None:
        sampler = self.conf["sampler"]
        is_grid = isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler
        search_space, fixed, grid = plan(self.conf["params"], arguments, is_grid)
        n_trials = self.conf["n_trials"]
        if grid is not None:
            n_trials = min(n_trials, math.prod(len(v) for v in grid.values()))
        url = self._storage_url()
        study = self._study(url, grid)
        if study.get_trials(deepcopy=False):  # resumed or shared: do not replay the seed's first draws
            study.sampler.reseed_rng()
        log.info("study %s (%s), %s, %s; budget %d trials", study.study_name, url or "in memory",
                 type(study.sampler).__name__, type(study.pruner).__name__, n_trials)  # fmt: skip
        while True:
            if url:
                stale = shared.fail_stale(study, self.conf["grace_period"])
                if stale:
                    log.warning(
                        "trials %s had no heartbeat for %ss: marked failed", stale, self.conf["grace_period"]
                    )
            left = n_trials - len(shared.within_budget(study, n_trials))
            if left <= 0:
                break
            trials = self._ask(study, min(left, self.conf["n_jobs"]), n_trials)
            if trials:
                self._run_batch(study, url, trials, search_space, fixed)
        self._write_results(study)

    def _ask(self, study: optuna.Study, n: int, n_trials: int) -> list[Trial]:
        """Ask ``n`` trials; hand back any that another process's trials pushed past the budget."""
        trials = [study.ask() for _ in range(n)]
        allowed = shared.within_budget(study, n_trials)
        for trial in (t for t in trials if t.number not in allowed):
            trial.set_user_attr(shared.INTERRUPTED, "surplus: the budget was used up by other processes")
            _tell(study, trial, state=TrialState.FAIL)
        return [t for t in trials if t.number in allowed]

    def _run_batch(
        self, study: optuna.Study, url: str | None, trials: list[Trial], search_space: dict, fixed: dict
    ) -> None:
        overrides = []
        for trial in trials:
            job = space.suggest(trial, search_space, fixed)
            overrides.append(
                [*job, f"hydra.sweep.subdir={trial.number}", *shared.job_overrides(study, url, trial)]
            )
        if url is None:
            shared.remember(study, trials)
        try:
            with shared.heartbeat(trials if url else [], self.conf["heartbeat_interval"]):
                returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        except BaseException as err:  # Ctrl-C, a preempted job's exit: these trials do not count
            for trial in trials:
                _tell_interrupted(study, trial, err)
            raise
        failures = [
            ret for trial, ret in zip(trials, returns, strict=True) if not self._tell(study, trial, ret)
        ]
        if len(failures) > self.conf["max_failure_rate"] * len(returns):
            for ret in failures:
                ret.return_value  # noqa: B018 - re-raises a job's own exception, with its traceback
            raise HydraException(
                f"{len(failures)} of {len(returns)} trials of the last batch failed, more than "
                f"hydra.sweeper.max_failure_rate={self.conf['max_failure_rate']} allows (each job's status.json "
                "says why); set max_failure_rate: 1.0 to let a search go on past failed trials."
            )

    def _tell(self, study: optuna.Study, trial: Trial, ret: Any) -> bool:
        """Record one job's outcome; False for a failed trial (not for a pruned one)."""
        try:
            value = float(ret.return_value)
        except Exception:  # a failed job: None, or the job's own exception
            value = math.nan
        if math.isfinite(value):
            return _tell(study, trial, value) != TrialState.FAIL
        if _state(study, trial) == TrialState.PRUNED:
            return True  # the job told the study itself
        trial.set_user_attr(shared.JOB_FAILED, True)
        _tell(study, trial, state=TrialState.FAIL)
        return False

    def _write_results(self, study: optuna.Study) -> None:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
        results["trials"] = {s: states.count(s) for s in sorted(set(states))}
        if done:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
        else:
            log.warning("no trial completed: no best parameters")
        path = Path(self.config.hydra.sweep.dir) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, OmegaConf.to_yaml(OmegaConf.create(results)))  # temporary name, then renamed


def _tell(
    study: optuna.Study, trial: Trial, value: float | None = None, state: TrialState | None = None
) -> TrialState:
    shared.tell(study, trial, value, state)
    return _state(study, trial)


def _state(study: optuna.Study, trial: Trial) -> TrialState:
    return next(t.state for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def _tell_interrupted(study: optuna.Study, trial: Trial, err: BaseException) -> None:
    """A trial cut off by ``err`` (Ctrl-C, the process exiting): failed, not counted, its values queued again."""
    try:
        trial.set_user_attr(shared.INTERRUPTED, type(err).__name__)
        _tell(study, trial, state=TrialState.FAIL)
    except RuntimeError:  # finished meanwhile
        return
    shared.retry(study, trial.number, trial.params)
