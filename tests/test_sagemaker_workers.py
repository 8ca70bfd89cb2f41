"""workers=sagemaker without an AWS account: the CreateTrainingJob requests as moto's SageMaker
records them off the wire (every field, no secret), DescribeTrainingJob and StopTrainingJob
(botocore's Stubber, which moto lacks), and the recorded jobs started as SageMaker starts them
(our image via Podman: `IMAGE train <ContainerArguments>`, the job's environment, the channel and
/opt/ml folders) joining one study in PostgreSQL, whose password they read from moto's Secrets
Manager, until it is finished."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import boto3
import optuna
import pytest
from botocore.stub import ANY, Stubber
from mlflow.tracking import MlflowClient

from conftest import REPO, moto_server, opt_ml_folders, run_cli, scrubbed_environ
from test_aws import allows

from abalone import aws
from abalone.config import ConfigError
from abalone.study.storage import make_storage
from abalone.workers import SageMakerWorkers

# The image URI of requests nothing runs (the test that runs its jobs uses the session's image).
IMAGE = "localhost/abalone-dlc-fleet-test:latest"
ACCOUNT = "123456789012"  # moto's
ROLE = f"arn:aws:iam::{ACCOUNT}:role/abalone-sagemaker-worker"
DB_PASSWORD = "fleet-db-password-never-in-a-request"
AWS_SECRET = "fake-secret-key-never-in-a-request"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAFLEETTEST", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
SETTINGS = dict(count=2, image_uri=IMAGE, role_arn=ROLE, output_s3_uri="s3://abalone-bucket/jobs",
                data_s3_uri="s3://abalone-bucket/data/", region="us-east-1",
                instance_type="ml.m5.large", instance_count=1, volume_size_gb=30,
                max_runtime_seconds=3600, spot=True, max_wait_seconds=7200,
                subnets=["subnet-0abc"], security_group_ids=["sg-0abc"],
                job_name_prefix="abalone", tags={"team": "ml"},
                environment={"TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.fixture
def moto_aws(tmp_path, monkeypatch):
    """moto's server on 127.0.0.1 recording every request it serves, as this process's AWS."""
    recording = tmp_path / "moto-recording.jsonl"
    with moto_server(tmp_path / "moto.log", env={
            "PATH": "/usr/bin:/bin", "MOTO_ENABLE_RECORDING": "true",
            "MOTO_RECORDER_FILEPATH": str(recording)}) as url:
        for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": url}.items():
            monkeypatch.setenv(key, value)
        yield url, recording


def recorded(recording: Path, operation: str) -> list[dict]:
    """The JSON bodies of the recorded requests for a SageMaker or Secrets Manager operation."""
    found = []
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        if entry["headers"].get("X-Amz-Target", "").endswith(f".{operation}"):
            body = entry["body"]
            found.append(json.loads(base64.b64decode(body) if entry["body_encoded"] else body))
    return found


@pytest.fixture
def fleet_database(postgres_url):
    """The test's database owned by a role that must log in with a password (a rule ahead of the
    cluster's `trust`), as on RDS; returns its URL without the password."""
    import psycopg2

    admin = postgres_url.replace("postgresql+psycopg2", "postgresql")
    name = admin.rsplit("/", 1)[1]
    connection = psycopg2.connect(admin)
    connection.autocommit = True
    with connection.cursor() as cursor:
        # One role for the session's tests (another test's database may still be its own).
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = 'abalone_fleet'")
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE ROLE abalone_fleet LOGIN PASSWORD '{DB_PASSWORD}'")
        cursor.execute(f"ALTER DATABASE {name} OWNER TO abalone_fleet")
        cursor.execute("SHOW hba_file")
        hba = Path(cursor.fetchone()[0])
        hba.write_text(f"host {name} abalone_fleet 127.0.0.1/32 scram-sha-256\n"
                       + hba.read_text())
        cursor.execute("SELECT pg_reload_conf()")
    connection.close()
    url = postgres_url.replace("postgres@", "abalone_fleet@")
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(url.replace("postgresql+psycopg2", "postgresql"))
    return url


def host_folders(root: Path, data_file: Path) -> Path:
    """/opt/ml for one host of a job with ContainerArguments only (no hyperparameters)."""
    return opt_ml_folders(root, data_file, "{}", {"current_host": "algo-1", "hosts": ["algo-1"],
                                                  "network_interface_name": "eth0"})


