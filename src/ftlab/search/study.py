"""The study shared by the sweeper and its jobs: storage URLs, the trial budget, heartbeats, a job's own trial.

A job finds its trial from its own Hydra config, which the sweeper completes per job (so it reaches a job in this
process, a joblib worker or a SLURM job alike): ``hydra.sweeper.study_name`` and ``hydra.sweeper.storage`` (null:
the study lives in the sweeper's memory, and the job runs in the same process), and the trial number in the
environment variable ``FTLAB_OPTUNA_TRIAL`` (``hydra.job.env_set``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from hydra.utils import instantiate
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState

from ftlab.search import TRIAL_ENV

JOURNAL = "journal://"
# user attributes the sweeper writes on a trial (shown by study.trials_dataframe())
HEARTBEAT, JOB_FAILED, INTERRUPTED = "ftlab:heartbeat", "ftlab:job_failed", "ftlab:interrupted"
RETRY_OF = "ftlab:retry_of"

_LIVE: dict[
    tuple[str, int], Trial
] = {}  # trials of in-memory studies: their jobs run in the sweeper's process


def open_storage(url: str | None) -> BaseStorage | None:
    """``None`` (in memory), ``journal://<file>`` (a journal file, safe for many processes), or an SQLAlchemy URL."""
    if not url:
        return None
    if url.startswith(JOURNAL):
        path = url[len(JOURNAL) :]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    # sqlite: wait for a lock rather than fail at once when several processes write
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return RDBStorage(url, engine_kwargs=engine)


def remember(study: optuna.Study, trials: list[Trial]) -> None:
    """Let jobs in this process find their trials of an in-memory study."""
    _LIVE.clear()  # the previous batch's trials are finished
    _LIVE.update({(study.study_name, t.number): t for t in trials})


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial uses up the budget: finished (completed, pruned, failed in the job) or running.

    Not counted: trials cut off by an interruption or a lost process, and trials handed back as surplus.
    """
    if trial.state == TrialState.FAIL:
        return bool(trial.user_attrs.get(JOB_FAILED))
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def within_budget(study: optuna.Study, n_trials: int) -> set[int]:
    """The numbers of the first ``n_trials`` counted trials: those may run, any later one is surplus."""
    numbers = sorted(t.number for t in study.get_trials(deepcopy=False) if counted(t))
    return set(numbers[:n_trials])


def fail_stale(study: optuna.Study, grace_period: float) -> list[int]:
    """Fail running trials whose sweeper stopped beating (a killed process): they no longer hold budget, and
    their values are queued again."""
    now, stale = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        start = trial.datetime_start.timestamp() if trial.datetime_start else now
        last = float(trial.user_attrs.get(HEARTBEAT, start))
        if now - last > grace_period:
            tell(study, trial.number, state=TrialState.FAIL)
            retry(study, trial.number, trial.params)
            stale.append(trial.number)
    return stale


def tell(study: optuna.Study, trial: Trial | int, value: float | None = None, state: Any = None) -> None:
    """``study.tell`` that leaves a finished trial as it is (a job told its pruning) and lets a grid end."""
    try:
        study.tell(trial, value, state=state, skip_if_finished=True)
    except (
        RuntimeError
    ) as err:  # GridSampler calls study.stop() after the last point: only optimize() allows it
        if "Study.stop" not in str(err):
            raise


def retry(study: optuna.Study, number: int, params: dict[str, Any]) -> None:
    """Queue the values of a trial that was cut off: the next batch runs them first (a grid keeps every point)."""
    if params:
        study.enqueue_trial(params, user_attrs={RETRY_OF: number})


@contextmanager
def heartbeat(trials: list[Trial], interval: float) -> Iterator[None]:
    """Mark ``trials`` alive every ``interval`` seconds while the block runs (their jobs)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                with contextlib.suppress(RuntimeError):  # finished meanwhile (a job told its own pruning)
                    trial.set_user_attr(HEARTBEAT, time.time())
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="ftlab-optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def job_overrides(study: optuna.Study, storage_url: str | None, trial: Trial) -> list[str]:
    """The overrides that hand ``trial`` to its job: the study's name and storage, and the trial number."""
    storage = _quoted(storage_url) if storage_url else "null"
    return [
        f"+hydra.job.env_set.{TRIAL_ENV}={trial.number}",
        f"hydra.sweeper.study_name={_quoted(study.study_name)}",
        f"hydra.sweeper.storage={storage}",
    ]


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_trial(sweeper: Any) -> Trial | None:
    """In a job started by the sweeper (``sweeper``: its ``hydra.sweeper`` config): its trial, else ``None``.

    Reopened from the storage; from this process's memory for an in-memory study.
    """
    number, name = os.environ.get(TRIAL_ENV), sweeper.get("study_name")
    if not number or not name:
        return None
    if not sweeper.get("storage"):  # in memory: found only by a job in the sweeper's own process
        return _LIVE.get((name, int(number)))
    storage = open_storage(sweeper["storage"])
    assert storage is not None
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(name), int(number)
    )
    pruner = instantiate(sweeper["pruner"]) if sweeper.get("pruner") else None  # not kept in the storage
    return Trial(optuna.load_study(study_name=name, storage=storage, pruner=pruner), trial_id)
