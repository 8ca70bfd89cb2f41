"""The AWS path with no AWS account: SageMaker managed MLflow through the sagemaker-mlflow plugin
(fake tracking server and App ARNs, SigV4-signed requests to a real `mlflow server`), S3 on moto's
standalone server, the name-to-ARN lookup, ARN partitions, the IAM policies in iam/ against every
request made and against AWS's list of actions, and the container files."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, Proxy, free_port, run_cli, start_mlflow_server, stop

ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/abalone-test"
SECRET = "not-a-real-secret-but-never-logged"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAABALONETEST", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
MODEL = "abalone-tensorflow-model"


def s3_actions_since(log_path: Path, offset: int) -> list[tuple[str, str]]:
    """(IAM action, resource ARN) of each S3 request moto logged after byte `offset`, with the
    permission S3's API reference names for it (PutObject and its multipart parts: s3:PutObject;
    GetObject, HeadObject: s3:GetObject; HeadBucket, ListObjectsV2: s3:ListBucket)."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode()
    found = []
    for method, path in re.findall(r'"([A-Z]+) (/[^ ?"]*)\S* HTTP/1\.1"', text):
        bucket, _, key = path.lstrip("/").partition("/")
        action = {("PUT", True): "s3:PutObject", ("POST", True): "s3:PutObject",
                  ("GET", True): "s3:GetObject", ("HEAD", True): "s3:GetObject",
                  ("GET", False): "s3:ListBucket", ("HEAD", False): "s3:ListBucket"}.get(
                      (method, bool(key)))
        assert action, f"S3 request {method} {path}: name its IAM action here"
        found.append((action, f"arn:aws:s3:::{bucket}" + (f"/{key}" if key else "")))
    return found


