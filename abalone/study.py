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
import re
import socket
import threading
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import FrozenTrial, TrialState

from abalone.config import AbaloneError, ConfigError
from abalone.tracking import redact

# Samplers' multivariate and constant-liar modes are "experimental" but long stable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HOST = socket.gethostname()


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        return ""


# Pids compare only within one PID namespace: containers on one host share its name (host
# network) but each has pids of its own.
PID_NAMESPACE = _pid_namespace()
# Metric names: a trial's objective (the sweep's metric for the weights it keeps, or the value it
# was pruned at), and the parent run's best objective so far. Names of their own, so sorting the
# runs table by them ranks trials as the sweep did, and the parent does not sort among them.
OBJECTIVE = "objective"
BEST_OBJECTIVE = "best_objective"
CONNECT_TIMEOUT = 5  # seconds to reach a database storage or a storage proxy


class StorageError(AbaloneError):
    """The study's storage cannot be opened; the message names it without its password."""


OCCUPYING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# User attribute of a trial copied from another study (warm_start_from): "<study>#<number>".
WARM_START_OF = "warm_start_of"
# Study user attribute set when the stop rule ends the study: reason, n_trials, after_trial.
STOPPED = "stopped"


@dataclass
class TrialContext:
    """What the sweeper hands to the training run of one trial (same process)."""

    trial: optuna.Trial
    parent_run_id: str | None
    study_name: str
    metric: str  # the first objective: reported per epoch to the pruner, logged as `objective`
    interrupted: threading.Event  # set by the sweeper's Ctrl-C handler
    measures: tuple[str, ...] = ()  # every value the sweep optimises or constrains
    prune: bool = True  # False for multi-objective studies (Optuna cannot prune them)
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


def make_storage(storage: str,
                 password_secret: str | None = None) -> optuna.storages.BaseStorage:
    """The study's storage; `password_secret` (a Secrets Manager ARN) supplies the database
    login, read here in every process, so no URL or command line carries the password."""
    if password_secret and "://" not in storage:
        raise ConfigError("hydra.sweeper.storage_password_secret is for a database storage "
                          f"(postgresql+psycopg2://...), not the file {storage}")
    if storage.startswith("grpc://"):
        if password_secret:
            raise ConfigError("hydra.sweeper.storage_password_secret is for a database storage; "
                              "a storage proxy (grpc://) holds the database login itself")
        return grpc_proxy(storage)
    if "://" in storage:
        import sqlalchemy.exc

        connect_args: dict[str, Any] = {}
        if storage.startswith("postgresql"):  # an unreachable server fails in seconds, not minutes
            connect_args["connect_timeout"] = CONNECT_TIMEOUT
        if password_secret:
            from abalone.aws import secret_login

            user, password = secret_login(password_secret)
            # The driver's own arguments: the URL (which Optuna and logs may show) stays clean.
            connect_args.update(password=password, **({"user": user} if user else {}))
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args}
        # Processes starting at once may race to create Optuna's tables; the loser retries.
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
            except sqlalchemy.exc.OperationalError as err:  # cannot connect: no use retrying
                raise StorageError(f"cannot open the Optuna storage {redact(storage)} (config "
                                   f"key hydra.sweeper.storage): {_first_line(err, storage)}"
                                   ) from None
            except Exception:  # sqlalchemy's IntegrityError/ProgrammingError, among others
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
    path = Path(storage).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _first_line(error: Exception, storage: str) -> str:
    """The driver's reason (psycopg2's first line), with any password in the URL masked."""
    lines = str(getattr(error, "orig", None) or error).strip().splitlines() or [type(error).__name__]
    password = urlsplit(storage).password
    return lines[0].replace(password, "***") if password else lines[0]


def grpc_proxy(storage: str) -> optuna.storages.BaseStorage:
    """A client of Optuna's gRPC storage proxy (`python -m abalone.storage_proxy`), which fails in
    seconds when no proxy answers: gRPC calls would otherwise fail one by one mid-sweep."""
    address = urlsplit(storage)
    try:
        host, port = address.hostname, address.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or not port or address.path.strip("/"):
        raise ConfigError(f"hydra.sweeper.storage={storage}: a storage proxy's address is "
                          "grpc://HOST:PORT")
    proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=CONNECT_TIMEOUT)
    except ConnectionError:
        proxy.close()
        raise ConfigError(f"hydra.sweeper.storage={storage}: no Optuna storage proxy answered "
                          f"within {CONNECT_TIMEOUT} s; start one with `python -m "
                          f"abalone.storage_proxy DATABASE_URL --port {port}`") from None
    return proxy