def start_like_sagemaker(env: dict, request: dict, opt_ml: Path, moto_url: str):
    """`podman run IMAGE <ContainerArguments>` with the job's environment; SageMaker's side
    (the job role's credentials, the region) added as SageMaker adds it, outside the request."""
    mounts = [arg for sub in ("input/data/training", "input/config", "model", "output")
              for arg in ("-v", f"{opt_ml / sub}:/opt/ml/{sub}")]
    variables = {**request["Environment"], **AWS_ENV, "AWS_ENDPOINT_URL": moto_url}
    spec = request["AlgorithmSpecification"]
    return subprocess.Popen(
        ["podman", "run", "--rm", "--network=host", *mounts,
         *(arg for key in variables for arg in ("-e", key)), spec["TrainingImage"],
         *spec["ContainerArguments"]],
        env={**env, **variables}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.postgres
def test_recorded_jobs_hold_every_field_no_secret_and_finish_the_study(
        tmp_path, data_file, moto_aws, fleet_database, mlflow_server, podman_env, project_image):
    moto_url, recording = moto_aws
    secret_arn = boto3.client("secretsmanager").create_secret(
        Name="abalone-optuna-db",
        SecretString=json.dumps({"username": "abalone_fleet", "password": DB_PASSWORD}))["ARN"]

    # The coordinator's part: the parent run, then the workers with its argv and environment.
    from abalone.tracking import sweep_runs

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment("abalone-tensorflow-experiment")
    parent = sweep_runs.open_parent_run(client, experiment_id, "fleet-test", "pg", {})
    argv = ["-m", "sweep=quick", "trainer.epochs=2", "trainer.patience=0",
            "hydra.sweeper.n_trials=3", "tracking=server", f"tracking.uri={mlflow_server}",
            "hydra.sweeper.n_jobs=1", "hydra.sweeper.study_name=fleet-test",
            f"hydra.sweeper.storage={fleet_database}",
            f"hydra.sweeper.storage_password_secret={secret_arn}"]
    env = {"ABALONE_SWEEP_PARENT_RUN_ID": parent, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    workers = SageMakerWorkers(**{**SETTINGS, "image_uri": project_image})
    workers.start(argv, env)

    requests = recorded(recording, "CreateTrainingJob")
    names = [r["TrainingJobName"] for r in requests]
    assert names == workers.jobs and len(set(names)) == 2
    stamp = re.match(r"^abalone-fleet-test-(\d{6}-\d{6}-[0-9a-f]{4})-1$", names[0])[1]
    assert names[1] == f"abalone-fleet-test-{stamp}-2"
    for rank, request in enumerate(requests, start=1):
        assert JOB_NAME.match(request["TrainingJobName"])
        assert request == {
            "TrainingJobName": f"abalone-fleet-test-{stamp}-{rank}",
            "RoleArn": ROLE,
            "AlgorithmSpecification": {"TrainingImage": project_image,
                                       "TrainingInputMode": "File",
                                       "ContainerArguments": ["train", *argv]},
            "Environment": {"TF_CPP_MIN_LOG_LEVEL": "2", **env,
                            "ABALONE_SWEEP_WORKER_RANK": str(rank)},
            "InputDataConfig": [{"ChannelName": "training", "InputMode": "File", "DataSource": {
                "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://abalone-bucket/data/",
                                 "S3DataDistributionType": "FullyReplicated"}}}],
            "OutputDataConfig": {"S3OutputPath": "s3://abalone-bucket/jobs"},
            "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1,
                               "VolumeSizeInGB": 30},
            "VpcConfig": {"Subnets": ["subnet-0abc"], "SecurityGroupIds": ["sg-0abc"]},
            "StoppingCondition": {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200},
            "EnableManagedSpotTraining": True,
            "Tags": [{"Key": "abalone:study", "Value": "fleet-test"},
                     {"Key": "abalone:worker-rank", "Value": str(rank)},
                     {"Key": "team", "Value": "ml"}]}
        # The coordinator's policy allows each request on its job, and handing over the role.
        job_arn = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/{request['TrainingJobName']}"
        for action in ("CreateTrainingJob", "AddTags", "DescribeTrainingJob", "StopTrainingJob"):
            assert allows("sagemaker-fleet-policy.json", f"sagemaker:{action}", job_arn), action
        assert allows("sagemaker-fleet-policy.json", "iam:PassRole", request["RoleArn"])
    # Nothing secret went over the wire, not even encoded.
    sent = recording.read_text()
    for secret in (DB_PASSWORD, AWS_SECRET):
        assert secret not in sent
        assert base64.b64encode(secret.encode()).decode()[:16] not in sent
    assert workers.poll() == {name: "finished" for name in names}  # moto's jobs end at once

    # The recorded jobs, started as SageMaker starts them, share the study until it is done.
    started = [start_like_sagemaker(podman_env, request, host_folders(
        tmp_path / f"host-{rank}", data_file), moto_url)
        for rank, request in enumerate(requests, start=1)]
    logs = [proc.communicate(timeout=900)[0] for proc in started]
    for proc, log in zip(started, logs):
        assert proc.returncode == 0, log[-5000:]
        assert DB_PASSWORD not in log and AWS_SECRET not in log
    storage = make_storage(fleet_database, secret_arn)  # as every worker opened it
    trials = optuna.load_study(study_name="fleet-test", storage=storage).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 3, states
    assert "RUNNING" not in states and "WAITING" not in states
    assert len({t.number for t in trials}) == len(trials)
    # The job role reads the secret it names; every trial is nested under the one parent run.
    assert recorded(recording, "GetSecretValue")
    assert allows("sagemaker-worker-policy.json", "secretsmanager:GetSecretValue", secret_arn)
    runs = client.search_runs([experiment_id])
    nested = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert nested == {t.user_attrs["mlflow_run_id"] for t in trials
                      if not t.user_attrs.get("surplus")}
    assert len(runs) == len(nested) + 1
    for run in runs:
        assert DB_PASSWORD not in json.dumps({**run.data.params, **run.data.tags})


