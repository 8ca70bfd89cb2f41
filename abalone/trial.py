"""The contract between a sweep and the training runs of its trials: what a trial's run is handed
(`TrialContext`), the environment names that reach worker processes, and the metric names both
sides log. The sweep fills a context; training reads it and imports nothing of the sweep.
"""

from __future__ import annotations

import math
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

from abalone.config import ConfigError

PARENT_ENV = "ABALONE_SWEEP_PARENT_RUN_ID"  # set for workers: extra processes, containers
RANK_ENV = "ABALONE_SWEEP_WORKER_RANK"  # 1.. for workers, so their samplers differ
# A job of a launcher that runs trials in other processes (joblib, SLURM) finds its trial here
# (abalone.trial_job: trial_override, open_context).
TRIAL_ENV = "ABALONE_TRIAL"
# Metric names: a trial's objective (the sweep's metric for the weights it keeps, or the value it
# was pruned at), and the parent run's best objective so far. Names of their own, so sorting the
# runs table by them ranks trials as the sweep did, and the parent does not sort among them.
OBJECTIVE = "objective"
BEST_OBJECTIVE = "best_objective"
# Model properties every run measures (abalone.model.model_properties): objectives and
# constraints beside the validation metrics Keras logs.
MEASURED = ("params_count", "predict_seconds")


def _every_model(value: float) -> bool:
    return True


@dataclass
class TrialContext:
    """What the sweep hands to the training run of one trial (same process)."""

    trial: Any  # the optuna.Trial: the run reports epochs to it and records its run id on it
    parent_run_id: str | None
    study_name: str
    metric: str  # the first objective: reported per epoch to the pruner, logged as `objective`
    interrupted: threading.Event  # set by the sweep's signal handler (abalone.interrupts)
    measures: tuple[str, ...] = ()  # every value the sweep optimises or constrains
    prune: bool = True  # False for multi-objective studies (Optuna cannot prune them)
    # Whether a finished trial with this value of `metric` logs its model (plots, model.keras).
    logs_model: Callable[[float], bool] = _every_model

    @property
    def maximize(self) -> bool:
        """Whether `metric` is better higher: the study's first direction."""
        return self.trial.study.directions[0].name == "MAXIMIZE"


ACTIVE_TRIAL: ContextVar[TrialContext | None] = ContextVar("abalone_active_trial", default=None)


def kept_value(history: dict[str, list[float]], metric: str, kept_epoch: int) -> float:
    """The sweep's metric at the epoch whose weights the run keeps and logs: ranking trials by
    their best epoch instead would favour noisy curves whose best weights were not kept."""
    if metric not in history:
        raise ConfigError(f"hydra.sweeper.metric={metric} is not logged per epoch; use one of "
                          f"{sorted(k for k in history if k.startswith('val_'))}")
    value = history[metric][kept_epoch]
    return value if math.isfinite(value) else math.nan
