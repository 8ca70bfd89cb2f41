"""What the parts of a prepared sweep read of it (`SweepState`, with its launcher's
`LauncherKind`): launching and telling trials (abalone/sweep/batches.py, launchers.py), the
terminal report (report.py) and the workers' coordinator (coordinator.py) get this, not the
whole `Sweep` of abalone/sweep/loop.py."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig

from abalone.sweep.plan import SweepPlan
from abalone.tracking import sweep_runs

log = logging.getLogger(__name__)


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

    def end_stale_run(self, trial) -> None:
        """End the MLflow run of a trial a gone process left RUNNING (abalone.sweep.slots fails
        the trial and queues its parameters again)."""
        log.warning("trial %d was left RUNNING by a process that is gone: marked FAIL, its "
                    "parameters queued again", trial.number)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.client and run_id:
            sweep_runs.end_trial_runs(self.client, [run_id])
