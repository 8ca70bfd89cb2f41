"""The SageMaker Python SDK's own local mode starting our image (built on the DLC stand-in, as in
test_container.py): v3 `ModelTrainer(training_mode=Mode.LOCAL_CONTAINER)`, which starts the
image with no command, and v2 `Estimator(instance_type="local")`, which starts it as `train`,
each from a venv of its own, through Podman's Docker API socket (`podman system service`) and
Debian's docker-compose; and the examples of docs/sagemaker-sdk.md, run in local mode.

The SDK's own exit code is unreliable over docker-compose 1.29 and Podman (it may miss the
container's exit), so each run's outcome is read from Podman and from the job's artifacts."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, podman
from venvs import side_venv

# (venv name, requirements): v2's local mode needs its `local` extra (the docker and PyYAML
# packages); v3's has no such extra.
SDK_V3 = ("sagemaker-v3", ("sagemaker==3.27.0",))
SDK_V2 = ("sagemaker-v2", ("sagemaker[local]==2.257.7",))
SDK_TIMEOUT = 900
# The SDKs want credentials and a region even when local mode makes no AWS call.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIAABALONETEST", "AWS_SECRET_ACCESS_KEY": "not-a-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

pytestmark = [pytest.mark.slow, pytest.mark.container]


@pytest.fixture(scope="session")
def docker_api(podman_env):
    """The environment for a Docker client of Podman: `podman system service` on a socket of its
    own, DOCKER_HOST pointing at it."""
    missing = [tool for tool in ("docker-compose", "docker") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: scripts/test.sh installs Debian's "
                    "docker-compose and podman-docker")
    folder = Path(tempfile.mkdtemp(prefix="abalone-docker-api-"))
    socket = folder / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"],
                               env=podman_env, stdout=subprocess.DEVNULL,
                               stderr=open(folder / "service.log", "w"))
    env = {**podman_env, "DOCKER_HOST": f"unix://{socket}"}
    deadline = time.monotonic() + 30
    while subprocess.run(["docker", "version"], env=env, capture_output=True).returncode != 0:
        assert service.poll() is None and time.monotonic() < deadline, \
            (folder / "service.log").read_text()[-2000:]
        time.sleep(0.5)
    yield env
    service.terminate()
    service.wait(timeout=30)
    podman(podman_env, "network", "rm", "--force", "sagemaker-local", check=False)
    shutil.rmtree(folder, ignore_errors=True)


def run_sdk(sdk: tuple[str, tuple[str, ...]], script: str, cwd: Path, env: dict, *args: str):
    """`script` run by the Python of the SDK's own venv, in `cwd`, as a user would run it."""
    python = side_venv(sdk[0], *sdk[1]) / "python"
    full_env = {k: v for k, v in env.items() if not k.startswith(("PYTHON", "AWS_", "MLFLOW_"))}
    return subprocess.run([str(python), "-c", script, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=SDK_TIMEOUT, env={**full_env, **FAKE_AWS})


def compose_containers(env: dict, under: Path) -> list[int]:
    """The exit codes of the containers docker-compose made for job folders under `under`, which
    are then removed (the SDK leaves them)."""
    listed = podman(env, "ps", "--all", "--format", "json").stdout
    found = [c for c in json.loads(listed or "[]") if (c.get("Labels") or {}).get(
        "com.docker.compose.project.working_dir", "").startswith(str(under))]
    for container in found:
        podman(env, "rm", "--force", container["Id"], check=False)
    return [container["ExitCode"] for container in found]


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name.removeprefix("./"): archive.extractfile(m).read()
                for m in archive.getmembers() if m.isfile()}


def tracked_runs(mlflow_db: bytes, folder: Path) -> tuple[list[str], int]:
    """(the runs' statuses, the number of registered model versions) of a job's mlflow.db."""
    path = folder / "mlflow.db"
    path.write_bytes(mlflow_db)
    with sqlite3.connect(path) as db:
        statuses = [row[0] for row in db.execute("select status from runs")]
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
    return statuses, versions


def data_folder(where: Path, data_file: Path) -> Path:
    folder = where / "data"
    folder.mkdir(parents=True)
    shutil.copy(data_file, folder / "abalone.data")
    return folder


V3_SCRIPT = """
import json, sys
from sagemaker.core.training.configs import InputData
from sagemaker.train.model_trainer import Mode, ModelTrainer

image, data, root, hyperparameters = sys.argv[1:]
ModelTrainer(training_image=image, training_mode=Mode.LOCAL_CONTAINER, local_container_root=root,
             hyperparameters=json.loads(hyperparameters)).train(
    input_data_config=[InputData(channel_name="training", data_source=data)])
"""

V2_SCRIPT = """
import json, sys
from sagemaker.estimator import Estimator
from sagemaker.local import LocalSession

image, data, root, hyperparameters = sys.argv[1:]
session = LocalSession()
session.config = {"local": {"local_code": True, "container_root": root}}
Estimator(image_uri=image, role="arn:aws:iam::123456789012:role/abalone-test", instance_count=1,
          instance_type="local", hyperparameters=json.loads(hyperparameters),
          output_path=f"file://{root}/output", sagemaker_session=session).fit(
    {"training": f"file://{data}"})
"""


@pytest.mark.parametrize("sdk, script", [(SDK_V3, V3_SCRIPT), (SDK_V2, V2_SCRIPT)],
                         ids=["v3-ModelTrainer", "v2-Estimator"])
