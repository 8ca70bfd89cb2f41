"""What a started run records in MLflow beside its model (abalone/tracking/runs.py): its
held-out metrics and tags in one request, its files, and why it stopped. abalone/run.py says what
to record; this module says how."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag

from abalone.redact import redact
from abalone.tracking.runs import TrackedRun
from abalone.trial import OBJECTIVE

log = logging.getLogger(__name__)


def say_where(run_id: str, experiment: str) -> None:
    """The terminal line naming a single run, its experiment and the tracking store."""
    log.info("MLflow run %s in experiment %r at %s", run_id, experiment,
             redact(mlflow.get_tracking_uri()))


def log_results(run: TrackedRun, metrics: dict[str, float], tags: dict[str, str],
                objective: tuple[float, int] | None = None) -> None:
    """One request for the held-out metrics, a trial's objective at the epoch whose weights it
    kept, and the tags."""
    now = int(time.time() * 1000)
    entries = [Metric(key, value, now, 0) for key, value in metrics.items()]
    if objective is not None:
        entries.append(Metric(OBJECTIVE, objective[0], now, objective[1]))
    run.client.log_batch(run.run_id, metrics=entries,
                         tags=[RunTag(key, value) for key, value in tags.items()])


def log_files(paths: list[Path], folder: str | None = None) -> None:
    """Files of the active run, in its artifact folder `folder` (None: at the top)."""
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


def epochs_logged(run: TrackedRun) -> int:
    """The epochs the run holds, as its `loss` history in MLflow counts them."""
    return len(run.client.get_metric_history(run.run_id, "loss"))


def log_stop(note: str, objective: tuple[float, int] | None = None) -> None:
    """Why the active run stopped, as its description; a pruned trial's objective, the value it
    was pruned at, at that epoch."""
    if objective is not None:
        mlflow.log_metric(OBJECTIVE, objective[0], step=objective[1])
    mlflow.set_tag("mlflow.note.content", note)
