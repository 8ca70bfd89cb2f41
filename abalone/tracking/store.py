"""The MLflow store a process writes to: a local SQLite file or a server, as the tracking config
names it (`tracking_uri`, `local_store`). A SQLite store is
created (and its schema migrated) by the first request of the first process; MLflow's migration
is not safe from several processes at once, so that request holds a file lock beside the
database (`creating`). A store that fails its first request is named as what it is: the SQLite
file or the tracking server, never one for the other (`cannot_use`)."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from abalone.redact import redact


def tracking_uri(tracking_cfg) -> str:
    """The store the tracking config names: the SageMaker MLflow server of tracking.arn or
    tracking.server_name (looked up), else tracking.uri."""
    if on_sagemaker(tracking_cfg):
        from abalone.aws import sagemaker_tracking_uri

        return sagemaker_tracking_uri(tracking_cfg)
    return tracking_cfg.uri


def on_sagemaker(tracking_cfg) -> bool:
    """Whether tracking.arn or tracking.server_name names a SageMaker MLflow server, which
    tracking.uri then gives way to."""
    return bool(tracking_cfg.arn or tracking_cfg.server_name)


def local_store(tracking_cfg) -> str | None:
    """tracking.uri when runs are tracked in a store in a file on this machine (SQLite, a
    folder), which processes on other hosts cannot write to; None for a server."""
    uri = tracking_cfg.uri or ""
    if tracking_cfg.enabled and not on_sagemaker(tracking_cfg) and (
            "://" not in uri or uri.startswith(("sqlite:", "file:"))):
        return uri
    return None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, else None."""
    if not uri.startswith("sqlite:"):
        return None
    # sqlite:///mlflow.db is relative, sqlite:////abs/mlflow.db absolute: one slash is the URI's.
    return Path(unquote(urlsplit(uri).path)[1:]).resolve()


@contextlib.contextmanager
def creating(uri: str) -> Iterator[None]:
    """Around the first request to a SQLite store: one process at a time creates or migrates
    it (the others then find it made). Nothing for a server."""
    path = sqlite_file(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cannot_use(uri: str, reason: str) -> str:
    """The message of a store that fails its first request."""
    path = sqlite_file(uri)
    if path is not None:
        hint = (" (another process held the file longer than SQLite waits: run again once it "
                "is done, or track on an MLflow server: tracking=server "
                "tracking.uri=http://HOST:5000)" if "database is locked" in reason else "")
        return (f"cannot use the MLflow store {uri} (config key tracking.uri), the SQLite file "
                f"{path}: {reason}{hint}")
    key = "tracking.arn" if uri.startswith("arn:") else "tracking.uri"
    return (f"cannot use the MLflow tracking server at {redact(uri)} (config key {key}): "
            f"{reason}. Check that the server is running and reachable, or run with "
            f"tracking.uri=sqlite:///mlflow.db to track locally.")
