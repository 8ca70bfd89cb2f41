"""The search space: Optuna distributions from Hydra's override grammar (`choice`, `range`,
`interval`, `tag(log, ...)`), each trial's overrides, the grid, and the points a study starts from
(`starting_points`, trials copied from `warm_start_from`)."""

from __future__ import annotations

import math
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Sweep
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import TrialState

from abalone.config import ConfigError
from abalone.study.trials import WARM_START_OF


def search_space(params: dict[str, Any], arguments: list[str]
                 ) -> tuple[dict[str, BaseDistribution], list[str], dict[str, str]]:
    """Split sweep settings and command-line overrides into Optuna distributions, the fixed
    overrides every trial gets, and each swept key's expression as the user wrote it
    (`choice(baseline, wide)`, `wide,deep`). Command-line sweeps replace a sweep file's."""
    parser = OverridesParser.create()
    lines = [f"{key}={value}" for key, value in params.items()]
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    written: dict[str, str] = {}
    for override in parser.parse_overrides(lines) + parser.parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = _distribution(key, override.value())
            written[key] = override.input_line.split("=", 1)[1]
        else:
            space.pop(key, None)
            written.pop(key, None)
            fixed.append(override.input_line)
    return space, fixed, written


def _distribution(key: str, sweep: Any) -> BaseDistribution:
    if isinstance(sweep, ChoiceSweep):
        nested = [value for value in sweep.list if isinstance(value, Sweep)]
        if nested:
            raise ConfigError(f"sweep parameter {key}: a sweep inside a sweep ({nested[0]}) is "
                              "not supported; list the values once, e.g. choice(a, b, c)")
        return CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        values = [sweep.start + i * sweep.step
                  for i in range(max(0, math.ceil((sweep.stop - sweep.start) / sweep.step)))]
        if not values:
            raise ConfigError(f"sweep parameter {key}: range({sweep.start}, {sweep.stop}) is empty")
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)) and not sweep.shuffle:
            return IntDistribution(values[0], values[-1], step=sweep.step)
        return CategoricalDistribution(values)
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    raise ConfigError(f"sweep parameter {key}: {type(sweep).__name__} is not supported; use "
                      "choice(), range(), interval(), int(interval()) or tag(log, interval())")


def trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in params.items()]


def probe_values(space: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Parameter sets that give every key of the space, and every choice of each choice(), at
    least once: composing a trial's config with each shows a misspelt key or option before the
    study exists."""
    widest = max((len(d.choices) for d in space.values()
                  if isinstance(d, CategoricalDistribution)), default=1)
    return [{key: (d.choices[i % len(d.choices)] if isinstance(d, CategoricalDistribution)
                   else d.low) for key, d in space.items()} for i in range(widest)]


def grid_values(space: dict[str, BaseDistribution]) -> dict[str, list]:
    grid = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise ConfigError(f"hydra.sweeper.sampler.name=grid needs choice() or range() for "
                              f"every parameter; {key} is {dist}")
    return grid


def _inside(dist: BaseDistribution, value: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def check_starting_points(points: list[dict[str, Any]], space: dict[str, BaseDistribution],
                          conditional: bool) -> None:
    """Each value inside its parameter's range; keys outside the space only for parameters a
    custom_search_space function samples."""
    for i, point in enumerate(points):
        for key, value in point.items():
            if key in space and not _inside(space[key], value):
                raise ConfigError(f"hydra.sweeper.starting_points[{i}].{key}={value!r} is "
                                  f"outside the search space ({space[key]})")
            if key not in space and not conditional:
                raise ConfigError(f"hydra.sweeper.starting_points[{i}].{key} is not a swept "
                                  f"parameter ({', '.join(space)})")


def copy_trials(study: optuna.Study, source: optuna.Study,
                space: dict[str, BaseDistribution]) -> tuple[int, int]:
    """Add `source`'s COMPLETE trials whose swept parameters all lie in `space`, each once
    (marked WARM_START_OF); return (copied now, incompatible)."""
    copied_before = {t.user_attrs.get(WARM_START_OF) for t in study.get_trials(deepcopy=False)}
    copied = incompatible = 0
    for trial in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        mark = f"{source.study_name}#{trial.number}"
        if mark in copied_before or WARM_START_OF in trial.user_attrs:
            continue
        if not all(k in trial.params and _inside(d, trial.params[k]) for k, d in space.items()):
            incompatible += 1
            continue
        study.add_trial(optuna.trial.create_trial(
            params=trial.params, distributions={**trial.distributions, **space},
            values=trial.values, user_attrs={WARM_START_OF: mark},
            constraints=trial.constraints))
        copied += 1
    return copied, incompatible
