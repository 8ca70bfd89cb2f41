"""The container image for real, with Podman: the project's unchanged Dockerfile built on a local
stand-in of the TensorFlow training DLC (tests/container/), started the way scripts/run_training.sh
starts it on EC2 and the way SageMaker starts a training job, against services on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import (CONTAINER_TIMEOUT, REPO, SESSION, load_study, opt_ml_folders, podman,
                      poll)

MODEL = "abalone-tensorflow-model"
# What the stand-in pins (tests/container/standin-requirements.txt), seen from inside a container.
DLC_MLFLOW, DLC_KERAS, DLC_NUMPY = "3.15.1", "3.15.1", "2.4.6"


def freeze(env: dict, image: str) -> dict[str, str]:
    """`pip freeze` of an image: canonical name -> the rest of its line."""
    lines = podman(env, "run", "--rm", "--entrypoint", "python", image, "-m", "pip",
                   "freeze").stdout.splitlines()
    found = {}
    for line in lines:
        name, sep, rest = line.partition(" @ ") if " @ " in line else line.partition("==")
        found[name.strip().lower().replace("_", "-")] = sep + rest
    return found


@pytest.mark.slow
@pytest.mark.container
def test_the_build_keeps_the_images_tensorflow_keras_and_numpy(podman_env, standin_base,
                                                               project_image):
    base, ours = freeze(podman_env, standin_base), freeze(podman_env, project_image)
    # The stand-in's TensorFlow is a wheel file under another distribution name ...
    assert base["tensorflow-cpu"].startswith(" @ file://"), base["tensorflow-cpu"]
    assert "tensorflow" not in base
    # ... and the build installed no other TensorFlow, and changed none of the three.
    assert "tensorflow" not in ours
    for name in ("tensorflow-cpu", "keras", "numpy"):
        assert ours[name] == base[name], name
    assert ours["keras"] == f"=={DLC_KERAS}" and ours["numpy"] == f"=={DLC_NUMPY}"
    for name in ("hydra-core", "optuna", "optuna-integration"):  # ours, added
        assert name in ours and name not in base
    assert ours["mlflow"] == base["mlflow"] == f"=={DLC_MLFLOW}"  # met, so left alone


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.parametrize("requirement, words", [
    ("keras>=99", "the base image's keras 3.15.1 does not meet our requirement 'keras>=99'"),
    ("tensorflow>=3", "the base image's tensorflow-cpu 2.21.0 does not meet our requirement "
                      "'tensorflow>=3'"),
])
def test_the_install_refuses_requirements_the_image_cannot_meet(tmp_path, podman_env,
                                                                 standin_base, requirement, words):
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "x"\nversion = "0"\ndependencies = ["{requirement}", "six"]\n')
    done = podman(podman_env, "run", "--rm", "--network=host", "-v", f"{tmp_path}:/project",
                  "-v", f"{REPO / 'scripts' / 'install_in_image.py'}:/install_in_image.py:ro",
                  standin_base, "python", "/install_in_image.py", "requirements", "/project",
                  check=False)
    assert done.returncode == 1
    assert words in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def training_folders(tmp_path: Path, data_file: Path) -> tuple[Path, Path]:
    data_dir, output_dir = tmp_path / "data", tmp_path / "output"
    data_dir.mkdir()
    shutil.copy(data_file, data_dir / "abalone.data")
    return data_dir, output_dir


def run_training_sh(env: dict, base: str, image: str, data_dir: Path, output_dir: Path,
                    *args: str):
    """scripts/run_training.sh with Podman, the stand-in as the base, building `image`."""
    return subprocess.run([str(REPO / "scripts" / "run_training.sh"), *args],
                          env={**env, "ENGINE": "podman", "BASE_IMAGE": base, "IMAGE": image,
                               "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(output_dir)},
                          capture_output=True, text=True, timeout=CONTAINER_TIMEOUT)


@pytest.mark.slow
@pytest.mark.container
def test_ec2_start_trains_tracks_and_registers_a_model_the_host_loads(
        tmp_path, data_file, podman_env, standin_base, project_image, mlflow_server, monkeypatch):
    data_dir, output_dir = training_folders(tmp_path, data_file)
    done = run_training_sh(podman_env, standin_base, project_image, data_dir, output_dir,
                           "trainer.epochs=2", "tracking=server", f"tracking.uri={mlflow_server}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "logging in" not in out  # a local base: no registry login, no pull

    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(
        "abalone-tensorflow-experiment").experiment_id])
    assert run.info.status == "FINISHED"
    # Trained inside the stand-in, on its frameworks.
    assert run.data.tags["mlflow.version"] == DLC_MLFLOW
    assert run.data.tags["tensorflow.distribution"] == "tensorflow-cpu"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_rmse")] == [1, 2]
    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert version.run_id == run.info.run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    requirements = Path(mlflow.artifacts.download_artifacts(
        f"models:/{MODEL}/1/requirements.txt")).read_text()
    assert "tensorflow-cpu==2.21.0" in requirements, requirements
    rows = pd.read_csv(data_file, header=None, nrows=10, names=[
        "Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
        "Viscera_weight", "Shell_weight", "Rings"]).drop(columns="Rings")
    predicted = np.asarray(model.predict(rows))
    assert predicted.shape == (10,) and np.isfinite(predicted).all()

    # The outputs are in ./output and belong to the caller.
    assert (output_dir / "model.keras").is_file() and (output_dir / "config.yaml").is_file()
    assert {p.stat().st_uid for p in output_dir.rglob("*")} == {os.getuid()}


@pytest.mark.slow
@pytest.mark.container
def test_sweep_in_the_container_resumes_without_extra_trials(tmp_path, data_file, podman_env,
                                                            standin_base, project_image):
    data_dir, output_dir = training_folders(tmp_path, data_file)
    sweep = ["-m", "sweep=quick", "hydra.sweeper.n_trials=2", "trainer.epochs=2"]
    first = run_training_sh(podman_env, standin_base, project_image, data_dir, output_dir, *sweep)
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    second = run_training_sh(podman_env, standin_base, project_image, data_dir, output_dir, *sweep)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "2 trials in total, 2 finished before" in out

    assert len(load_study(str(output_dir / "optuna-studies.journal")).trials) == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(
        "abalone-tensorflow-experiment").experiment_id])
    assert len(runs) == 3  # the parent and its two trials
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1


def sagemaker_folders(tmp_path: Path, data_file: Path, hyperparameters: str) -> Path:
    """/opt/ml as SageMaker lays it out (root-owned when the tests run as root, as in CI)."""
    return opt_ml_folders(tmp_path / "opt_ml", data_file, hyperparameters)


def finished_sagemaker_run(env: dict, image: str, opt_ml: Path, mlflow_server: str):
    """Start the image as a SageMaker job does; its one run, FINISHED, with the model written
    and no failure left."""
    done = start_as_sagemaker(env, image, opt_ml, "train")
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(
        "abalone-tensorflow-experiment").experiment_id])
    assert run.info.status == "FINISHED"
    assert (opt_ml / "model" / "model.keras").is_file()
    assert not (opt_ml / "output" / "failure").exists()
    return client, run


def start_as_sagemaker(env: dict, image: str, opt_ml: Path, *args: str):
    mounts = []
    for sub, mode in (("input/data/training", ":ro"), ("input/config", ":ro"), ("model", ""),
                      ("output", "")):
        mounts += ["-v", f"{opt_ml / sub}:/opt/ml/{sub}{mode}"]
    return podman(env, "run", "--rm", "--network=host", *mounts, image, *args, check=False)


@pytest.mark.slow
@pytest.mark.container
def test_sagemaker_start_trains_what_the_hyperparameters_say(tmp_path, data_file, podman_env,
                                                            project_image, mlflow_server):
    # Strings as the SageMaker Python SDK sends them (JSON-encoded) and as boto3 users write them.
    opt_ml = sagemaker_folders(tmp_path, data_file, json.dumps({
        "trainer.epochs": "2", "model": '"wide"', "tracking": "server",
        "tracking.uri": mlflow_server, "tracking.register": "false"}))
    assert (opt_ml / "model").stat().st_uid == os.getuid()
    client, run = finished_sagemaker_run(podman_env, project_image, opt_ml, mlflow_server)
    assert run.data.params["trainer.epochs"] == "2" and run.data.params["model.units"] == "256"
    assert len(client.get_metric_history(run.info.run_id, "val_rmse")) == 2


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.parametrize("hyperparameters, words", [
    ('{"trainer.epochs": "0", "tracking.enabled": "false"}', "trainer.epochs must be >= 1"),
    ('{"trainer.epochs": 2,\n "model": }', "hyperparameters.json, line 2, column 11: not valid JSON"),
])
def test_a_failed_sagemaker_start_leaves_its_reason(tmp_path, data_file, podman_env,
                                                    project_image, hyperparameters, words):
    opt_ml = sagemaker_folders(tmp_path, data_file, hyperparameters)
    done = start_as_sagemaker(podman_env, project_image, opt_ml, "train")
    assert done.returncode != 0
    reason = (opt_ml / "output" / "failure").read_text()
    assert words in reason, reason
    assert "Traceback" not in reason


def test_dockerfile_names_its_base_once_and_copies_what_exists():
    text = (REPO / "Dockerfile").read_text()
    (base,) = [line.split("=", 1)[1] for line in text.splitlines()
               if line.startswith("ARG BASE_IMAGE=")]
    # A tag AWS publishes (aws/deep-learning-containers, docs/src/data/tensorflow-training/
    # 2.21-cpu-sagemaker.yml), from the public gallery, which needs no login.
    assert base == ("public.ecr.aws/deep-learning-containers/tensorflow-training:"
                    "2.21.0-cpu-py312-amzn2023-sagemaker")
    assert "FROM ${BASE_IMAGE}" in text
    assert base not in (REPO / "scripts" / "run_training.sh").read_text()  # read, not copied
    for line in (line for line in text.splitlines() if line.startswith("COPY ")):
        for source in line.split()[1:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is missing"
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "cert"):
        assert secret not in text, "no credentials or machine settings in the image"


@pytest.fixture
def nobodys_folder():
    """A folder the user `nobody` can reach (pytest's own are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="abalone-nonroot-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.slow
@pytest.mark.container
def test_ec2_start_for_a_non_root_caller_runs_as_that_user_with_its_aws_profile(
        nobodys_folder, data_file, podman_env, standin_base, project_image):
    # run_training.sh as a non-root caller of Docker decides the run's user, HOME and mounts; the
    # command it prints (DRY_RUN=1) then runs on Podman, which takes Docker's arguments. (Podman
    # without root adds --userns=keep-id, which only a rootless Podman accepts.)
    caller = 65534  # nobody
    tmp_path = nobodys_folder
    home, data_dir, output_dir = tmp_path / "home", tmp_path / "data", tmp_path / "output"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[abalone]\naws_access_key_id = AKIAPROFILETEST\naws_secret_access_key = x\n")
    data_dir.mkdir()
    shutil.copy(data_file, data_dir / "abalone.data")
    output_dir.mkdir()
    for path in (tmp_path, home, home / ".aws", home / ".aws" / "credentials", data_dir,
                 data_dir / "abalone.data", output_dir):
        os.chown(path, caller, caller)
    (home / ".aws" / "credentials").chmod(0o600)
    printed = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"HOME={home}", "ENGINE=docker", "DRY_RUN=1",
         f"IMAGE={project_image}", f"DATA_DIR={data_dir}", f"OUTPUT_DIR={output_dir}",
         "AWS_PROFILE=abalone", str(REPO / "scripts" / "run_training.sh"), "trainer.epochs=1",
         "tracking.enabled=false"], capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"]})
    assert printed.returncode == 0, printed.stderr
    run = printed.stdout.splitlines()[-1].split()
    assert run[:2] == ["docker", "run"] and "--user" in run
    assert run[run.index("--user") + 1] == f"{caller}:{caller}"
    assert "AWS_PROFILE" in run and "AKIAPROFILETEST" not in printed.stdout  # by name only

    env = {**podman_env, "AWS_PROFILE": "abalone"}
    trained = podman(env, *run[1:], check=False)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    assert (output_dir / "model.keras").is_file()
    assert {p.stat().st_uid for p in output_dir.rglob("*")} == {caller}
    image_at = run.index(project_image)
    profile = podman(env, *run[1:image_at], "--entrypoint", "python", project_image, "-c",
                     "import boto3; print(boto3.Session().get_credentials().access_key)")
    assert profile.stdout.strip() == "AKIAPROFILETEST"


