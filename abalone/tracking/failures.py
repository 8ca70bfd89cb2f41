"""How a command's failure outside its own checks reads, in one `error:` line: a full disk (named
by the file it stopped), an outage longer than tracking.outage_grace, or a request the MLflow
store or server refused (HTTP 500 on every `runs/log-batch`, a locked SQLite file), named as
what it is."""

from __future__ import annotations

import mlflow

from abalone.accidents import chain, disk_full_line
from abalone.redact import redact, redact_text
from abalone.tracking.connection import OUTAGE, TrackingError
from abalone.tracking.store import sqlite_file


def first_line(error: BaseException) -> str:
    """An exception's first line, secrets masked, without MLflow's echo of the response."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return redact_text(line.split(" Response body:")[0])[:400]


def failure_reason(error: BaseException) -> str | None:
    """The `error:` line's text for a failure outside the command's own checks: a full disk, an
    outage longer than tracking.outage_grace, or a request the MLflow store or server refused
    (HTTP 500 on every `runs/log-batch`, a locked SQLite file); None for anything else."""
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    store = sqlite_file(uri)
    full = disk_full_line(error, str(store) if store else None)
    if full:
        return full
    if OUTAGE.given_up:
        return OUTAGE.given_up
    refused = next((e for e in chain(error) if isinstance(e, (MlflowException, TrackingError))),
                   None)
    if refused is None:
        return None
    if isinstance(refused, TrackingError):
        return str(refused)
    where = (f"the MLflow store {uri} (the SQLite file {store})" if store
             else f"the MLflow tracking server at {redact(uri)}")
    return f"{where} failed a request: {first_line(refused)}; the run was ended FAILED if it " \
           "took that"
