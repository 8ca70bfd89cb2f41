"""A sweep's settings checked and resolved into a `SweepPlan` before any trial runs or any run
exists (each error names its setting), and the study that plan names, opened or resumed."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from omegaconf import DictConfig, OmegaConf

from abalone.config import ConfigError
from abalone.redact import redact, redact_text
from abalone.sweep import objectives, space
from abalone.sweep.algorithms import SETTINGS_USED, check_sampler, require_torch
from abalone.sweep.lock import study_lock

log = logging.getLogger(__name__)


def _value(node: Any) -> str:
    """A setting as text (enum members by their value)."""
    return str(getattr(node, "value", node))


def load_function(spec: str, key: str) -> Callable:
    """The function `module:function` names (the working directory is importable)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}={spec}: {type(err).__name__}: {err} (write module:function)"
                          ) from err


@dataclass
class SweepPlan:
    """What one invocation of a sweep will do, every setting checked."""

    settings: DictConfig  # hydra.sweeper
    space: dict[str, optuna.distributions.BaseDistribution]
    fixed: list[str]  # overrides every trial gets
    space_written: dict[str, str]  # each swept key's expression as the user wrote it
    metrics: list[str]
    directions: list[str]
    constraints: list[objectives.Constraint]
    prune: bool  # False for multi-objective studies
    stop_rule: str
    log_models: str
    n_trials: int
    study_name: str
    storage_label: str  # the storage as logs show it: a resolved path, or the URL redacted
    custom_space: Callable | None = None
    measures: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # Every value the sweep optimises or constrains: what each trial's run must measure.
        self.measures = tuple(dict.fromkeys([*self.metrics, *(c.name for c in self.constraints)]))

    @property
    def metric_label(self) -> str:
        return ", ".join(self.metrics)

    def params(self, workers_choice: str) -> dict[str, str]:
        """The parent run's params: the settings that apply and the search space as written."""
        s = self.settings
        params = {"sweep.name": str(s.sweep_name), "sweep.study_name": self.study_name,
                  "sweep.storage": self.storage_label, "sweep.metric": self.metric_label,
                  "sweep.direction": ", ".join(self.directions),
                  "sweep.n_trials": str(self.n_trials),
                  "sweep.n_jobs": str(s.n_jobs), "sweep.max_failures": str(s.max_failures),
                  "sweep.workers": workers_choice,
                  "sweep.log_models": self.log_models,
                  "sweep.fixed_overrides": redact_text(" ".join(self.fixed))}
        for group in ("sampler", "pruner"):
            conf = OmegaConf.to_container(s[group], enum_to_str=True)
            if group == "pruner" and not self.prune:
                conf["name"] = "none"
            for key in ("name", *SETTINGS_USED[conf["name"]]):
                params[f"sweep.{group}.{key}"] = str(conf[key])
        # The search settings beyond the space, when used.
        if s.constraints:
            params["sweep.constraints"] = "; ".join(s.constraints)
        if s.starting_points:
            params["sweep.starting_points"] = json.dumps(
                OmegaConf.to_container(s.starting_points))
        for key in ("warm_start_from", "custom_search_space"):
            if s[key]:
                params[f"sweep.{key}"] = str(s[key])
        if self.stop_rule != "none":
            params.update({"sweep.stop.rule": self.stop_rule,
                           "sweep.stop.patience": str(s.stop.patience)})
        params.update({f"sweep.space.{k}": v for k, v in self.space_written.items()})
        return params


def _objectives(s: DictConfig) -> tuple[list[str], list[str]]:
    """The metrics and their directions: one each, or lists of one length."""
    metrics = [str(m) for m in (s.metric if OmegaConf.is_list(s.metric) else [s.metric])]
    directions = [_value(d) for d in (s.direction if OmegaConf.is_list(s.direction)
                                      else [s.direction])]
    if not metrics or len(metrics) != len(directions):
        raise ConfigError(f"hydra.sweeper.metric names {len(metrics)} metric(s) but "
                          f"hydra.sweeper.direction has {len(directions)}; give one "
                          "direction per metric")
    for metric in metrics:
        objectives.check_measure(metric, "hydra.sweeper.metric")
    for metric, direction in zip(metrics, directions):
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"hydra.sweeper.direction must be minimize or maximize, got "
                              f"{direction!r}")
        if metric.removeprefix("val_") in objectives.HIGHER_IS_BETTER and direction != "maximize":
            raise ConfigError(f"hydra.sweeper.metric={metric} is better higher: set "
                              "hydra.sweeper.direction=maximize for it")
    return metrics, directions


def _stop_rule(s: DictConfig, n_metrics: int) -> str:
    rule = _value(s.stop.rule)
    if rule != "none":
        if n_metrics > 1:
            raise ConfigError(f"hydra.sweeper.stop.rule={rule} needs a single metric")
        if s.stop.patience < 1:
            raise ConfigError(f"hydra.sweeper.stop.patience must be >= 1, got {s.stop.patience}")
        if rule == "terminator":
            require_torch("hydra.sweeper.stop.rule=terminator")
    return rule


