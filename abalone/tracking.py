"""MLflow: connecting without minutes of retries, and what a run records besides metrics."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import mlflow
from omegaconf import OmegaConf

from abalone.config import AbaloneError

# Config keys whose values are never logged, whatever group they come from.
SECRET_KEY = re.compile(r"secret|password|token|credential|access_key|session_key", re.I)


class TrackingError(AbaloneError):
    """The tracking server cannot be used; the message names the URI and the cause."""


def redact(uri: str) -> str:
    """`uri` without the password of any user:password@ part."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def connect(tracking_cfg) -> str:
    """Point MLflow at tracking.uri and select the experiment; return its id.

    The first request goes out with no retries and a short timeout, so an unreachable server is
    reported in seconds; later requests keep a few quick retries for transient errors.
    """
    uri = tracking_cfg.uri
    mlflow.set_tracking_uri(uri)
    timeout = str(max(1, int(tracking_cfg.connect_timeout)))
    try:
        with _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=timeout):
            experiment = mlflow.set_experiment(tracking_cfg.experiment)
    except Exception as err:  # MLflow raises many types here (MlflowException, OSError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(
            f"cannot use the MLflow tracking server at {redact(uri)} (config key tracking.uri): "
            f"{reason}. Check that the server is running and reachable, or run with "
            f"tracking.uri=sqlite:///mlflow.db to track locally.") from err
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    return experiment.experiment_id


def flat_params(cfg) -> dict[str, str]:
    """The resolved config as MLflow params: `model.units` -> "64"; secrets and passwords left out."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif not SECRET_KEY.search(prefix):
            flat[prefix] = redact(node) if isinstance(node, str) else str(node)

    walk("", OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return flat


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], check=True,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def run_tags(data_path: Path, data_sha256: str) -> dict[str, str]:
    import keras

    backend = keras.backend.backend()
    tags = {
        "dataset.path": str(data_path),
        "dataset.sha256": data_sha256,
        "keras.backend": backend,
        "keras.version": keras.__version__,
        "mlflow.version": mlflow.__version__,
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        tags[f"{backend}.version"] = importlib.metadata.version(backend)
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


def model_requirements() -> list[str]:
    """Pinned pip requirements of the logged model (MLflow's inference would load the model)."""
    import keras

    backend = keras.backend.backend()
    names = ["mlflow", "keras", "pandas", "numpy", {"tensorflow": "tensorflow"}.get(backend, backend)]
    pins = []
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{name}=={importlib.metadata.version(name)}")
    return pins
