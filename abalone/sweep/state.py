"""What the parts of a prepared sweep read of it (`SweepState`, with its launcher's
`LauncherKind`): launching and telling trials (abalone/sweep/batches.py, launchers.py), the
terminal report (report.py) and the workers' coordinator (coordinator.py) get this, not the
whole `Sweep` of abalone/sweep/loop.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from omegaconf import DictConfig

from abalone.sweep.plan import SweepPlan


@dataclass(frozen=True)
class LauncherKind:
    """What a Hydra launcher is to the sweep (abalone.sweep.launchers.TESTED)."""

    name: str  # as the user selects it: hydra/launcher=NAME
    in_process: bool  # the trial runs in the sweeping process (the context travels in memory)
    same_machine: bool  # its jobs run on this machine (file storages and MLflow stores work)


@dataclass(frozen=True)
class SweepState:
    settings: DictConfig  # hydra.sweeper
    plan: SweepPlan
    study: optuna.Study
    storage: optuna.storages.BaseStorage  # the study's, for locks beside it
    launcher: Any  # Hydra's configured launcher
    launcher_kind: LauncherKind
    interrupted: threading.Event  # set by the sweep's signal handler (abalone.interrupts)
    sweep_dir: Path
    tracking_cfg: DictConfig
    client: Any  # an MlflowClient, or None with tracking.enabled=false
    experiment_id: str | None
    parent_run_id: str | None
    # Ends the MLflow run of a trial a gone process left RUNNING (abalone.sweep.slots).
    end_stale_run: Callable[[optuna.trial.FrozenTrial], None]