def _n_trials(s: DictConfig, swept: dict) -> int:
    sampler = _value(s.sampler.name)
    if s.n_trials is None:
        if sampler != "grid":
            raise ConfigError(f"hydra.sweeper.n_trials is required with the {sampler} sampler")
        return math.prod(len(v) for v in space.grid_values(swept).values())
    if s.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials must be >= 1, got {s.n_trials}")
    return s.n_trials


def make_plan(s: DictConfig, arguments: list[str]) -> SweepPlan:
    """Check every sweep setting and resolve them (the study's name among them)."""
    swept, fixed, written = space.search_space(OmegaConf.to_container(s.params), arguments)
    if not swept:
        raise ConfigError("nothing to sweep: select a sweep (sweep=quick) or give values to "
                          "try on the command line (model=wide,deep optimizer.lr=0.001,0.01)")
    metrics, directions = _objectives(s)
    constraints = objectives.parse_constraints(list(s.constraints))
    prune = len(metrics) == 1
    if not prune and _value(s.pruner.name) != "none":
        log.info("pruning is off: Optuna cannot prune a multi-objective study "
                 "(hydra.sweeper.pruner.name=%s is ignored)", _value(s.pruner.name))
    custom = (load_function(s.custom_search_space, "hydra.sweeper.custom_search_space")
              if s.custom_search_space else None)
    space.check_starting_points(OmegaConf.to_container(s.starting_points), swept,
                                conditional=custom is not None)
    if custom and _value(s.sampler.name) == "grid":
        raise ConfigError("hydra.sweeper.custom_search_space cannot add parameters to a grid "
                          "(sampler.name=grid); choose another sampler")
    check_sampler(_value(s.sampler.name), swept, len(metrics))
    stop_rule = _stop_rule(s, len(metrics))
    n_trials = _n_trials(s, swept)
    for key in ("n_jobs", "max_failures"):
        if s[key] < 1:
            raise ConfigError(f"hydra.sweeper.{key} must be >= 1, got {s[key]}")
    label = ", ".join(metrics)
    # The sweep's name plus a digest of what defines the study, so reruns resume it.
    spec = json.dumps({"space": {k: repr(v) for k, v in sorted(swept.items())},
                       "fixed": sorted(fixed), "metric": label}, sort_keys=True)
    study_name = s.study_name or (f"{s.sweep_name or 'grid'}-"
                                  f"{hashlib.sha256(spec.encode()).hexdigest()[:8]}")
    storage_label = (redact(s.storage) if "://" in s.storage
                     else str(Path(s.storage).expanduser().resolve()))
    return SweepPlan(s, swept, fixed, written, metrics, directions, constraints, prune,
                     stop_rule, _value(s.log_models), n_trials, study_name, storage_label,
                     custom)


def open_study(plan: SweepPlan, storage, pruner) -> optuna.Study:
    """The plan's study, created or resumed: it must optimise what the plan does. A new one is
    seeded with `warm_start_from`'s trials and the `starting_points`, each once. Its sampler is
    the caller's to set: it is seeded by a rank the study hands out
    (abalone.sweep.algorithms.process_rank)."""
    source = _warm_start_source(plan, storage)
    study = optuna.create_study(study_name=plan.study_name, storage=storage, pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(),
                                directions=plan.directions, load_if_exists=True)
    created = [d.name.lower() for d in study.directions]
    if created != plan.directions:
        raise ConfigError(f"study {plan.study_name!r} in {plan.storage_label} was created to "
                          f"{', '.join(created)}; hydra.sweeper.direction="
                          f"{', '.join(plan.directions)} needs another hydra.sweeper.study_name")
    recorded = study.user_attrs.get("metric")
    if recorded is None:
        study.set_user_attr("metric", plan.metric_label)
    elif recorded != plan.metric_label:
        raise ConfigError(f"study {plan.study_name!r} optimises {recorded}; "
                          f"hydra.sweeper.metric={plan.metric_label} needs another study_name")
    if source is not None:
        copied, incompatible = space.copy_trials(study, source, plan.space)
        log.info("warm start from study %r: %d trials copied now, %d outside this search "
                 "space", source.study_name, copied, incompatible)
    points = OmegaConf.to_container(plan.settings.starting_points)
    if points:
        # skip_if_exists checks, then adds: atomic only under the lock (two hosts at once).
        with study_lock(storage, f"{plan.study_name}.starting-points"):
            for point in points:
                study.enqueue_trial(point, skip_if_exists=True)
    return study


def _warm_start_source(plan: SweepPlan, storage) -> optuna.Study | None:
    """The study `warm_start_from` names, if it optimises what this sweep does."""
    name = plan.settings.warm_start_from
    if not name:
        return None
    try:
        source = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ConfigError(f"hydra.sweeper.warm_start_from={name}: no such study in "
                          f"{plan.storage_label}") from None
    if source.user_attrs.get("metric") != plan.metric_label or [
            d.name.lower() for d in source.directions] != plan.directions:
        raise ConfigError(f"hydra.sweeper.warm_start_from={name}: that study optimises "
                          f"{source.user_attrs.get('metric')}, this one {plan.metric_label}")
    return source
