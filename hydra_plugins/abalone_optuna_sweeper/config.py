"""Schema of `hydra.sweeper` for the `abalone_optuna` sweeper; a typo in a sweep file fails by name."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


class SamplerName(str, Enum):
    tpe = "tpe"
    random = "random"
    grid = "grid"


class PrunerName(str, Enum):
    median = "median"
    hyperband = "hyperband"
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
    n_startup_trials: int = 10  # tpe: random trials before the model takes over


@dataclass
class PrunerConf:
    name: PrunerName = PrunerName.median
    n_startup_trials: int = 5  # median: trials that are never pruned
    n_warmup_steps: int = 5  # median: epochs before a trial can be pruned
    min_resource: int = 3  # hyperband: epochs every trial gets
    reduction_factor: int = 3  # hyperband


@dataclass
class AbaloneOptunaSweeperConf:
    _target_: str = "hydra_plugins.abalone_optuna_sweeper.sweeper.AbaloneOptunaSweeper"
    # Search space in Hydra's override grammar, key -> expression, e.g.
    # `optimizer.lr: tag(log, interval(1e-4, 1e-1))`. Sweeps typed on the command line
    # (`model=wide,deep`) join it.
    params: Dict[str, Any] = field(default_factory=dict)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    direction: Direction = Direction.minimize
    metric: str = "val_rmse"  # a validation metric Keras logs per epoch; best epoch counts
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
    # (postgresql://..., for several hosts).
    storage: str = "optuna-studies.journal"
    # A RUNNING trial whose process on this host is gone, or (other hosts) whose heartbeat is
    # older than this many seconds, is failed and its parameters retried.
    stale_after: int = 600
    sweep_name: Optional[str] = None  # set by sweep files; names the study and the parent run


ConfigStore.instance().store(group="hydra/sweeper", name="abalone_optuna",
                             node=AbaloneOptunaSweeperConf, provider="abalone")