@pytest.mark.parametrize("argv, env, settings, words", [
    (["hydra.sweeper.storage=postgresql+psycopg2://optuna:hunter2@db/optuna?sslmode=require"],
     {}, {},
     "container argument 1 (hydra.sweeper.storage) holds a URL with a password"),
    (["tracking.uri=https://user:hunter2@mlflow.internal"], {}, {},
     "container argument 1 (tracking.uri) holds a URL with a password"),
    ([], {"AWS_SECRET_ACCESS_KEY": "hunter2"}, {},
     "environment variable (AWS_SECRET_ACCESS_KEY) is named like a secret"),
    ([], {}, {"environment": {"MLFLOW_TRACKING_TOKEN": "hunter2"}},
     "environment variable (MLFLOW_TRACKING_TOKEN) is named like a secret"),
    (["hydra.sweeper.storage_password_secret=hunter2"], {}, {},
     "container argument 1 (hydra.sweeper.storage_password_secret) is named like a secret"),
    ([], {"NOTE": "AKIAIOSFODNN7EXAMPLE"}, {},
     "environment variable (NOTE) holds an AWS access key id"),
    ([], {}, {"tags": {"owner": AWS_SECRET}}, "tag (owner) holds this session's AWS credentials"),
])
def test_a_request_with_a_secret_is_refused_before_anything_is_sent(monkeypatch, argv, env,
                                                                   settings, words):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFLEETTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    workers = SageMakerWorkers(**{**SETTINGS, **settings})
    with pytest.raises(aws.AwsError) as raised:
        workers.start(argv, env)
    message = str(raised.value)
    assert words in message and "hydra.sweeper.storage_password_secret=<secret ARN>" in message
    assert "hunter2" not in message and AWS_SECRET not in message
    assert workers.jobs == [] and workers._client is None  # no client, no request


def stubbed(workers: SageMakerWorkers) -> Stubber:
    workers._client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                                   aws_secret_access_key="x")
    stubber = Stubber(workers._client)
    stubber.activate()
    return stubber


def test_poll_follows_the_jobs_and_stop_stops_each_one_still_running():
    workers = SageMakerWorkers(**{**SETTINGS, "count": 3})
    stubber = stubbed(workers)
    arn = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/x"
    for _ in range(3):
        stubber.add_response("create_training_job", {"TrainingJobArn": arn})
    workers.start(["hydra.sweeper.study_name=quick-1a2b3c4d"], {})
    one, two, three = workers.jobs
    for name, status, extra in ((one, "InProgress", {}), (two, "Failed",
                                {"FailureReason": "error: trainer.epochs must be >= 1"}),
                                (three, "Completed", {})):
        stubber.add_response("describe_training_job", {
            "TrainingJobName": name, "TrainingJobArn": arn, "TrainingJobStatus": status,
            "SecondaryStatus": status, "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "ResourceConfig": {"InstanceCount": 1, "VolumeSizeInGB": 30},
            "StoppingCondition": {}, "CreationTime": 0, "ModelArtifacts": {
                "S3ModelArtifacts": "s3://x"}, **extra}, {"TrainingJobName": name})
    assert workers.poll() == {one: "running", two: "failed: error: trainer.epochs must be >= 1",
                              three: "finished"}
    # Ctrl-C: the coordinator stops its workers; only the running job needs StopTrainingJob,
    # and a second stop sends nothing (the Stubber refuses any request it was not given).
    stubber.add_response("stop_training_job", {}, {"TrainingJobName": one})
    workers.stop()
    workers.stop()
    stubber.assert_no_pending_responses()