def test_hyperparameters_become_hydra_overrides(tmp_path):
    from abalone.container import StartError, hyperparameter_overrides

    path = tmp_path / "hyperparameters.json"
    path.write_text(json.dumps({"model": '"wide"', "optimizer.lr": "0.01", "trainer.epochs": 20,
                                "tracking.register": False, "hydra.mode": "MULTIRUN"}))
    assert hyperparameter_overrides(path) == [
        "model=wide", "optimizer.lr=0.01", "trainer.epochs=20", "tracking.register=false",
        "hydra.mode=MULTIRUN"]
    path.write_text('{"model": {"units": 3}}')
    with pytest.raises(StartError, match=r"hyperparameters.json, key 'model': expected a string"):
        hyperparameter_overrides(path)
    path.write_text('["model=wide"]')
    with pytest.raises(StartError, match="expected a JSON object"):
        hyperparameter_overrides(path)


@pytest.mark.slow
@pytest.mark.container
def test_stopping_a_sagemaker_sweep_keeps_finished_trials_and_queues_the_running_one(
        tmp_path, data_file, podman_env, project_image):
    # StopTrainingJob sends SIGTERM to the container: the sweep stops as on Ctrl-C.
    opt_ml = sagemaker_folders(tmp_path, data_file, json.dumps({
        "hydra.mode": "MULTIRUN", "sweep": "quick", "hydra.sweeper.n_trials": "4",
        "trainer.epochs": "40", "trainer.patience": "0", "tracking.enabled": "false"}))
    name = f"abalone-stop-{SESSION}-{tmp_path.name}"[:60]  # Podman's store is machine-wide
    mounts = []
    for sub in ("input/data/training", "input/config", "model", "output"):
        mounts += ["-v", f"{opt_ml / sub}:/opt/ml/{sub}"]
    journal = opt_ml / "model" / "optuna-studies.journal"

    def second_trial_running() -> bool:
        """A trial has finished and a later one is RUNNING, as the journal on the host says."""
        try:
            trials = load_study(str(journal)).trials
        except Exception:  # no study yet, or a line still being written
            return False
        return any(t.state.is_finished() for t in trials) and any(
            t.state.name == "RUNNING" and t.number > min(
                f.number for f in trials if f.state.is_finished()) for t in trials)

    podman(podman_env, "run", "--detach", "--name", name, "--network=host", *mounts,
           project_image, "train")
    try:
        poll(second_trial_running, "the sweep's second trial did not start", timeout=300,
             every=0.5)
        podman(podman_env, "stop", "--time", "60", name)
        code = int(podman(podman_env, "wait", name).stdout.strip())
    finally:
        logs = podman(podman_env, "logs", name, check=False)
        podman(podman_env, "rm", "--force", name, check=False)
    assert code == 130, (logs.stdout + logs.stderr)[-4000:]
    states = [t.state.name for t in load_study(str(journal)).trials]
    assert states.count("COMPLETE") + states.count("PRUNED") >= 1, states
    assert "RUNNING" not in states and "WAITING" in states, states  # queued again
    assert "interrupted" in (opt_ml / "output" / "failure").read_text()


