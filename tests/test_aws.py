"""The AWS path with no AWS account: SageMaker managed MLflow through the sagemaker-mlflow plugin
(fake ARN, SigV4-signed requests to a real `mlflow server`), S3 on moto's standalone server,
the name-to-ARN lookup, the IAM policy against the calls made, and the container files."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, free_port, run_cli, start_mlflow_server, stop, wait_for_http

ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/abalone-test"
SECRET = "not-a-real-secret-but-never-logged"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAABALONETEST", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
MODEL = "abalone-tensorflow-model"


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    """moto's standalone server on 127.0.0.1 as the S3 endpoint, with one bucket."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/moto-api/", proc)
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    s3.create_bucket(Bucket="abalone-bucket")
    yield url, s3
    stop(proc)


def keys_in(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="abalone-bucket", Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture
def s3_mlflow_server(tmp_path_factory, moto_s3):
    """An `mlflow server` whose artifact store is S3 (moto), handing out s3:// locations that
    clients write to themselves, as SageMaker managed MLflow does."""
    endpoint, _ = moto_s3
    root = tmp_path_factory.mktemp("s3-mlflow-server")
    prefix = f"mlflow-{root.name}"
    env = {**__import__("os").environ, **AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    url, proc = start_mlflow_server(root, "--default-artifact-root",
                                    f"s3://abalone-bucket/{prefix}", "--no-serve-artifacts",
                                    env=env)
    yield url, prefix
    stop(proc)


class RecordingProxy:
    """Forwards every request to `target` and records method, path and Authorization header."""

    def __init__(self, target: str):
        self.requests: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path,
                                       self.headers.get("Authorization", "")))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "authorization", "content-length")}
                request = urllib.request.Request(target + self.path, data=body or None,
                                                 headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, data, rheaders = response.status, response.read(), response.headers
                except urllib.error.HTTPError as err:
                    status, data, rheaders = err.code, err.read(), err.headers
                self.send_response(status)
                self.send_header("Content-Type", rheaders.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def sagemaker_env(proxy_url: str, s3_endpoint: str) -> dict:
    return {**AWS_ENV, "SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT": proxy_url,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}


def rpc_names(paths: set[str]) -> set[str]:
    """MLflow REST paths -> RPC names (`/api/2.0/mlflow/runs/log-batch` -> `LogBatch`)."""
    from mlflow.server import handlers

    routes = []
    for path, handler, _ in handlers.get_endpoints():
        pattern = re.sub(r"<[^>]+>", "[^/]+", path)
        name = "".join(part.capitalize() for part in handler.__name__.strip("_").split("_"))
        routes.append((re.compile(f"^{pattern}$"), name))
    names = set()
    for path in paths:
        matched = [name for regex, name in routes if regex.match(path.split("?")[0])]
        assert matched, f"no MLflow endpoint matches {path}"
        names.add(matched[0])
    return names


def test_sagemaker_tracking_run_and_sweep_signed_and_in_s3(tmp_path, data_file, moto_s3,
                                                          s3_mlflow_server):
    endpoint, s3 = moto_s3
    server_url, prefix = s3_mlflow_server
    proxy = RecordingProxy(server_url)
    try:
        env = sagemaker_env(proxy.url, endpoint)
        single = run_cli([*TINY, "tracking=sagemaker", f"tracking.arn={ARN}"], cwd=tmp_path,
                         data=data_file, env=env)
        assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
        sweep = run_cli(["-m", "sweep=quick", "trainer.epochs=2", "trainer.verbose=0",
                         "hydra.sweeper.n_trials=2", "tracking=sagemaker", f"tracking.arn={ARN}"],
                        cwd=tmp_path, data=data_file, env=env)
        assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-4000:]
    finally:
        proxy.close()

    # Every request went through the plugin, SigV4-signed for sagemaker-mlflow in the ARN's region.
    assert len(proxy.requests) > 20
    for method, path, authorization in proxy.requests:
        assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIAABALONETEST/"), path
        assert "/us-east-1/sagemaker-mlflow/aws4_request" in authorization, path

    client = MlflowClient(tracking_uri=server_url)
    experiment = client.get_experiment_by_name("abalone-tensorflow-experiment")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("abalone.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 4
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    assert all(r.info.artifact_uri.startswith(f"s3://abalone-bucket/{prefix}/") for r in runs)
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 2  # the single run's and the sweep's best
    assert client.get_model_version_by_alias(MODEL, "champion")
    # The artifacts are in the bucket, written by the client itself.
    keys = keys_in(s3, prefix)
    single_run = [r for r in runs if r not in parents and r not in children][0]
    assert any(k.endswith(f"{single_run.info.run_id}/artifacts/config.yaml") for k in keys)
    assert any(k.endswith("MLmodel") for k in keys)
    assert any(k.endswith("optuna/optimization_history.png") for k in keys)

    # No secret anywhere: not in params, tags, the config artifact, nor the terminal.
    for run in runs:
        assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    config_key = next(k for k in keys if k.endswith(f"{single_run.info.run_id}/artifacts/config.yaml"))
    config_text = s3.get_object(Bucket="abalone-bucket", Key=config_key)["Body"].read().decode()
    assert ARN in config_text and SECRET not in config_text
    assert SECRET not in single.stdout + single.stderr + sweep.stdout + sweep.stderr

    # The IAM policy grants every MLflow action these commands used, and not the UI or deletes
    # of experiments (least privilege).
    policy = json.loads((REPO / "iam" / "mlflow-training-policy.json").read_text())
    granted = {action for statement in policy["Statement"]
               for action in ([statement["Action"]] if isinstance(statement["Action"], str)
                              else statement["Action"])}
    used = {f"sagemaker-mlflow:{name}" for name in rpc_names({p for _, p, _ in proxy.requests})}
    assert used <= granted, sorted(used - granted)
    assert "sagemaker-mlflow:*" not in granted and "sagemaker-mlflow:DeleteExperiment" not in granted


def test_output_s3_uri_uploads_the_run_folder(tmp_path, data_file, moto_s3, s3_mlflow_server):
    endpoint, s3 = moto_s3
    server_url, prefix = s3_mlflow_server
    done = run_cli([*TINY, "tracking=server", f"tracking.uri={server_url}",
                    "output.s3_uri=s3://abalone-bucket/abalone-outputs/"], cwd=tmp_path,
                   data=data_file, env={**AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    client = MlflowClient(tracking_uri=server_url)
    (run,) = client.search_runs([client.get_experiment_by_name(
        "abalone-tensorflow-experiment").experiment_id])
    run_id = run.info.run_id
    uploaded = keys_in(s3, f"abalone-outputs/{run_id}/")
    assert {f"abalone-outputs/{run_id}/{name}" for name in
            ("model.keras", "config.yaml", "plots/learning_curves.png",
             "plots/predicted_vs_actual.png", "plots/residuals.png")} <= uploaded
    assert run.data.tags["output.s3_location"] == f"s3://abalone-bucket/abalone-outputs/{run_id}"
    # ... and the server's S3 artifact store got the MLflow artifacts.
    assert any(k.endswith(f"{run_id}/artifacts/config.yaml") for k in keys_in(s3, prefix))


@pytest.mark.parametrize("args, env, words", [
    (["tracking=sagemaker", "tracking.arn=arn:aws:s3:::not-mlflow"], AWS_ENV,
     "is not a SageMaker MLflow tracking server ARN"),
    (["tracking=sagemaker", f"tracking.arn={ARN}"], {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                                     "AWS_CONFIG_FILE": "/nonexistent",
                                                     "AWS_EC2_METADATA_DISABLED": "true"},
     "needs AWS credentials and none were found"),
    (["tracking=sagemaker"], AWS_ENV, "tracking.uri must be set"),
    (["tracking=sagemaker", "tracking.server_name=x", "tracking.region=null"], AWS_ENV,
     "tracking.server_name needs tracking.region"),
    (["output.s3_uri=https://bucket/x"], AWS_ENV, "output.s3_uri must be an s3://"),
])
def test_aws_setting_errors_are_clear_and_fast(tmp_path, data_file, args, env, words):
    done = run_cli(args, cwd=tmp_path, data=data_file, env=env, timeout=60)
    assert done.returncode == 1
    assert words in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_unreachable_sagemaker_server_fails_within_seconds(tmp_path, data_file):
    import time

    start = time.monotonic()
    done = run_cli(["tracking=sagemaker", f"tracking.arn={ARN}"], cwd=tmp_path, data=data_file,
                   env={**AWS_ENV,
                        "SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert done.returncode == 1
    assert f"cannot use the MLflow tracking server at {ARN} (config key tracking.arn)" in done.stderr
    assert time.monotonic() - start < 45


def test_tracking_server_name_resolves_to_its_arn(monkeypatch):
    from botocore.stub import Stubber

    from abalone import aws

    real_client = boto3.client
    stubbed = real_client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    stubber = Stubber(stubbed)
    stubber.add_response("describe_mlflow_tracking_server",
                         {"TrackingServerArn": ARN, "TrackingServerName": "abalone-test"},
                         {"TrackingServerName": "abalone-test"})
    stubber.add_client_error("describe_mlflow_tracking_server", "ResourceNotFound",
                             "Cannot find tracking server", expected_params={
                                 "TrackingServerName": "missing"})
    stubber.activate()
    monkeypatch.setattr(boto3, "client", lambda service, **kw: stubbed if service == "sagemaker"
                        else real_client(service, **kw))
    assert aws.describe_tracking_server("abalone-test", "us-east-1") == ARN
    with pytest.raises(aws.AwsError, match="tracking.server_name=missing in tracking.region="
                                           "us-east-1: .*Cannot find tracking server"):
        aws.describe_tracking_server("missing", "us-east-1")
    stubber.assert_no_pending_responses()


def test_sagemaker_channel_and_model_dir_are_honoured(tmp_path, data_file, monkeypatch):
    channel, model_dir = tmp_path / "channel", tmp_path / "model"
    channel.mkdir()
    shutil.copy(data_file, channel / "abalone.data")
    done = run_cli(["trainer.epochs=1", "tracking.enabled=false"], cwd=tmp_path, data=None,
                   env={"SM_CHANNEL_TRAINING": str(channel), "SM_MODEL_DIR": str(model_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (model_dir / "model.keras").is_file() and (model_dir / "config.yaml").is_file()


def test_scripts_are_shellcheck_clean():
    scripts = sorted(str(p) for p in [*(REPO / "scripts").glob("*.sh"),
                                      *(REPO / "tests" / "container").glob("*.sh")])
    scripts.append(str(REPO / ".ci/run"))
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or "shellcheck"
    done = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