def test_a_failed_start_stops_the_jobs_it_created():
    workers = SageMakerWorkers(**SETTINGS)
    stubber = stubbed(workers)
    stubber.add_response("create_training_job", {"TrainingJobArn": "arn:x"})
    stubber.add_client_error("create_training_job", "ResourceLimitExceeded",
                             "The account-level service limit for ml.m5.large is 1 instance")
    stubber.add_response("stop_training_job", {}, {"TrainingJobName": ANY})
    with pytest.raises(aws.AwsError, match=r"cannot create training job abalone-\S+-2: .*"
                                           "ResourceLimitExceeded"):
        workers.start([], {})
    stubber.assert_no_pending_responses()
    assert len(workers.jobs) == 1


def test_every_host_of_every_job_gets_a_rank_of_its_own(tmp_path, monkeypatch):
    from abalone import container

    workers = SageMakerWorkers(**{**SETTINGS, "count": 2, "instance_count": 2})
    first_ranks = [r["Environment"]["ABALONE_SWEEP_WORKER_RANK"]
                   for r in workers.requests(["hydra.sweeper.study_name=q"], {})]
    assert first_ranks == ["1", "3"]
    monkeypatch.setattr(container, "RESOURCE_CONFIG", tmp_path / "resourceconfig.json")
    ranks = []
    for first in first_ranks:
        for host in ("algo-1", "algo-2"):
            container.RESOURCE_CONFIG.write_text(json.dumps(
                {"current_host": host, "hosts": ["algo-2", "algo-1"]}))
            ranks.append(container.host_rank(first))
    assert ranks == ["1", "2", "3", "4"]


@pytest.mark.parametrize("settings, words", [
    ({"count": 0}, "workers.count must be in [1, 999]"),
    ({"spot": True, "max_wait_seconds": 60}, "workers.max_wait_seconds must be >= "
                                             "workers.max_runtime_seconds"),
    ({"security_group_ids": []}, "workers.security_group_ids must be given together with "
                                 "workers.subnets"),
    ({"output_s3_uri": "/tmp/out"}, "workers.output_s3_uri must be an s3:// URI"),
])
def test_bad_worker_settings_name_their_key(settings, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        SageMakerWorkers(**{**SETTINGS, **settings})


def test_the_config_file_composes_on_its_schema_and_instantiates():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="workers/sagemaker", overrides=[
            f"workers.image_uri={IMAGE}", f"workers.role_arn={ROLE}",
            "workers.output_s3_uri=s3://b/p", "workers.subnets=[subnet-a,subnet-b]",
            "workers.security_group_ids=[sg-a]", "workers.count=3"])
        for typo in ("workers.instance_typo=1", "workers.count=many"):
            with pytest.raises(ConfigCompositionException, match=typo.split("=")[0]):
                compose(config_name="workers/sagemaker", overrides=[typo])
    workers = instantiate(cfg.workers)
    assert isinstance(workers, SageMakerWorkers)
    assert (workers.count, workers.subnets, workers.security_group_ids, workers.instance_type) == (
        3, ["subnet-a", "subnet-b"], ["sg-a"], "ml.m5.large")


