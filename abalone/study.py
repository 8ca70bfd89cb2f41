"""Optuna studies behind `-m` sweeps: the search space from Hydra's override grammar, storage,
sampler and pruner, the slots that make `n_trials` a study-wide total, and stale trials.

`n_trials` is the study's total, whoever ran the trials, so a rerun resumes and several processes
or hosts share one total. A trial holds a slot when it is COMPLETE, PRUNED, RUNNING, WAITING, or
FAIL because its training raised; a trial interrupted (Ctrl-C) or left RUNNING by a dead process
is failed and its parameters queued again (`retry_of`), and the retry takes its slot. A trial may start only while fewer than
`n_trials` trials numbered before it hold slots; numbers come from the storage, so no two
processes can both take the last slot.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import FrozenTrial, TrialState

from abalone.config import ConfigError

# Samplers' multivariate and constant-liar modes are "experimental" but long stable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HOST = socket.gethostname()
# Metric names: a trial's objective (the sweep's metric for the weights it keeps, or the value it
# was pruned at), and the parent run's best objective so far. Names of their own, so sorting the
# runs table by them ranks trials as the sweep did, and the parent does not sort among them.
OBJECTIVE = "objective"
BEST_OBJECTIVE = "best_objective"
OCCUPYING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@dataclass
class TrialContext:
    """What the sweeper hands to the training run of one trial (same process)."""

    trial: optuna.Trial
    parent_run_id: str | None
    study_name: str
    metric: str
    interrupted: threading.Event  # set by the sweeper's Ctrl-C handler
    study: optuna.Study | None = None  # None: the trial logs its model whatever its value
    log_every_model: bool = False  # hydra.sweeper.log_models=all


ACTIVE_TRIAL: ContextVar[TrialContext | None] = ContextVar("abalone_active_trial", default=None)


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


def make_storage(storage: str) -> optuna.storages.BaseStorage:
    if "://" in storage:
        # Processes starting at once may race to create Optuna's tables; the loser retries.
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
            except Exception:  # sqlalchemy's IntegrityError/ProgrammingError, among others
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
    path = Path(storage).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


# The sampler's and pruner's settings each one uses (the others are ignored and not logged).
SETTINGS_USED = {"tpe": ("seed", "n_startup_trials"), "random": ("seed",), "grid": ("seed",),
                 "median": ("n_startup_trials", "n_warmup_steps"),
                 "hyperband": ("min_resource", "reduction_factor"), "none": ()}


def make_sampler(conf, space: dict[str, BaseDistribution], rank: int) -> optuna.samplers.BaseSampler:
    seed = None if conf.seed is None else conf.seed + rank
    name = str(getattr(conf.name, "value", conf.name))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _GridSampler(grid_values(space), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=conf.n_startup_trials,
                                      multivariate=True, constant_liar=True)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler whose exhaustion check is left to the sweep loop (n_trials = the grid's size):
    the stock one calls Study.stop(), which only works inside Study.optimize()."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


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


def make_pruner(conf, epochs: int) -> optuna.pruners.BasePruner:
    name = str(getattr(conf.name, "value", conf.name))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=conf.n_startup_trials,
                                           n_warmup_steps=conf.n_warmup_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=conf.min_resource, max_resource=epochs,
                                              reduction_factor=conf.reduction_factor)
    return optuna.pruners.NopPruner()


def slot_holders(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count towards n_trials: all but FAIL trials that were queued again
    (`retry_of`) or were surplus."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if t.state in OCCUPYING or (
        t.state == TrialState.FAIL and t.number not in retried
        and not t.user_attrs.get("surplus"))]


def work_left(study: optuna.Study, n_trials: int) -> bool:
    """Whether this process should ask for another trial."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return len(slot_holders(trials)) < n_trials


def within_total(study: optuna.Study, number: int, n_trials: int) -> bool:
    holders = slot_holders(study.get_trials(deepcopy=False))
    return sum(1 for t in holders if t.number < number) < n_trials


def fail_and_retry(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Mark the trial FAIL and queue its parameters again; it gives its slot to the retry.
    Raises if another process finished the trial first."""
    study.tell(trial.number, state=TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def mark_owner(trial: optuna.Trial) -> None:
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("heartbeat", time.time())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study, stale_after: float,
                      on_failed: Callable[[FrozenTrial], None]) -> list[int]:
    """Fail RUNNING trials whose process is gone (or silent for `stale_after` seconds) and queue
    their parameters again."""
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        here = attrs.get("host") == HOST and attrs.get("pid")
        if here and attrs["pid"] == os.getpid():
            continue
        beat = attrs.get("heartbeat") or trial.datetime_start.timestamp()
        if not ((here and not _process_alive(attrs["pid"])) or now - beat > stale_after):
            continue
        try:
            fail_and_retry(study, trial)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first
        failed.append(trial.number)
        on_failed(trial)
    return failed


def logs_model(context: TrialContext, value: float) -> bool:
    """Whether a finished trial with objective `value` logs its model: with every model kept, or
    when it is at least as good as every COMPLETE trial so far. A COMPLETE trial stays COMPLETE,
    so the study's best trial, the one the sweeper registers, always passed this check, also
    when several processes finish trials at once (ties log both)."""
    if context.log_every_model or context.study is None:
        return True
    values = [t.value for t in context.study.get_trials(deepcopy=False,
                                                        states=(TrialState.COMPLETE,))]
    if not values:
        return True
    if context.study.direction == optuna.study.StudyDirection.MAXIMIZE:
        return value >= max(values)
    return value <= min(values)


def kept_value(history: dict[str, list[float]], metric: str, kept_epoch: int) -> float:
    """The sweep's metric at the epoch whose weights the run keeps and logs: ranking trials by
    their best epoch instead would favour noisy curves whose best weights were not kept."""
    if metric not in history:
        raise ConfigError(f"hydra.sweeper.metric={metric} is not logged per epoch; use one of "
                          f"{sorted(k for k in history if k.startswith('val_'))}")
    value = history[metric][kept_epoch]
    return value if math.isfinite(value) else math.nan