# The sampler's and pruner's settings each one uses (the others are ignored and not logged).
_GENETIC = ("seed", "population_size", "crossover_prob", "mutation_prob")
SETTINGS_USED = {"tpe": ("seed", "n_startup_trials"), "random": ("seed",), "grid": ("seed",),
                 "gp": ("seed", "n_startup_trials", "deterministic_objective"),
                 "cmaes": ("seed", "n_startup_trials", "sigma0", "restart_strategy"),
                 "qmc": ("seed", "qmc_type", "scramble"), "nsgaii": _GENETIC,
                 "nsgaiii": _GENETIC,
                 "median": ("n_startup_trials", "n_warmup_steps"),
                 "hyperband": ("min_resource", "reduction_factor"), "none": ()}
# Model properties every run measures (abalone.train.model_properties): objectives and
# constraints beside the validation metrics Keras logs.
MEASURED = ("params_count", "predict_seconds")


def make_sampler(conf, space: dict[str, BaseDistribution], rank: int,
                 n_objectives: int = 1) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded per worker; refuses (naming the setting) a space or a
    number of objectives it cannot handle rather than sampling part of it at random."""
    seed = None if conf.seed is None else conf.seed + rank
    name = str(getattr(conf.name, "value", conf.name))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _GridSampler(grid_values(space), seed=seed)
    if name in ("cmaes", "qmc"):
        # Both would hand categorical parameters to an independent random sampler, silently.
        categorical = [k for k, d in space.items() if isinstance(d, CategoricalDistribution)]
        if categorical:
            raise ConfigError(f"hydra.sweeper.sampler.name={name} samples only interval() and "
                              f"integer range() parameters; {', '.join(categorical)} "
                              "is categorical: use tpe, gp or nsgaii for it")
    if name == "cmaes":
        if n_objectives > 1:
            raise ConfigError("hydra.sweeper.sampler.name=cmaes optimises one metric; use "
                              "nsgaii, tpe or gp for a multi-objective sweep")
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=conf.n_startup_trials, sigma0=conf.sigma0,
            restart_strategy=conf.restart_strategy, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(qmc_type=str(getattr(conf.qmc_type, "value",
                                                               conf.qmc_type)),
                                          scramble=conf.scramble, seed=seed,
                                          warn_asynchronous_seeding=False)
    if name == "gp":
        require_torch("hydra.sweeper.sampler.name=gp")
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=conf.n_startup_trials,
                                         deterministic_objective=conf.deterministic_objective)
    if name in ("nsgaii", "nsgaiii"):
        sampler = (optuna.samplers.NSGAIISampler if name == "nsgaii"
                   else optuna.samplers.NSGAIIISampler)
        return sampler(population_size=conf.population_size, crossover_prob=conf.crossover_prob,
                       mutation_prob=conf.mutation_prob, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=conf.n_startup_trials,
                                      multivariate=True, constant_liar=True)


def require_torch(setting: str) -> None:
    """Optuna's Gaussian process (gp sampler, terminator) runs on PyTorch, an extra."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{setting} needs PyTorch, which is not installed: "
                          "pip install 'abalone[gp]'")


@dataclass(frozen=True)
class Constraint:
    """`name <= bound` or `name >= bound` on a measured value."""

    name: str
    bound: float
    at_most: bool

    def violation(self, value: float) -> float:
        """> 0: broken. Stored with Trial.set_constraint, where tpe, gp, nsgaii and nsgaiii
        read it (the other samplers ignore constraints)."""
        return value - self.bound if self.at_most else self.bound - value

    def __str__(self) -> str:
        return f"{self.name} {'<=' if self.at_most else '>='} {self.bound:g}"


