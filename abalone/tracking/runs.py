"""One MLflow run's life and records: `TrackedRun` starts it with its params and tags and ends it
FINISHED, or FAILED/KILLED with why; what a run records besides metrics (the config as params,
provenance tags, the pyfunc model and its requirements); registration; where a person looks."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import mlflow
from omegaconf import OmegaConf

from abalone.accidents import HOST, PID_NAMESPACE, process_alive
from abalone.redact import SECRET_KEY, redact
from abalone.tracking.failures import first_line

log = logging.getLogger(__name__)


class TrackedRun:
    """The life of one MLflow run, as a context manager around the work it records.

    Entering starts the run (nested under `parent_run_id` when given) with its tags and params.
    Leaving it normally ends it FINISHED. Leaving it with an error first closes the epoch
    logger and calls `on_stop(run, error, interrupted)` to record why (best effort: their errors
    are logged, never raised), tags a trial's run with its Optuna state, and ends it KILLED
    (Ctrl-C, or a pruned trial) or FAILED; the error goes on. `interrupted` is the sweep's Ctrl-C
    event: once set, whatever error TensorFlow raised instead of the interrupt counts as one.
    With `experiment_id=None` (tracking.enabled=false) nothing is tracked and `run_id` stays None.
    """

    def __init__(self, experiment_id: str | None, run_name: str | None = None,
                 tags: dict[str, str] | None = None, params: dict[str, str] | None = None,
                 parent_run_id: str | None = None, is_trial: bool = False,
                 interrupted: threading.Event | None = None,
                 on_stop: Callable[[TrackedRun, BaseException, bool], None] | None = None):
        self.experiment_id, self.run_name = experiment_id, run_name
        self.tags, self.params = tags or {}, params or {}
        self.parent_run_id, self.is_trial = parent_run_id, is_trial
        self.interrupted, self.on_stop = interrupted, on_stop
        self.run_id: str | None = None
        self.client: mlflow.MlflowClient | None = None
        self.logger = None  # the run's epoch logger (abalone.callbacks.MlflowLogger), if any

    def __enter__(self) -> TrackedRun:
        if self.experiment_id is None:
            return self
        from abalone.tracking import once

        self.client = mlflow.MlflowClient()
        # Created once however its reply is lost, then made the active run (which resumes it).
        self.run_id = once.create_run(self.client, self.experiment_id, self.run_name, self.tags,
                                      self.parent_run_id).info.run_id
        mlflow.start_run(run_id=self.run_id)
        try:
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v)
                                                       for k, v in self.params.items()])
        except BaseException as error:
            self.__exit__(type(error), error, None)
            raise
        return self

    def was_interrupted(self, error: BaseException) -> bool:
        return isinstance(error, KeyboardInterrupt) or bool(
            self.interrupted and self.interrupted.is_set())

    def __exit__(self, kind, error, traceback) -> bool:
        if self.run_id is None:
            return False
        if error is None:
            mlflow.end_run("FINISHED")
            return False
        import optuna

        interrupted = self.was_interrupted(error)
        pruned = isinstance(error, optuna.TrialPruned) and not interrupted
        try:
            if self.logger is not None:
                self.logger.close()
            if self.on_stop is not None:
                self.on_stop(self, error, interrupted)
        except Exception as record_error:  # noqa: BLE001 - never hides the run's own error
            log.warning("could not record why the MLflow run stopped: %s: %s",
                        type(record_error).__name__, first_line(record_error))
        try:
            if self.is_trial:
                mlflow.set_tag("optuna.state", "PRUNED" if pruned else "FAIL")
        except Exception as tag_error:  # noqa: BLE001 - e.g. the server went away
            log.warning("could not tag the MLflow run: %s: %s", type(tag_error).__name__,
                        first_line(tag_error))
        finally:
            try:
                mlflow.end_run("KILLED" if interrupted or pruned else "FAILED")
            except Exception as end_error:  # noqa: BLE001 - e.g. the server went away
                log.warning("could not end the MLflow run: %s: %s", type(end_error).__name__,
                            first_line(end_error))
        return False


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


def end_runs_of_gone_processes(experiment_id: str) -> list[str]:
    """End FAILED the single runs of this host left RUNNING by a process that is gone (SIGKILL,
    a full disk or store that refused to end them), with a note saying so; their ids."""
    client = mlflow.MlflowClient()
    found = client.search_runs([experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and tags.`abalone.host` = '{HOST}'"), max_results=200)
    ended = []
    for run in found:
        tags = run.data.tags
        if ("mlflow.parentRunId" in tags or tags.get("abalone.pid_namespace") != PID_NAMESPACE
                or not tags.get("abalone.pid", "").isdigit()
                or process_alive(int(tags["abalone.pid"]))):
            continue
        client.set_tag(run.info.run_id, "mlflow.note.content",
                       f"Ended FAILED by a later command: its process ({tags['abalone.pid']} on "
                       f"{HOST}) was gone and had left it RUNNING.")
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    if ended:
        log.warning("ended FAILED %d run(s) left RUNNING by a process that is gone: %s",
                    len(ended), ", ".join(ended))
    return ended


def run_tags(data_tags: dict[str, str]) -> dict[str, str]:
    """Provenance: the data's tags (dataset.path, dataset.sha256, where a remote file came from
    and how it was checked; the table's target, task and inputs), Keras, its backend, MLflow,
    the code's git commit."""
    import keras

    backend = keras.backend.backend()
    tags = {
        **data_tags,
        "keras.backend": backend,
        "keras.version": keras.__version__,
        "mlflow.version": mlflow.__version__,
        # Which process runs it: a later command ends it FAILED if that process is gone.
        "abalone.host": HOST, "abalone.pid_namespace": PID_NAMESPACE,
        "abalone.pid": str(os.getpid()),
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


def log_model(keras_path: Path, rows, predicted, spec_path: Path) -> str:
    """Log the pyfunc model (abalone/serving.py) around the saved Keras model and the table's
    spec (`spec_path`, table.json); return its URI. The signature's inputs and the input example
    are the raw columns of `rows` (registry.input_schema: whole-number columns as Any)."""
    import json

    from abalone import serving
    from abalone.tracking.registry import input_schema

    sample = rows.head(5).reset_index(drop=True)
    spec = json.loads(spec_path.read_text())
    output, params = serving.answer(predicted[:5], spec, False), None
    if spec["task"] != serving.REGRESSION:
        output, params = output.tolist(), {"probabilities": False}  # labels of any type
    inferred = mlflow.models.infer_signature(sample, output, params=params)
    info = mlflow.pyfunc.log_model(
        name="model", python_model=serving.__file__,
        artifacts={serving.KERAS_MODEL_ARTIFACT: str(keras_path),
                   serving.SPEC_ARTIFACT: str(spec_path)},
        signature=mlflow.models.ModelSignature(input_schema(rows), inferred.outputs,
                                               inferred.params),
        input_example=sample, pip_requirements=model_requirements())
    return info.model_uri


_DATASET_INPUTS: dict[tuple, list] = {}  # a sweep's trials log the same rows: infer once


def log_datasets(splits, source: str | Path, sha256: str, target: str) -> None:
    """MLflow's dataset tracking: the training, validation and test rows as the run's inputs
    (source: the file's path or its URL without credentials; digest, schema, row counts), shown
    in the UI's Datasets column."""
    import warnings
    from pathlib import PurePosixPath
    from urllib.parse import urlsplit

    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    parts = (("training", splits.train), ("validation", splits.val), ("test", splits.test))
    file_name = PurePosixPath(urlsplit(str(source)).path).name
    key = (str(source), sha256, target,
           *(int(pd.util.hash_pandas_object(frame).sum()) for _, frame in parts))
    if key not in _DATASET_INPUTS:
        inputs = []
        for context, frame in parts:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MLflow's note on integer columns without nulls
                dataset = mlflow.data.from_pandas(frame.reset_index(drop=True),
                                                  source=str(source), targets=target,
                                                  name=f"{file_name}:{context}")
                entity = dataset._to_mlflow_entity()  # the schema is inferred here
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context),
                                                     InputTag("file.sha256", sha256)]))
        _DATASET_INPUTS.clear()
        _DATASET_INPUTS[key] = inputs
    inputs = _DATASET_INPUTS[key]
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    try:
        client.log_inputs(run_id, datasets=inputs)
    except mlflow.exceptions.MlflowException as err:
        # Runs that log the same new dataset at once (a sweep's first parallel trials) race in
        # the server's look-up-then-insert, and the loser's whole request is refused with its
        # database's unique-constraint error; tried again, it finds the winner's datasets.
        if not any(word in str(err).lower() for word in ("unique constraint", "duplicate entry")):
            raise
        client.log_inputs(run_id, datasets=inputs)


def register(model_uri: str, name: str, run_id: str, metrics: dict[str, float],
             tags: dict[str, str] | None = None):
    """Register `model_uri` as a new version of `name`, tagged with its run and metrics, once
    however its reply is lost (abalone/tracking/once.py)."""
    from abalone.tracking import once

    version_tags = {**{k: f"{v:.4f}" for k, v in metrics.items()}, **(tags or {})}
    return once.register_version(model_uri, name, run_id, version_tags)


def register_checked(model_uri: str, name: str, run_id: str, metrics: dict[str, float], ds):
    """A single run's registration: the name checked again (the store may have changed while
    the run trained), the version tagged with its table's identity (abalone/tracking/registry.py)."""
    from abalone.tracking import registry

    wanted = registry.table_identity(ds)
    registry.check(mlflow.MlflowClient(), name, wanted)
    return register(model_uri, name, run_id, metrics, wanted)


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
