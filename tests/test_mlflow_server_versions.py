"""Every MLflow tracking server version SageMaker managed MLflow offers (2.13.x, 2.16.x, 3.0.x),
each a real `mlflow server` of that version, from a venv of its own, on 127.0.0.1: our MLflow 3
client works with 3.0 and refuses the 2.x servers before anything trains (a 2.x server lacks the
logged-models API that log_model needs)."""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bench.services import gone, group_members
from conftest import TINY, run_cli, start_mlflow_server, stop, sweep_runs
from venvs import side_venv

# The versions AWS pairs with each server ("Integrate MLflow with your environment"). MLflow
# 3.0.0's server imports SQLAlchemy's FallbackAsyncAdaptedQueuePool, which 2.0.40 removed; the
# older servers get the same pin.
SERVERS = {version: (f"mlflow=={version}", "sqlalchemy<2.0.40")
           for version in ("2.13.2", "2.16.2", "3.0.0")}
EXPERIMENT = "abalone-tensorflow-experiment"


def served_version(url: str) -> str:
    with urllib.request.urlopen(f"{url}/version", timeout=10) as answer:
        return answer.read().decode().strip()


@pytest.fixture
def server_of_version(request, tmp_path_factory):
    version = request.param
    python = side_venv(f"mlflow-{version}", *SERVERS[version]) / "python"
    root = tmp_path_factory.mktemp(f"mlflow-{version}")
    url, proc = start_mlflow_server(root, "--artifacts-destination", str(root / "artifacts"),
                                    python=str(python))
    yield version, url
    stop(proc)


@pytest.mark.slow
def test_stop_ends_a_gunicorn_servers_whole_process_group(tmp_path):
    # MLflow 2.x serves through gunicorn: the `mlflow server` command, gunicorn's master and its
    # worker. A signal to the command alone left the other two running, adopted by init.
    python = side_venv("mlflow-2.13.2", *SERVERS["2.13.2"]) / "python"
    url, proc = start_mlflow_server(tmp_path, python=str(python))
    members = group_members(proc.pid)
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in members]
    assert len(members) == 3 and sum(b"gunicorn" in c for c in commands) == 2, commands
    stop(proc)
    assert group_members(proc.pid) == [] and all(gone(pid) for pid in members)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)


@pytest.mark.slow
@pytest.mark.parametrize("server_of_version", ["2.13.2", "2.16.2"], indirect=True)
def test_a_server_older_than_mlflow_3_is_refused_before_anything_trains(
        server_of_version, tmp_path, data_file):
    version, url = server_of_version
    assert served_version(url) == version  # the server is what its venv says
    tracked = ["tracking=server", f"tracking.uri={url}"]
    for name, args in (("run", [*TINY, *tracked]),
                       ("sweep", ["-m", "sweep=quick", "hydra.sweeper.n_trials=2", *TINY,
                                  *tracked])):
        cwd = tmp_path / name
        cwd.mkdir()
        done = run_cli(args, cwd, data_file)
        assert done.returncode == 1, done.stderr[-3000:]
        assert (f"error: the MLflow tracking server at {url} runs MLflow {version}, and "
                f"abalone's client is MLflow {mlflow.__version__}, which needs a server of "
                f"MLflow 3.0 or newer") in done.stderr, done.stderr[-3000:]
        assert "Nothing was trained. Use a tracking server of MLflow 3.0 or newer" in done.stderr
        assert "Traceback" not in done.stderr and "Epoch 1" not in done.stdout + done.stderr
        assert not list(cwd.rglob("model.keras"))
    client = MlflowClient(tracking_uri=url)
    assert client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id]) == []


@pytest.mark.slow
@pytest.mark.parametrize("server_of_version", ["3.0.0"], indirect=True)
def test_a_mlflow_3_0_server_tracks_a_run_and_a_sweep_whose_champion_predicts(
        server_of_version, tmp_path, data_file, monkeypatch):
    version, url = server_of_version
    assert served_version(url) == version
    tracked = ["tracking=server", f"tracking.uri={url}"]
    run = run_cli([*TINY, *tracked], tmp_path, data_file)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = run_cli(["-m", "sweep=quick", "hydra.sweeper.n_trials=2", *TINY, *tracked], tmp_path,
                    data_file)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "cannot tell the MLflow version" not in run.stderr + sweep.stderr

    client = MlflowClient(tracking_uri=url)
    parents, trials = sweep_runs(client)
    assert len(parents) == 1 and len(trials) == 2
    assert {t.info.status for t in trials} == {"FINISHED"}
    versions = client.search_model_versions("name='abalone-tensorflow-model'")
    assert len(versions) == 2  # the single run's, then the sweep's champion
    champion = max(versions, key=lambda v: int(v.version))
    assert champion.run_id in {t.info.run_id for t in trials}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    model = mlflow.pyfunc.load_model(f"models:/abalone-tensorflow-model/{champion.version}")
    rows = pd.read_csv(data_file, header=None, nrows=5, names=[
        "Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
        "Viscera_weight", "Shell_weight", "Rings"]).drop(columns="Rings")
    predicted = np.asarray(model.predict(rows))
    assert predicted.shape == (5,) and np.isfinite(predicted).all()


def test_a_server_that_hides_its_version_is_let_through_with_a_warning(tmp_path, caplog):
    # A proxy in front of the server may not pass /version: a plain file server here (404).
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from abalone.tracking.server_version import check_server_version

    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with caplog.at_level(logging.WARNING, logger="abalone"):
            check_server_version(url, url, 5)
    finally:
        files.shutdown()
        files.server_close()
    assert (f"cannot tell the MLflow version of the tracking server at {url} (GET /version "
            f"answered HTTP 404") in caplog.text


@pytest.mark.parametrize("mlflow_version, refused", [("2.16.2", True), ("3.0", False)])
def test_a_sagemaker_tracking_servers_version_comes_from_describe_mlflow_tracking_server(
        monkeypatch, mlflow_version, refused):
    # SageMaker's API for DescribeMlflowTrackingServer, answered by a server on 127.0.0.1 that
    # boto3 is pointed at, as at a region's endpoint.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from abalone.tracking.server_version import ServerVersionError, check_server_version

    arn = "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/abalone-test"
    asked = []

    class SageMakerApi(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append((self.headers["X-Amz-Target"], body, self.headers["Authorization"]))
            answer = json.dumps({"TrackingServerArn": arn, "TrackingServerName": "abalone-test",
                                 "MlflowVersion": mlflow_version}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    api = ThreadingHTTPServer(("127.0.0.1", 0), SageMakerApi)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", f"http://127.0.0.1:{api.server_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAABALONETEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    try:
        if refused:
            with pytest.raises(ServerVersionError, match=re.escape(
                    f"the MLflow tracking server at {arn} runs MLflow 2.16.2, and abalone's client "
                    f"is MLflow {mlflow.__version__}")):
                check_server_version(arn, arn, 5)
        else:
            check_server_version(arn, arn, 5)
    finally:
        api.shutdown()
    ((target, body, authorization),) = asked
    assert target == "SageMaker.DescribeMlflowTrackingServer"
    assert body == {"TrackingServerName": "abalone-test"}
    assert "/eu-west-1/sagemaker/aws4_request" in authorization  # the ARN's region