def parse_constraints(lines: list[str]) -> list[Constraint]:
    parsed = []
    for i, line in enumerate(lines):
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(<=|>=)\s*(\S+)\s*", str(line))
        try:
            bound = float(match.group(3)) if match else math.nan
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound):
            raise ConfigError(f"hydra.sweeper.constraints[{i}] = {line!r}: write "
                              "'NAME <= NUMBER' or 'NAME >= NUMBER'")
        check_measure(match.group(1), f"hydra.sweeper.constraints[{i}]")
        parsed.append(Constraint(match.group(1), bound, match.group(2) == "<="))
    return parsed


def check_measure(name: str, key: str) -> None:
    """A value a sweep may optimise or constrain: a validation metric or a measured property."""
    if not (str(name).startswith("val_") or name in MEASURED):
        raise ConfigError(f"{key} must be a validation metric (val_...: the test rows never "
                          f"choose a trial) or a measured property ({', '.join(MEASURED)}), "
                          f"got {name!r}")


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


def load_function(spec: str, key: str) -> Callable:
    """The function `module:function` names (the working directory is importable)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}={spec}: {type(err).__name__}: {err} (write module:function)"
                          ) from err


def stagnation(study: optuna.Study, rule: str, patience: int, since: int,
               directions: list[str]) -> str | None:
    """Why the stop rule ends the study now, or None. Only trials numbered from `since` (after
    an earlier stop) count towards the `patience` trials run before the rule is checked."""
    own = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                              TrialState.PRUNED))
           if WARM_START_OF not in t.user_attrs]
    if sum(1 for t in own if t.number >= since) < patience:
        return None
    if rule == "no_improvement":
        best = champion(pareto_front(candidates(study), directions), directions)
        if best is None:
            return None
        after = sum(1 for t in own if t.number > best.number)
        if after < patience:
            return None
        return (f"no better objective in the {after} trials after trial {best.number} "
                f"(stop.rule=no_improvement, stop.patience={patience})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # optuna.terminator: removal in Optuna 6
        from optuna.terminator import MedianErrorEvaluator, RegretBoundEvaluator, Terminator

        improvement = RegretBoundEvaluator()
        terminator = Terminator(improvement, MedianErrorEvaluator(improvement),
                                min_n_trials=patience)
        if not terminator.should_terminate(study):
            return None
    return (f"Optuna's terminator: the regret bound fell below the noise level after "
            f"{len(own)} trials (stop.rule=terminator)")


def is_feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    signs = [1 if d == "minimize" else -1 for d in directions]
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that may become the champion: this study's own COMPLETE, feasible trials (copies
    from `warm_start_from` only inform the sampler)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_feasible(t) and WARM_START_OF not in t.user_attrs]


def pareto_front(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    return [t for t in trials
            if not any(dominates(o.values, t.values, directions) for o in trials)]


def champion(front: list[FrozenTrial], directions: list[str]) -> FrozenTrial | None:
    """The best trial on the first metric within the Pareto front (for one metric the front is
    the best trial(s)); the lowest number breaks ties."""
    if not front:
        return None
    sign = 1 if directions[0] == "minimize" else -1
    return min(front, key=lambda t: (sign * t.values[0], t.number))


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
    (`retry_of`) or were surplus, and copies from another study (`warm_start_from`)."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if WARM_START_OF not in t.user_attrs and (
        t.state in OCCUPYING or (t.state == TrialState.FAIL and t.number not in retried
                                 and not t.user_attrs.get("surplus")))]


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
    trial.set_user_attr("pid_namespace", PID_NAMESPACE)
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
        here = (attrs.get("host") == HOST and attrs.get("pid_namespace") == PID_NAMESPACE
                and attrs.get("pid"))
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
    """Whether a finished trial with `value` on the first metric logs its model: with every model
    kept, or when it is at least as good as every trial that may become the champion so far
    (`candidates`). Those stay candidates, and the champion is the best of them on the first
    metric (also within a Pareto front), so it always passed this check, also when several
    processes finish trials at once (ties log both)."""
    if context.log_every_model or context.study is None:
        return True
    values = [t.values[0] for t in candidates(context.study)]
    if not values:
        return True
    if context.study.directions[0] == optuna.study.StudyDirection.MAXIMIZE:
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
