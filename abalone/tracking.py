"""MLflow: connecting without minutes of retries, riding out the server's outages once
connected, what a run records besides metrics, and where a person looks at the runs."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import random
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, urlsplit, urlunsplit


class _SageMakerHeadersOffArn(logging.Filter):
    """Drops MLflow's warning about the sagemaker-mlflow plugin's request-header provider when
    the tracking URI is not an ARN: the plugin parses every URI as an ARN and fails ("list index
    out of range") on each request. Other providers' errors, and the plugin's on an ARN, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.args[0] if isinstance(record.args, tuple) and record.args else None
        traceback = getattr(error, "__traceback__", None)
        while traceback is not None:
            if traceback.tb_frame.f_globals.get("__name__", "").startswith("sagemaker_mlflow."):
                import mlflow

                return mlflow.get_tracking_uri().startswith("arn:")
            traceback = traceback.tb_next
        return True


# Before MLflow loads the plugin and sends the first request.
logging.getLogger("mlflow.tracking.request_header.registry").addFilter(_SageMakerHeadersOffArn())

import mlflow  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from abalone.config import AbaloneError  # noqa: E402
from abalone.mlflow_server import check_server_version  # noqa: E402

# Config keys whose values are never logged, whatever group they come from.
SECRET_KEY = re.compile(r"secret|password|token|credential|access_key|session_key", re.I)


class TrackingError(AbaloneError):
    """The tracking server cannot be used; the message names the URI and the cause."""


log = logging.getLogger("abalone")

# Answers of a server that is restarting, overloaded or throttling: worth waiting for. Others
# (400, 403, 404, and 500: the server ran the request and failed) are final.
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})


