"""What a sweep's workers are (`Workers`, one class per option of the `workers` config group),
and what every kind needs: remote workers share nothing with the command but the network, so the
study's storage and the tracking store must be servers (`check_remote`).

The sweep command coordinates: it opens the study and the parent MLflow run, then starts the
workers object of `workers=...`, each worker running `python -m abalone.train ARGV` (the user's
command with `workers=local hydra.sweeper.n_jobs=1`, the study's name and storage) with the
environment it is given (the parent run) plus a rank of its own (`abalone.trial.RANK_ENV`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Protocol

from abalone.config import ConfigError
from abalone.redact import redact
from abalone.tracking.store import local_store


class Workers(Protocol):
    """A set of workers of one study."""

    count: int  # how many workers start
    remote: bool  # False: the command runs trials itself and shares this machine's files
    logs: str  # where the workers' output is, for messages

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        """Start the workers, each with `argv` and `env` plus a rank of its own."""

    def poll(self) -> dict[str, str]:
        """Worker name -> "running" | "finished" | "failed: why"."""

    def stop(self) -> None:
        """Stop every worker still running (it fails its running trial and queues it again, as
        on Ctrl-C) and wait for them; idempotent."""


def check_remote(workers: str, storage: str, tracking_cfg) -> None:
    """Refuse a study or MLflow store in a file on this machine when workers run elsewhere."""
    if "://" not in storage or storage.startswith("sqlite:"):
        raise ConfigError(
            f"hydra.sweeper.storage={redact(storage)} is a file on this machine, which "
            f"workers={workers} cannot share (they run in their own file systems, and Optuna's "
            "file storages only lock within one machine); use a database all workers reach, e.g. "
            "hydra.sweeper.storage=postgresql+psycopg2://USER@HOST:5432/DB")
    uri = local_store(tracking_cfg)
    if uri is not None:
        raise ConfigError(
            f"tracking.uri={redact(uri)} is a store on this machine, which workers={workers} "
            "cannot write to; use an MLflow server all workers reach (tracking=server "
            "tracking.uri=http://HOST:5000, or tracking=sagemaker) or tracking.enabled=false")


def thread_share(processes: int) -> dict[str, str]:
    """TensorFlow's threads for one of `processes` training processes on this machine: each one
    would otherwise spread over every core, and the processes would only take turns."""
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    return {name: threads for name in
            ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")}


def exit_status(code: int | None, log: Path | None) -> str:
    """A worker process's state from its exit code, with the last `error:` line of its log."""
    if code is None:
        return "running"
    if code == 0:
        return "finished"
    reason = (f"exit code {code}" if code > 0 else f"killed by {signal.Signals(-code).name}"
              if -code in set(signal.Signals) else f"killed by signal {-code}")
    if log is not None and log.is_file():
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if line.startswith("error: ")]
        if errors:
            reason += f", {errors[-1]}"
    return f"failed: {reason}"
