"""``hydra/sweeper=ftlab_optuna``: its config (samplers and pruners as config groups) and the Sweeper class.

Hydra imports every module under ``hydra_plugins`` at start-up, so this one stays light: Optuna and the search
loop (:mod:`ftlab.search.sweeper`) are imported only when a sweep starts.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf's structured configs read typing's names

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None  # noqa: UP045
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: Optional[bool] = None  # noqa: UP045 - None: Optuna's default
    group: bool = False
    constant_liar: bool = True  # parallel trials: running ones count as bad, so a batch spreads out


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None  # noqa: UP045


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None  # noqa: UP045
    n_startup_trials: int = 1
    sigma0: Optional[float] = None  # noqa: UP045
    popsize: Optional[int] = None  # noqa: UP045
    use_separable_cma: bool = False
    with_margin: bool = False
    consider_pruned_trials: bool = False


@dataclass
class GridSamplerConf:
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True  # the grid comes from hydra.sweeper.params (choice/range), filled in at start
    seed: Optional[int] = None  # noqa: UP045


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # no pruning before this many trials completed
    n_warmup_steps: int = 0  # validations of a trial before it may be pruned
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class ThresholdPrunerConf:
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: Optional[float] = None  # noqa: UP045 - prune below this value (or NaN)
    upper: Optional[float] = None  # noqa: UP045 - prune above it
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class FtlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.ftlab_optuna_sweeper.ftlab_optuna_sweeper.FtlabOptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])  # noqa: UP006
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "minimize"  # or maximize
    # null: in memory (jobs in this process); journal://<file>, or any SQLAlchemy URL (sqlite:///<file>, ...)
    storage: Optional[str] = None  # noqa: UP045
    study_name: Optional[str] = None  # noqa: UP045
    n_trials: int = 20  # over every process that shares the study
    n_jobs: int = 1  # trials per batch: launched together (in parallel with a parallel launcher)
    max_failure_rate: float = 0.0  # stop when more than this share of a batch failed
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    heartbeat_interval: float = 30.0  # seconds between the sweeper's "still running" marks on its trials
    grace_period: float = 300.0  # a running trial without a mark for this long was lost: failed, not counted


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="ftlab_optuna", node=FtlabOptunaSweeperConf, provider="ftlab")
_choices: Dict[str, Dict[str, Any]] = {  # noqa: UP006
    "hydra/sweeper/sampler": {
        "tpe": TPESamplerConf, "random": RandomSamplerConf, "cmaes": CmaEsSamplerConf, "grid": GridSamplerConf,
    },
    "hydra/sweeper/pruner": {
        "median": MedianPrunerConf, "asha": SuccessiveHalvingPrunerConf, "hyperband": HyperbandPrunerConf,
        "threshold": ThresholdPrunerConf, "none": NopPrunerConf,
    },
}  # fmt: skip
for _group, _options in _choices.items():
    for _name, _node in _options.items():
        _store.store(group=_group, name=_name, node=_node, provider="ftlab")


class FtlabOptunaSweeper(Sweeper):
    """Hydra's entry point; the work is :class:`ftlab.search.sweeper.OptunaSearch`."""

    def __init__(self, **conf: Any) -> None:
        from ftlab.search.sweeper import OptunaSearch

        self.search = OptunaSearch(**conf)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:  # noqa: UP006
        self.search.sweep(arguments)