def test_a_start_without_arguments_is_sagemakers_in_a_jobs_environment():
    from abalone.container import HYPERPARAMETERS, start_kind

    # Arguments say it: `train` is SageMaker's start, anything else overrides, and nothing is said.
    assert start_kind(["train"], None, False) == (True, "")
    assert start_kind(["trainer.epochs=2"], "job-1", True) == (False, "")
    # No arguments (the SageMaker SDK v3's local mode sends no command): the environment decides,
    # and the first line says which start and why.
    for job_name, has_file, signs in (
            ("job-1", True, [str(HYPERPARAMETERS), "TRAINING_JOB_NAME is set (job-1)"]),
            (None, True, [f"{HYPERPARAMETERS} exists"]),
            ("job-1", False, ["TRAINING_JOB_NAME is set (job-1)"])):
        sagemaker, why = start_kind([], job_name, has_file)
        assert sagemaker and why.startswith("abalone.container: starting as a SageMaker training "
                                            "job, as `train` would")
        assert all(sign in why for sign in signs), why
        assert (str(HYPERPARAMETERS) + " exists" in why) == has_file
    sagemaker, why = start_kind([], None, False)
    assert not sagemaker
    assert why.startswith("abalone.container: starting one run with the default settings: no "
                          "arguments, no /opt/ml/input/config/hyperparameters.json and no "
                          "TRAINING_JOB_NAME"), why


@pytest.mark.slow
@pytest.mark.container
def test_sagemaker_start_trains_a_table_of_the_users_from_the_channel(tmp_path, data_file,
                                                                       podman_env, project_image,
                                                                       mlflow_server):
    # data=table with data.path relative to the training channel, as a SageMaker job mounts it.
    from sklearn.datasets import load_breast_cancer

    opt_ml = sagemaker_folders(tmp_path, data_file, json.dumps({
        "data": "table", "data.path": "cancer.csv", "data.target": "target",
        "trainer.epochs": "2", "tracking": "server", "tracking.uri": mlflow_server,
        "tracking.register": "false"}))
    load_breast_cancer(as_frame=True).frame.to_csv(opt_ml / "input/data/training/cancer.csv",
                                                   index=False)
    client, run = finished_sagemaker_run(podman_env, project_image, opt_ml, mlflow_server)
    assert run.data.tags["dataset.path"] == "/opt/ml/input/data/training/cancer.csv"
    assert {"test_accuracy", "test_log_loss", "test_auc"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