class ServerOutage:
    """Waits out the tracking server's outages, for every request MLflow sends it.

    MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, urllib3's) count attempts of one
    request, log a line per retry and retry HTTP 500 too; here the whole outage has one deadline,
    `grace` seconds from its first failure, shared by all threads (the MLflow logger's sender and
    the main thread): one line when the server becomes unreachable, one when it is back. Once an
    outage has outlasted the grace, requests fail after one attempt until one gets through.
    Requests to hosts that `connect` did not reach (MLflow's telemetry) pass untouched, and so do
    all requests before `connect` has reached the server: a dead server at start-up fails fast.
    """

    MAX_DELAY = 4.0  # seconds between attempts, at most: a restarted server is seen quickly

    def __init__(self):
        self.lock = threading.Lock()
        self.send = None  # MLflow's request function, which this wraps
        self.hosts: set[str] = set()  # host:port of the tracking server (and its artifacts)
        self.learning: int | None = None  # the thread of connect's first request: note its host
        self.server = ""  # the tracking URI, for messages
        self.grace = 0.0
        self.since: float | None = None  # monotonic time of the current outage's first failure
        self.waited = 0  # requests that met the current outage
        self.given_up: str | None = None  # why, once an outage has outlasted the grace

    def install(self) -> None:
        from mlflow.utils import rest_utils

        with self.lock:
            if self.send is None:
                self.send = rest_utils._get_http_response_with_retries
                rest_utils._get_http_response_with_retries = self.request

    def request(self, method, url, max_retries, backoff_factor, backoff_jitter, retry_codes,
                raise_on_status=True, **kwargs):
        """MLflow's `_get_http_response_with_retries`, with its retries replaced by ours."""
        import requests

        host = urlsplit(url).netloc
        if self.learning == threading.get_ident():  # not MLflow's telemetry thread
            self.hosts.add(host)
        if host not in self.hosts or self.grace <= 0:
            return self.send(method, url, max_retries, backoff_factor, backoff_jitter,
                             retry_codes, raise_on_status, **kwargs)
        body = kwargs.get("data")
        body_start = body.tell() if hasattr(body, "seek") else None  # an artifact's file
        attempt, met_outage = 0, False
        while True:
            if attempt and body_start is not None:
                body.seek(body_start)
            retry_after = None
            try:
                response = self.send(method, url, 0, backoff_factor, backoff_jitter,
                                     retry_codes, False, **kwargs)
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as err:
                # urllib3's innermost reason, e.g. "[Errno 111] Connection refused"
                reason = getattr(err.args[0] if err.args else None, "reason", err)
                failure = f"{type(err).__name__}: {str(reason).rsplit(': ', 1)[-1][:200]}"
            else:
                if response.status_code not in TRANSIENT_STATUSES:
                    if self.since is not None or self.given_up:
                        self.back()
                    return response
                failure = f"HTTP {response.status_code} {response.reason}"
                retry_after = response.headers.get("Retry-After")
            remaining = self.failed(failure, first=not met_outage)
            met_outage = True
            delay = min(self.MAX_DELAY, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0)
            if retry_after and retry_after.strip().isdigit():
                delay = max(delay, float(retry_after))
            try:
                time.sleep(max(0.0, min(delay, remaining)))
            except KeyboardInterrupt:
                self.interrupt()
                raise
            attempt += 1

    def failed(self, failure: str, first: bool) -> float:
        """Note a failed attempt; return the seconds of grace left, or raise TrackingError
        once the outage has outlasted the grace."""
        with self.lock:
            now = time.monotonic()
            if self.since is None:
                self.since, self.waited = now, 0
                if not self.given_up:
                    log.warning("MLflow tracking server %s unreachable (%s); requests wait for "
                                "it up to %gs (tracking.outage_grace)", self.server, failure,
                                self.grace)
            self.waited += first
            elapsed = now - self.since
            if self.given_up or elapsed >= self.grace:
                self.given_up = self.given_up or (
                    f"the MLflow tracking server at {self.server} was unreachable for "
                    f"{elapsed:.0f}s, longer than tracking.outage_grace={self.grace:g}s "
                    f"(last: {failure}); run the same command again once it is back (a "
                    "sweep resumes its study)")
                raise TrackingError(self.given_up)
            return self.grace - elapsed

    def interrupt(self) -> None:
        """Ctrl-C during an outage: no thread waits for the server any longer."""
        with self.lock:
            if self.since is not None and not self.given_up:
                self.given_up = (f"interrupted (Ctrl-C) while the MLflow tracking server at "
                                 f"{self.server} was unreachable")

    def back(self) -> None:
        with self.lock:
            if self.since is not None:
                log.info("MLflow tracking server %s back after %.1fs; %d request%s waited",
                         self.server, time.monotonic() - self.since, self.waited,
                         "s" * (self.waited != 1))
            self.since, self.given_up = None, None


OUTAGE = ServerOutage()


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


_connected: dict[tuple[str, str], str] = {}  # (uri, experiment) -> id, for a sweep's trials


def connect(tracking_cfg) -> str:
    """Point MLflow at tracking.uri (or the SageMaker server of tracking.arn/server_name) and
    select the experiment; return its id.

    The first request goes out with no retries and a short timeout, so an unreachable server is
    reported in seconds; later requests wait out an outage for tracking.outage_grace seconds
    (`ServerOutage`).
    """
    if tracking_cfg.arn or tracking_cfg.server_name:
        from abalone.aws import sagemaker_tracking_uri

        uri = sagemaker_tracking_uri(tracking_cfg)
    else:
        uri = tracking_cfg.uri
    mlflow.set_tracking_uri(uri)
    if (uri, tracking_cfg.experiment) in _connected:
        return _connected[uri, tracking_cfg.experiment]
    timeout = str(max(1, int(tracking_cfg.connect_timeout)))
    OUTAGE.install()
    OUTAGE.learning = threading.get_ident()
    try:
        with _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=timeout):
            experiment = mlflow.set_experiment(tracking_cfg.experiment)
    except Exception as err:  # MLflow raises many types here (MlflowException, OSError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(
            f"cannot use the MLflow tracking server at {redact(uri)} (config key "
            f"{'tracking.arn' if uri.startswith('arn:') else 'tracking.uri'}): "
            f"{reason}. Check that the server is running and reachable, or run with "
            f"tracking.uri=sqlite:///mlflow.db to track locally.") from err
    finally:
        OUTAGE.learning = None
    check_server_version(uri, redact(uri), float(timeout))  # before anything trains
    OUTAGE.server, OUTAGE.grace = redact(uri), tracking_cfg.outage_grace
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    _connected[uri, tracking_cfg.experiment] = experiment.experiment_id
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


