"""The search space of ``hydra.sweeper.params``: Hydra's sweep syntax read as Optuna distributions.

``interval(a, b)`` is a uniform float (an int when both ends are ints), ``tag(log, interval(a, b))`` its
log-uniform form, ``choice(...)`` (or ``a,b,c``) a categorical, ``range(a, b[, step])`` an int (or stepped float)
from ``a`` to the last value below ``b``, as Hydra's own ``range`` counts. A plain value is fixed in every trial.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial

from ftlab.utils.errors import ConfigError


def parse(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Overrides (``key=<sweep>``) -> (distributions by key, fixed values by key, as override strings)."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    for key in fixed:
        space.pop(key, None)  # a value given on the command line replaces the config's range
    return space, fixed


def distribution(override: Override) -> BaseDistribution:
    """One sweep override as an Optuna distribution."""
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        choices: list[Any] = list(override.sweep_iterator(transformer=Transformer.encode))
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        values: list[Any] = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"hydra.sweeper.params: {override.input_line} is an empty range.")
        step: Any = value.step if value.step is not None else 1
        if all(isinstance(v, int) for v in values) and isinstance(step, int):
            return IntDistribution(int(values[0]), int(values[-1]), step=step)
        return FloatDistribution(
            float(values[0]), float(values[0] + step * (len(values) - 1)), step=float(step)
        )
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        start: Any = value.start
        end: Any = value.end
        if isinstance(start, int) and isinstance(end, int):
            return IntDistribution(start, end, log=log)
        return FloatDistribution(float(start), float(end), log=log)
    raise ConfigError(
        f"hydra.sweeper.params: {override.input_line} is not a search space Optuna can sample; use "
        "interval(a, b), tag(log, interval(a, b)), choice(a, b, ...) or range(a, b[, step])."
    )


def suggest(trial: Trial, space: dict[str, BaseDistribution], fixed: dict[str, str]) -> list[str]:
    """Sample ``trial``'s values (public ``suggest_*`` API) and return the job's overrides."""
    overrides = []
    for key, dist in space.items():
        value: Any
        if isinstance(dist, CategoricalDistribution):
            value = trial.suggest_categorical(key, list(dist.choices))  # type: ignore[arg-type]
        elif isinstance(dist, IntDistribution):
            value = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            assert isinstance(dist, FloatDistribution)
            value = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        overrides.append(f"{key}={value}")
    for key, value in fixed.items():
        trial.set_user_attr(key, value)
        overrides.append(f"{key}={value}")
    return overrides


def grid(space: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """The grid of ``sampler=grid``: every value of each discrete distribution."""
    found: dict[str, list[Any]] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            found[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            found[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            found[key] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise ConfigError(
                f"hydra.sweeper.sampler=grid needs discrete values, but hydra.sweeper.params.{key} is {dist}; "
                f"give it as choice(a, b, ...) or range(a, b, step), or pick another sampler (tpe, random, cmaes)."
            )
    return found