def keys_in(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="abalone-bucket", Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture
def s3_mlflow_server(tmp_path_factory, moto_s3):
    """An `mlflow server` whose artifact store is S3 (moto), handing out s3:// locations that
    clients write to themselves, as SageMaker managed MLflow does."""
    endpoint, *_ = moto_s3
    root = tmp_path_factory.mktemp("s3-mlflow-server")
    prefix = f"mlflow-{root.name}"
    env = {**__import__("os").environ, **AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    url, proc = start_mlflow_server(root, "--default-artifact-root",
                                    f"s3://abalone-bucket/{prefix}", "--no-serve-artifacts",
                                    env=env)
    yield url, prefix
    stop(proc)


ARN_HEADERS = ("x-mlflow-sm-tracking-server-arn", "x-sm-mlflow-app-arn")


def sagemaker_proxy(target: str) -> Proxy:
    """A recording proxy in front of `target` whose new model versions come back
    PENDING_REGISTRATION, as SageMaker's automatic model registration may leave them, so MLflow
    polls them as there."""
    def pending(path: str, status: int, body: bytes) -> bytes:
        if status != 200 or not path.endswith("/model-versions/create"):
            return body
        created = json.loads(body)
        created["model_version"]["status"] = "PENDING_REGISTRATION"
        return json.dumps(created).encode()

    return Proxy(target, rewrite=pending)


def signed(requests) -> list[tuple[str, str, str, str]]:
    """(method, path, Authorization header, the ARN header the plugin routes by) of each."""
    found = []
    for method, path, headers in requests:
        lower = {k.lower(): v for k, v in headers.items()}
        found.append((method, path, lower.get("authorization", ""),
                      next((lower[h] for h in ARN_HEADERS if h in lower), "")))
    return found


def sagemaker_env(proxy_url: str, s3_endpoint: str) -> dict:
    return {**AWS_ENV, "SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT": proxy_url,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}


IAM = REPO / "iam"
REST_ACTIONS = json.loads((IAM / "mlflow-rest-actions.json").read_text())
# Values for the policies' placeholders that make them name this file's fake resources.
PLACEHOLDERS = {"PARTITION": "aws", "REGION": "us-east-1", "ACCOUNT_ID": "123456789012",
                "TRACKING_SERVER_NAME": "abalone-test", "MLFLOW_APP_ID": "app-abalonetest",
                "ARTIFACT_BUCKET": "abalone-bucket", "DLC_ACCOUNT_ID": "763104351884",
                "WORKER_ROLE_NAME": "abalone-sagemaker-worker",
                "DB_SECRET_NAME": "abalone-optuna-db", "ECR_REPOSITORY": "abalone-dlc"}
APP_ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-app/app-abalonetest"


def statements(policy_file: str) -> list[dict]:
    """The policy's statements with placeholders filled and Action always a list."""
    text = re.sub(r"\b(" + "|".join(PLACEHOLDERS) + r")\b", lambda m: PLACEHOLDERS[m[1]],
                  (IAM / policy_file).read_text())
    found = json.loads(text)["Statement"]
    for st in found:
        assert not re.search(r"[A-Z]{3,}", st.get("Resource", "")), (policy_file, st["Resource"])
    return [{**st, "Action": [st["Action"]] if isinstance(st["Action"], str) else st["Action"]}
            for st in found]


def allows(policy_file: str, action: str, arn: str) -> bool:
    return any(st["Effect"] == "Allow" and action in st["Action"]
               and fnmatch.fnmatchcase(arn, st["Resource"]) for st in statements(policy_file))


def table_rows(requests) -> list[dict]:
    """The row of iam/mlflow-rest-actions.json for each recorded (method, path)."""
    rows = REST_ACTIONS["mlflow-tracking-server"]["requests"]
    routes = [(row["method"], re.compile("^" + re.sub(r"<[^>]+>", "[^/]+", row["path"]) + "$"),
               row) for row in rows]
    found = []
    for method, path, *_ in requests:
        path = path.split("?")[0]
        matched = [row for m, regex, row in routes if m == method and regex.match(path)]
        assert len(matched) == 1, (f"{method} {path}: no row (or several) in "
                                   "iam/mlflow-rest-actions.json; add its IAM action there")
        found.append(matched[0])
    return found


@pytest.mark.slow
def test_sagemaker_tracking_run_and_sweep_signed_and_in_s3(tmp_path, data_file, moto_s3,
                                                          s3_mlflow_server):
    endpoint, s3, moto_log = moto_s3
    server_url, prefix = s3_mlflow_server
    moto_offset = moto_log.stat().st_size
    proxy = sagemaker_proxy(server_url)
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
    s3_requests = s3_actions_since(moto_log, moto_offset)

    # Every request went through the plugin, SigV4-signed for sagemaker-mlflow in the ARN's region.
    assert len(proxy.requests) > 20
    for method, path, authorization, arn in signed(proxy.requests):
        assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIAABALONETEST/"), path
        assert "/us-east-1/sagemaker-mlflow/aws4_request" in authorization, path
        assert arn == ARN, path

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

    # The tracking server's policy grants, on this server's ARN, the IAM action of every request
    # these commands sent (iam/mlflow-rest-actions.json maps method and path to it) and nothing
    # MLflow-side that no request needs; registration was among them, polling included.
    rows = table_rows(proxy.requests)
    missing = sorted({f"{r['action']} ({r['method']} {r['path']})" for r in rows
                      if not allows("mlflow-training-policy.json", r["action"], ARN)})
    assert not missing, f"iam/mlflow-training-policy.json does not grant {missing}"
    sent = {(r["method"], r["path"]) for r in rows}
    assert {"CreateModelVersion", "GetModelVersion", "SetRegisteredModelAlias",
            "GetModelVersionByAlias", "CreateLoggedModel"} <= {r["mlflow_rpc"] for r in rows}
    table = REST_ACTIONS["mlflow-tracking-server"]["requests"]
    unexplained = [f"{r['method']} {r['path']}" for r in table
                   if (r["method"], r["path"]) not in sent and "sent_when" not in r]
    assert not unexplained, f"rows nothing sent and no sent_when says when: {unexplained}"
    granted = {a for st in statements("mlflow-training-policy.json") for a in st["Action"]
               if a.startswith("sagemaker-mlflow:")}
    assert granted == {r["action"] for r in table}, "the policy grants exactly the table's actions"
    # ... and the client's own S3 requests (it writes the artifacts itself) are granted too.
    assert {action for action, _ in s3_requests} == {"s3:PutObject"}
    for policy in ("mlflow-training-policy.json", "mlflow-app-training-policy.json"):
        assert all(allows(policy, action, arn) for action, arn in s3_requests), policy


@pytest.mark.slow
def test_mlflow_app_requests_signed_for_sagemaker_and_granted(tmp_path, data_file, moto_s3,
                                                                s3_mlflow_server):
    """An MLflow App ARN: the plugin signs for service `sagemaker`, and the App policy's one
    action covers every request a run with registration sends."""
    endpoint, *_ = moto_s3
    server_url, _ = s3_mlflow_server
    proxy = sagemaker_proxy(server_url)
    try:
        done = run_cli([*TINY, "tracking=sagemaker", f"tracking.arn={APP_ARN}"], cwd=tmp_path,
                       data=data_file, env=sagemaker_env(proxy.url, endpoint))
    finally:
        proxy.close()
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    app = REST_ACTIONS["mlflow-app"]
    assert app["signing_name"] == "sagemaker"
    for method, path, authorization, arn in signed(proxy.requests):
        assert f"/us-east-1/{app['signing_name']}/aws4_request" in authorization, path
        assert arn == APP_ARN, path
    rows = table_rows(proxy.requests)  # the same requests as on a tracking server
    assert {"CreateLoggedModel", "CreateModelVersion", "GetModelVersion"} <= {
        r["mlflow_rpc"] for r in rows}
    assert allows("mlflow-app-training-policy.json", app["action"], APP_ARN)
    assert not allows("mlflow-app-training-policy.json", app["action"], APP_ARN + "-other")
    assert not any(a.startswith("sagemaker-mlflow:") for st in
                   statements("mlflow-app-training-policy.json") for a in st["Action"])
    assert MlflowClient(tracking_uri=server_url).search_model_versions(f"name='{MODEL}'")


def test_iam_policies_name_only_actions_in_the_reference():
    reference = json.loads((IAM / "actions-reference.json").read_text())
    known = {f"{prefix}:{name}" for prefix, names in reference["actions"].items()
             for name in names}
    assert len(reference["actions"]["sagemaker-mlflow"]) == 61 and reference["retrieved"]
    assert "sagemaker-mlflow:CreateLoggedModel" not in known
    policies = [p for p in sorted(IAM.glob("*.json")) if "Statement" in json.loads(p.read_text())]
    assert {"mlflow-training-policy.json", "mlflow-app-training-policy.json",
            "ecr-pull-policy.json", "trust-ec2.json", "sagemaker-fleet-policy.json",
            "sagemaker-worker-policy.json"} <= {p.name for p in policies}
    for policy in policies:
        for st in statements(policy.name):
            unknown = sorted(set(st["Action"]) - known)
            assert not unknown, f"{policy.name} statement {st['Sid']} names {unknown}"
    table = [r["action"] for r in REST_ACTIONS["mlflow-tracking-server"]["requests"]]
    assert set(table) | {REST_ACTIONS["mlflow-app"]["action"]} <= known
    # Both MLflow policies give the bucket the same access, so they cannot drift apart.
    s3 = [[st for st in statements(name) if st["Action"][0].startswith("s3:")]
          for name in ("mlflow-training-policy.json", "mlflow-app-training-policy.json")]
    assert s3[0] == s3[1] and s3[0]


def test_rest_actions_table_matches_mlflows_own_routes():
    """Each row's method and path is the route MLflow's service definitions give its RPC."""
    from mlflow.protos import databricks_pb2, model_registry_pb2, service_pb2

    routes = {}
    for module, service in ((service_pb2, "MlflowService"),
                            (model_registry_pb2, "ModelRegistryService")):
        for rpc in module.DESCRIPTOR.services_by_name[service].methods:
            for endpoint in rpc.GetOptions().Extensions[databricks_pb2.rpc].endpoints:
                path = "/api/2.0" + re.sub(r"\{([^}]+)\}", r"<\1>", endpoint.path)
                routes[endpoint.method, path] = rpc.input_type.name
    for row in REST_ACTIONS["mlflow-tracking-server"]["requests"]:
        assert routes.get((row["method"], row["path"])) == row["mlflow_rpc"], row
        same_name = row["action"] == f"sagemaker-mlflow:{row['mlflow_rpc']}"
        assert (row["basis"] == "same-name") == same_name, row
        assert row["basis"] == "same-name" or row.get("reason"), row


@pytest.mark.slow
def test_output_s3_uri_uploads_the_run_folder(tmp_path, data_file, moto_s3, s3_mlflow_server):
    endpoint, s3, moto_log = moto_s3
    server_url, prefix = s3_mlflow_server
    moto_offset = moto_log.stat().st_size
    done = run_cli([*TINY, "tracking=server", f"tracking.uri={server_url}",
                    "output.s3_uri=s3://abalone-bucket/abalone-outputs/"], cwd=tmp_path,
                   data=data_file, env={**AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # The bucket check and the uploads are what the policies' S3 statements grant.
    s3_requests = s3_actions_since(moto_log, moto_offset)
    assert {action for action, _ in s3_requests} == {"s3:ListBucket", "s3:PutObject"}
    assert all(allows("mlflow-training-policy.json", action, arn) for action, arn in s3_requests)
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


@pytest.mark.slow
@pytest.mark.parametrize("args, env, words", [
    (["tracking=sagemaker", "tracking.arn=arn:aws:s3:::not-mlflow"], AWS_ENV,
     "is not a SageMaker MLflow tracking server or MLflow App ARN"),
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


@pytest.mark.parametrize("arn, words", [
    (ARN, None),
    (APP_ARN, None),
    ("arn:aws-us-gov:sagemaker:us-gov-west-1:123456789012:mlflow-tracking-server/x", None),
    ("arn:aws:sagemaker:us-gov-west-1:123456789012:mlflow-tracking-server/x",
     "names partition aws, but region us-gov-west-1 is in partition aws-us-gov"),
    ("arn:aws-cn:sagemaker:cn-north-1:123456789012:mlflow-app/app-x",
     "is in partition aws-cn; the sagemaker-mlflow plugin reaches SageMaker MLflow only in aws "
     "and aws-us-gov"),
    ("arn:aws:sagemaker:us-east-1:123456789012:training-job/x", "is not a SageMaker MLflow"),
])
def test_arn_partition_agrees_with_its_region_and_the_plugin(arn, words):
    from abalone import aws

    if words is None:
        aws.check_arn(arn)
    else:
        with pytest.raises(aws.AwsError, match=re.escape(words)):
            aws.check_arn(arn)


@pytest.mark.slow
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


@pytest.mark.slow
def test_sagemaker_channel_and_model_dir_are_honoured(tmp_path, data_file):
    # Hermetic: no data.path, no $ABALONE_DATA, an empty cache and a download URL nothing answers,
    # so only the channel can provide the data.
    channel, model_dir, home = tmp_path / "channel", tmp_path / "model", tmp_path / "home"
    channel.mkdir()
    home.mkdir()
    shutil.copy(data_file, channel / "abalone.data")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_cli(["trainer.epochs=1", f"tracking.uri={store}", "tracking.register=false",
                    f"data.cache_dir={tmp_path / 'empty-cache'}",
                    f"data.url=http://127.0.0.1:{free_port()}/abalone.data"],
                   cwd=tmp_path, data=None, env={"SM_CHANNEL_TRAINING": str(channel),
                                                 "SM_MODEL_DIR": str(model_dir),
                                                 "HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (model_dir / "model.keras").is_file() and (model_dir / "config.yaml").is_file()
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("abalone-tensorflow-experiment").experiment_id])
    assert run.data.tags["dataset.path"] == str(channel / "abalone.data")


@pytest.mark.slow
def test_scripts_are_shellcheck_clean():
    scripts = sorted(str(p) for p in [*(REPO / "scripts").glob("*.sh"),
                                      *(REPO / "tests" / "container").glob("*.sh")])
    scripts.append(str(REPO / ".ci/run"))
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or "shellcheck"
    done = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
