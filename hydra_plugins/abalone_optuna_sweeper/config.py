"""Schema of `hydra.sweeper` for the `abalone_optuna` sweeper; a typo in a sweep file fails by name."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


class SamplerName(str, Enum):
    tpe = "tpe"
    random = "random"
    grid = "grid"
    gp = "gp"  # Gaussian process; needs PyTorch (pip install 'abalone[gp]')
    cmaes = "cmaes"
    qmc = "qmc"
    nsgaii = "nsgaii"
    nsgaiii = "nsgaiii"


class QmcType(str, Enum):
    sobol = "sobol"
    halton = "halton"


class StopRule(str, Enum):
    none = "none"
    no_improvement = "no_improvement"  # the best objective has not changed for `patience` trials
    terminator = "terminator"  # Optuna's regret-bound terminator; needs PyTorch like gp


class PrunerName(str, Enum):
    median = "median"
    hyperband = "hyperband"
    successive_halving = "successive_halving"
    none = "none"


class LogModels(str, Enum):
    best = "best"
    all = "all"


class Direction(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


@dataclass
class SamplerConf:
    name: SamplerName = SamplerName.tpe
    seed: Optional[int] = 42  # each extra worker process adds its rank, so workers differ
    n_startup_trials: int = 10  # tpe, gp, cmaes: trials before the model takes over
    deterministic_objective: bool = False  # gp: the objective has no noise
    sigma0: Optional[float] = None  # cmaes: initial step size; null: 1/6 of the space's width
    restart_strategy: Optional[str] = None  # cmaes: null, "ipop" or "bipop"
    qmc_type: QmcType = QmcType.sobol  # qmc
    scramble: bool = True  # qmc
    population_size: int = 50  # nsgaii, nsgaiii: trials per generation
    crossover_prob: float = 0.9  # nsgaii, nsgaiii
    mutation_prob: Optional[float] = None  # nsgaii, nsgaiii; null: 1 / number of parameters


@dataclass
class PrunerConf:
    name: PrunerName = PrunerName.median
    n_startup_trials: int = 5  # median: trials that are never pruned
    n_warmup_steps: int = 5  # median: epochs before a trial can be pruned
    min_resource: int = 3  # hyperband, successive_halving: epochs every trial gets
    reduction_factor: int = 3  # hyperband, successive_halving


@dataclass
class StopConf:
    rule: StopRule = StopRule.none
    # Finished trials before the rule is first checked (no_improvement: also the trials without
    # a better objective that stop the study); after a stop, a rerun with a higher n_trials runs
    # this many more before checking again.
    patience: int = 10


@dataclass
class AbaloneOptunaSweeperConf:
    _target_: str = "hydra_plugins.abalone_optuna_sweeper.sweeper.AbaloneOptunaSweeper"
    # Search space in Hydra's override grammar, key -> expression, e.g.
    # `optimizer.lr: tag(log, interval(1e-4, 1e-1))`. Sweeps typed on the command line
    # (`model=wide,deep`) join it.
    params: Dict[str, Any] = field(default_factory=dict)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # One objective, or lists of the same length for a multi-objective (Pareto) study. A metric
    # is a validation metric Keras logs per epoch (of the weights the run keeps) or a measured
    # model property: params_count, predict_seconds (one batch of 256 rows on this machine).
    direction: Any = Direction.minimize.value
    metric: Any = "val_rmse"
    # Bounds on measured values, e.g. ["params_count <= 20000"]: a trial that breaks one is
    # infeasible (kept in the study, never the champion).
    constraints: List[str] = field(default_factory=list)
    # Parameter sets to run first, e.g. [{model: wide, optimizer.lr: 0.01}]; keys left out are
    # sampled. A set the study already has is not queued again.
    starting_points: List[Dict[str, Any]] = field(default_factory=list)
    # Another study in the same storage whose COMPLETE trials of the same parameters seed this
    # one (copied once, for the sampler only: they do not count towards n_trials).
    warm_start_from: Optional[str] = None
    # "module:function" called with each optuna.Trial after the search space is sampled; it may
    # sample more (trial.suggest_*) and returns {config key: value} overrides for the trial.
    custom_search_space: Optional[str] = None
    stop: StopConf = field(default_factory=StopConf)
    # The study's total of COMPLETE + PRUNED trials; null: the grid's size (grid sampler only).
    n_trials: Optional[int] = None
    n_jobs: int = 1  # trial processes on this machine
    max_failures: int = 5  # failed trials one process tolerates before it stops the sweep
    # best: a trial logs its model (and plots, model.keras) only when its objective is the best
    # so far as it finishes, which the champion's always is; all: every COMPLETE trial does.
    log_models: LogModels = LogModels.best
    # null: a name made from the sweep and its search space, so a rerun resumes the same study.
    study_name: Optional[str] = None
    # A file path (Optuna journal file, safe for processes on one machine) or an SQLAlchemy URL
    # (postgresql://..., for several hosts), or grpc://HOST:PORT: Optuna's storage proxy in front
    # of such a database (python -m abalone.storage_proxy), for large fleets.
    storage: str = "optuna-studies.journal"
    # A Secrets Manager secret ARN holding the database password (plain, or RDS's JSON with
    # username and password): read by every process that opens the storage, so the password is
    # in no URL, command line or training job request.
    storage_password_secret: Optional[str] = None
    # A RUNNING trial whose process on this host is gone, or (other hosts) whose heartbeat is
    # older than this many seconds, is failed and its parameters retried.
    stale_after: int = 600
    sweep_name: Optional[str] = None  # set by sweep files; names the study and the parent run


ConfigStore.instance().store(group="hydra/sweeper", name="abalone_optuna",
                             node=AbaloneOptunaSweeperConf, provider="abalone")
