"""The tracking server's MLflow version, checked when connecting, before anything trains.

Our client is MLflow 3 (pyproject: mlflow>=3.0), which logs a model through the logged-models API
that MLflow 2.x servers lack: against a 2.x server (SageMaker managed MLflow offers 2.13.x,
2.16.x and 3.0.x tracking servers) a run would train, then fail at log_model with a 404 on
/api/2.0/mlflow/logged-models, and every trial of a sweep the same way. So a server older than 3.0
is refused at connect time, naming its version, ours and what to do.
"""

from __future__ import annotations

import logging
import re

import mlflow
from packaging.version import InvalidVersion, Version

from abalone.config import AbaloneError

OLDEST_SERVER = Version("3.0")
log = logging.getLogger(__name__)


class ServerVersionError(AbaloneError):
    """The tracking server's MLflow is too old for our client; the message says what to do."""


def server_version(uri: str, timeout: float) -> str | None:
    """The MLflow version of the tracking server at `uri`: a SageMaker tracking server's from
    DescribeMlflowTrackingServer (the job role's policy grants it on the server), any other
    server's from its GET /version; None for an MLflow App (not checked) and for a store MLflow
    opens itself (sqlite, a folder), which is our own MLflow."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    if uri.startswith("arn:"):
        # arn:PARTITION:sagemaker:REGION:ACCOUNT:mlflow-tracking-server/NAME (or mlflow-app/ID)
        region, resource = uri.split(":")[3], uri.split(":", 5)[5]
        kind, _, name = resource.partition("/")
        if kind != "mlflow-tracking-server":
            return None
        import boto3
        from botocore.config import Config

        client = boto3.client("sagemaker", region_name=region, config=Config(
            connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}))
        return client.describe_mlflow_tracking_server(TrackingServerName=name)["MlflowVersion"]
    if uri.split(":", 1)[0] not in ("http", "https"):
        return None
    response = http_request(get_default_host_creds(uri), "/version", "GET", max_retries=0,
                            timeout=timeout, raise_on_status=False)
    text = response.text.strip()
    if response.status_code != 200 or not re.fullmatch(r"\d+\.\d+[\w.+-]*", text):
        raise ValueError(f"GET /version answered HTTP {response.status_code} {text[:80]!r}")
    return text


def check_server_version(uri: str, shown_uri: str, timeout: float) -> None:
    """Raise ServerVersionError if the server at `uri` runs MLflow older than 3.0. A server whose
    version cannot be read (a proxy in front that hides /version, a role without
    DescribeMlflowTrackingServer) is let through, with a warning: it may still be MLflow 3."""
    try:
        version = server_version(uri, timeout)
    except Exception as err:  # requests', MLflow's and ours: all mean "cannot tell"
        log.warning("cannot tell the MLflow version of the tracking server at %s (%s); a server "
                    "older than MLflow 3.0 would fail at log_model after training", shown_uri,
                    str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
        return
    if version is None:
        return
    try:
        too_old = Version(version) < OLDEST_SERVER
    except InvalidVersion:
        return
    if too_old:
        raise ServerVersionError(
            f"the MLflow tracking server at {shown_uri} runs MLflow {version}, and abalone's "
            f"client is MLflow {mlflow.__version__}, which needs a server of MLflow "
            f"{OLDEST_SERVER} or newer (a {version} server has no logged-models API, so every run "
            f"would train and then fail at log_model). Nothing was trained. Use a tracking server "
            f"of MLflow 3.0 or newer (on SageMaker: a tracking server created with MLflow version "
            f"3.0, or an MLflow App), or track locally with tracking.uri=sqlite:///mlflow.db.")