@pytest.mark.slow
@pytest.mark.parametrize("storage, secret, words", [
    ("optuna-studies.journal", "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf",
     "hydra.sweeper.storage_password_secret is for a database storage"),
    ("postgresql+psycopg2://optuna@127.0.0.1:9/optuna", "db-password",
     "hydra.sweeper.storage_password_secret: 'db-password' is not a Secrets Manager secret ARN"),
])
def test_a_bad_password_secret_fails_before_any_trial(tmp_path, data_file, storage, secret, words):
    done = run_cli(["-m", "sweep=quick", f"hydra.sweeper.storage={storage}",
                    f"hydra.sweeper.storage_password_secret={secret}"], cwd=tmp_path,
                   data=data_file, env=AWS_ENV, timeout=120)
    assert done.returncode == 1 and words in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_push_image_dry_run_prints_the_build_login_tag_and_push():
    done = subprocess.run([str(REPO / "scripts/push_image.sh")], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1",
                                           "ACCOUNT_ID": ACCOUNT, "AWS_REGION": "eu-west-1",
                                           "ENGINE": "podman", "IMAGE": "abalone-dlc:v3"})
    assert done.returncode == 0, done.stderr
    uri = f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/abalone-dlc:v3"
    lines = done.stdout.splitlines()
    assert lines[-5:] == [
        "aws ecr describe-repositories --region eu-west-1 --repository-names abalone-dlc || aws "
        "ecr create-repository --region eu-west-1 --repository-name abalone-dlc "
        "--image-scanning-configuration scanOnPush=true",
        "aws ecr get-login-password --region eu-west-1 | podman login --username AWS "
        f"--password-stdin {ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com",
        f"podman tag abalone-dlc:v3 {uri}", f"podman push {uri}", f"workers.image_uri={uri}"]
    assert any(line.startswith("podman build ") and "--tag abalone-dlc:v3" in line
               for line in lines)


@pytest.mark.slow
@pytest.mark.postgres
def test_the_command_starts_jobs_whose_arguments_join_the_study_and_a_rerun_registers(
        tmp_path, data_file, moto_aws, fleet_database, mlflow_server):
    """The coordinator end to end against moto: `-m ... workers=sagemaker` opens the study and the
    parent run and sends one CreateTrainingJob per worker. moto's jobs end at once, so the command
    reports the study incomplete (exit 1); the jobs' ContainerArguments and Environment, run as the
    image's `train` runs them, then finish the study, and the same command registers the champion
    without starting more jobs."""
    _, recording = moto_aws
    secret_arn = boto3.client("secretsmanager").create_secret(
        Name="abalone-optuna-db-cli", SecretString=DB_PASSWORD)["ARN"]
    command = ["-m", "sweep=quick", "trainer.epochs=2", "trainer.patience=0",
               "hydra.sweeper.n_trials=3", "tracking=server", f"tracking.uri={mlflow_server}",
               f"hydra.sweeper.storage={fleet_database}",
               f"hydra.sweeper.storage_password_secret={secret_arn}", "workers=sagemaker",
               "workers.count=2", f"workers.image_uri={IMAGE}", f"workers.role_arn={ROLE}",
               "workers.output_s3_uri=s3://abalone-bucket/jobs", "workers.region=us-east-1"]
    first = run_cli(command, tmp_path, data_file)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "the workers have ended before study" in first.stderr
    assert "Rerun the same command" in first.stderr and "CloudWatch" in first.stderr

    requests = recorded(recording, "CreateTrainingJob")
    assert len(requests) == 2
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("abalone-tensorflow-experiment")
    (parent,) = client.search_runs([experiment.experiment_id])
    assert parent.data.tags["abalone.role"] == "sweep" and parent.info.status == "FAILED"
    workers = []
    for rank, request in enumerate(requests, start=1):
        arguments = request["AlgorithmSpecification"]["ContainerArguments"]
        assert arguments[0] == "train" and "workers=local" in arguments
        assert not any(a.startswith("workers.") for a in arguments)
        assert request["Environment"]["ABALONE_SWEEP_PARENT_RUN_ID"] == parent.info.run_id
        assert request["Environment"]["ABALONE_SWEEP_WORKER_RANK"] == str(rank)
        # What abalone.container runs for `train <arguments>`, minus the /opt/ml folders.
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "abalone.train", *arguments[1:]], cwd=tmp_path,
            env=scrubbed_environ(**request["Environment"], ABALONE_DATA=str(data_file)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for worker in workers:
        output = worker.communicate(timeout=600)[0]
        assert worker.returncode == 0, output[-3000:]
        assert DB_PASSWORD not in output

    again = run_cli(command, tmp_path, data_file)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(recorded(recording, "CreateTrainingJob")) == 2  # nothing left to do: no job
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("abalone.role") == "sweep"]
    assert parent.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == len(runs) - 1 >= 3
    (version,) = client.search_model_versions("name='abalone-tensorflow-model'")
    assert version.run_id == parent.data.tags["best.run_id"]