@functools.cache  # once per process: a sweep's trials run the same code
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
    framework = backend_distribution(backend)
    if framework:
        tags[f"{backend}.distribution"], tags[f"{backend}.version"] = framework
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


# Distributions that install the `tensorflow` module: PyPI's, and the names Deep Learning
# Containers install it under (`tensorflow-cpu`, also from a wheel's URL).
BACKEND_DISTRIBUTIONS = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu",
                                        "tensorflow-intel")}


def backend_distribution(backend: str) -> tuple[str, str] | None:
    """(name, version) of the installed distribution of the Keras backend's framework."""
    for name in BACKEND_DISTRIBUTIONS.get(backend, (backend,)):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return name, importlib.metadata.version(name)
    return None


def model_requirements() -> list[str]:
    """Pinned pip requirements of the logged model (MLflow's inference would load the model)."""
    import keras

    pins = []
    for name in ("mlflow", "keras", "pandas", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{name}=={importlib.metadata.version(name)}")
    framework = backend_distribution(keras.backend.backend())
    if framework:
        pins.append("{}=={}".format(*framework))
    return pins


def log_model(keras_path: Path, rows, predicted) -> str:
    """Log the pyfunc model (abalone/serving.py around the saved Keras model); return its URI."""
    from abalone import serving

    sample = rows[list(serving.FEATURE_COLUMNS)].head(5).reset_index(drop=True)
    info = mlflow.pyfunc.log_model(
        name="model", python_model=serving.__file__,
        artifacts={serving.KERAS_MODEL_ARTIFACT: str(keras_path)},
        signature=mlflow.models.infer_signature(sample, predicted[:5].reshape(-1)),
        input_example=sample, pip_requirements=model_requirements())
    return info.model_uri


def register(model_uri: str, name: str, run_id: str, metrics: dict[str, float],
             tags: dict[str, str] | None = None):
    """Register `model_uri` as a new version of `name`, tagged with its run and metrics."""
    version_tags = {"run_id": run_id, **{k: f"{v:.4f}" for k, v in metrics.items()},
                    **(tags or {})}
    return mlflow.register_model(model_uri, name, tags=version_tags)


def end_failed_run(error: BaseException, is_trial: bool, interrupted: bool = False) -> None:
    """End the active run after `error`: KILLED for Ctrl-C (`interrupted`, when the error is
    what the interrupt became) or a pruned trial, else FAILED."""
    import optuna

    pruned = isinstance(error, optuna.TrialPruned) and not interrupted
    killed = pruned or interrupted or isinstance(error, KeyboardInterrupt)
    try:
        if is_trial:
            mlflow.set_tag("optuna.state", "PRUNED" if pruned else "FAIL")
    finally:
        mlflow.end_run("KILLED" if killed else "FAILED")


def runs_table_url(host: str, experiment_id: str, search_filter: str | None = None) -> str:
    """The MLflow UI's runs table of the experiment (MLflow 3 otherwise opens its GenAI
    overview), filtered by `search_filter` (the search box's syntax) when given."""
    url = f"{host.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&searchFilter={quote(search_filter, safe='')}" if search_filter else "")