def test_sdk_local_mode_honours_the_hyperparameters_and_reports_a_failure(
        sdk, script, tmp_path, data_file, docker_api, project_image):
    data = data_folder(tmp_path, data_file)
    outcomes = {}
    for case, hyperparameters in (
            ("good", {"model": "wide", "trainer.epochs": 2, "tracking.register": False}),
            ("bad", {"trainer.epochs": -3})):
        root = tmp_path / case
        root.mkdir()
        done = run_sdk(sdk, script, tmp_path, docker_api, project_image, str(data), str(root),
                       json.dumps(hyperparameters))
        log = done.stdout + done.stderr
        (exit_code,) = compose_containers(docker_api, root)
        (model_tar,) = root.rglob("model.tar.gz")
        (output_tar,) = root.rglob("output.tar.gz")
        outcomes[case] = (done, log, exit_code, read_tar(model_tar), read_tar(output_tar))

    done, log, exit_code, model, output = outcomes["good"]
    assert exit_code == 0, log[-5000:]
    config = yaml.safe_load(model["config.yaml"])
    assert config["trainer"]["epochs"] == 2 and config["model"]["units"] == 256  # wide
    statuses, versions = tracked_runs(model["mlflow.db"], tmp_path)
    assert statuses == ["FINISHED"] and versions == 0  # tracking.register=false
    assert "model.keras" in model and "failure" not in output
    # v3 sends no command: the image says it chose a SageMaker start, before anything else.
    ours = [line for line in log.splitlines() if "abalone.container" in line or "MLflow run" in line]
    if sdk is SDK_V3:
        assert "abalone.container: starting as a SageMaker training job" in ours[0], log[-5000:]
        assert "TRAINING_JOB_NAME is set" in ours[0]

    done, log, exit_code, model, output = outcomes["bad"]
    assert exit_code == 1, log[-5000:]
    reason = output["failure"].decode()
    assert "trainer.epochs must be >= 1" in reason and "Traceback" not in reason, reason
    assert "model.keras" not in model


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


# The docs' own values are AWS's; here the image is the test image, no tracking server (the
# container keeps its own MLflow store), and the jobs of the first two examples run in local mode,
# with the S3 data folder read from a local one, 2 epochs and 2 trials.
def setup_for(image: str) -> str:
    return f"""
IMAGE = {image!r}
ROLE = "arn:aws:iam::123456789012:role/abalone-test"
BUCKET = "s3://abalone-test-bucket/abalone"
TRACKING = {{}}
"""
AS_LOCAL_JOB = """
import os

import sagemaker.train.model_trainer as model_trainer

class LocalJob(model_trainer.ModelTrainer):
    def __init__(self, **settings):
        hyperparameters = {**settings["hyperparameters"], "trainer.epochs": 2}
        if "hydra.sweeper.n_trials" in hyperparameters:
            hyperparameters["hydra.sweeper.n_trials"] = 2
        super().__init__(**{**settings, "hyperparameters": hyperparameters,
                            "training_mode": model_trainer.Mode.LOCAL_CONTAINER,
                            "local_container_root": os.path.abspath("local-job")})

    def train(self, input_data_config):
        for channel in input_data_config:
            assert channel.data_source == f"{BUCKET}/data/", channel.data_source
            channel.data_source = "data"
        return super().train(input_data_config=input_data_config)

model_trainer.ModelTrainer = LocalJob
"""


def test_the_sdk_docs_examples_run_in_local_mode(tmp_path, data_file, docker_api, project_image):
    setup, job, sweep, local = python_blocks((REPO / "docs" / "sagemaker-sdk.md").read_text())
    assert "IMAGE = " in setup and "TRACKING = " in setup
    assert local.count('"abalone-dlc"') == 1  # the image as `docker build -t abalone-dlc` tags it
    runs = {"job": setup_for(project_image) + AS_LOCAL_JOB + job,
            "sweep": setup_for(project_image) + AS_LOCAL_JOB + sweep,
            "local": local.replace('"abalone-dlc"', repr(project_image))}
    found = {}
    for name, code in runs.items():
        cwd = tmp_path / name
        data_folder(cwd, data_file)
        done = run_sdk(SDK_V3, code, cwd, docker_api)
        log = done.stdout + done.stderr
        assert compose_containers(docker_api, cwd) == [0], log[-5000:]
        found[name] = (read_tar(cwd / "local-job" / "compressed_artifacts" / "model.tar.gz"), log)

    model, log = found["job"]
    config = yaml.safe_load(model["config.yaml"])
    assert config["model"]["units"] == 256 and config["trainer"]["epochs"] == 2, log[-3000:]
    assert tracked_runs(model["mlflow.db"], tmp_path / "job") == (["FINISHED"], 1)

    model, log = found["sweep"]
    assert "optuna-studies.journal" in model, sorted(model)
    statuses, versions = tracked_runs(model["mlflow.db"], tmp_path / "sweep")
    assert sorted(statuses) == ["FINISHED"] * 3 and versions == 1, log[-3000:]  # parent, 2 trials

    model, log = found["local"]
    config = yaml.safe_load(model["config.yaml"])
    assert config["model"]["units"] == 256 and config["trainer"]["epochs"] == 2, log[-3000:]
    assert tracked_runs(model["mlflow.db"], tmp_path / "local") == (["FINISHED"], 0)