def where_to_look(experiment_id: str, search_filter: str | None = None) -> str:
    """Where a person looks at the runs just tracked (MLflow must be connected)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("arn:"):
        return (f"SageMaker Studio > Applications > MLflow > {uri.rsplit('/', 1)[-1]} "
                f"(tracking server {uri})")
    if uri.startswith(("http://", "https://")):
        return runs_table_url(redact(uri), experiment_id, search_filter)
    return (f"mlflow ui --backend-store-uri {redact(uri)}, then "
            f"{runs_table_url('http://127.0.0.1:5000', experiment_id, search_filter)}")


def open_parent_run(client, experiment_id: str, study_name: str, storage: str,
                    params: dict[str, str]) -> str:
    """The sweep's parent run: the study's existing one (resumed), else a new one.

    Processes that start the same sweep at once may each create one; all then agree on the
    oldest and the others delete theirs, so a study keeps one parent run.
    """
    from mlflow.entities import Param

    query = (f"tags.`optuna.study_name` = '{study_name}' and tags.`optuna.storage` = '{storage}'"
             " and tags.`abalone.role` = 'sweep'")

    def oldest():
        runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"])
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

    found = oldest()
    if found is None:
        mine = client.create_run(experiment_id, run_name=study_name, tags={
            "optuna.study_name": study_name, "optuna.storage": storage, "abalone.role": "sweep"})
        found = oldest()
        if found.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
        else:
            client.log_batch(found.info.run_id,
                             params=[Param(k, v[:6000]) for k, v in params.items()])
    if found.info.status != "RUNNING":
        client.update_run(found.info.run_id, status="RUNNING")
    return found.info.run_id


def save_study_plots(study, out_dir: Path, metrics: list[str]) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG
    (of the first metric in a multi-objective study, which adds the Pareto front for two or
    three metrics, infeasible trials greyed); a plot Optuna cannot draw for this study (too few
    trials) is skipped with a log line."""
    import logging
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    target = ({"target": lambda t: t.values[0], "target_name": metrics[0]}
              if len(metrics) > 1 else {})
    plots = dict.fromkeys(("plot_optimization_history", "plot_param_importances",
                           "plot_parallel_coordinate"), target)
    if 1 < len(metrics) <= 3:
        plots["plot_pareto_front"] = {
            "target_names": metrics,
            "constraints_func": lambda t: list(t.constraints.values()) or [0.0]}
    for name, options in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(optuna_plots, name)(study, **options)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            logging.getLogger("abalone").info("skipped %s: %s", name, err)
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        path = out_dir / f"{name.removeprefix('plot_')}.png"
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def save_pareto_table(front, metrics: list[str], path: Path) -> Path:
    """The Pareto front's trials: number, MLflow run, values, parameters; one row each."""
    import csv

    keys = sorted({k for t in front for k in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "mlflow_run_id", *metrics, *keys])
        for t in sorted(front, key=lambda t: t.number):
            writer.writerow([t.number, t.user_attrs.get("mlflow_run_id", ""), *t.values,
                             *(t.params.get(k, "") for k in keys)])
    return path


def register_champion(client, name: str, run_id: str, model_uri: str,
                      metrics: dict[str, float], tags: dict[str, str]) -> str:
    """Register the run's model (once) and give it the `champion` alias only if its test_rmse
    beats the current champion's; return what was done and why."""
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = existing[0] if existing else register(model_uri, name, run_id, metrics, tags)
    what = f"{name} version {version.version} (run {run_id})"
    what = ("already registered: " if existing else "registered ") + what
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    new = metrics.get("test_rmse", float("inf"))
    if champion is not None and str(champion.version) == str(version.version):
        return f"{what}; it is already the champion"
    if champion is not None:
        old = float(champion.tags.get("test_rmse")
                    or client.get_run(champion.run_id).data.metrics.get("test_rmse", "inf"))
        if not new < old:
            return (f"{what} without the champion alias: its test_rmse {new:.4f} does not beat "
                    f"champion version {champion.version} ({old:.4f})")
        reason = f"its test_rmse {new:.4f} beats version {champion.version} ({old:.4f})"
    else:
        reason = "there was no champion"
    client.set_registered_model_alias(name, "champion", str(version.version))
    return f"{what} as champion: {reason}"
