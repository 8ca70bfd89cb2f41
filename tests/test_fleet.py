"""The fleet for real: `workers=container` runs one study in 3 Podman containers of the built
image against PostgreSQL and an `mlflow server` on the host's loopback; a container killed
mid-trial, Ctrl-C, and the rerun that finishes the study. And the storage checks that refuse a
fleet before anything starts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from abalone.sweep.slots import retried_number
from bench.invariants import sweep_breaches
from conftest import (TINY, container_of, free_port, load_study, podman, run_cli,
                      scrubbed_environ, sweep_runs)

STALE_AFTER = 20  # seconds without a heartbeat after which a trial counts as abandoned


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.postgres
def test_container_workers_share_one_study_and_a_rerun_retries_a_killed_container_s_trial(
        tmp_path, data_file, podman_env, project_image, postgres_url, mlflow_server):
    # The image by id: other checkouts on this machine may re-tag the test image meanwhile.
    image = podman(podman_env, "image", "inspect", "--format", "{{.Id}}",
                   project_image).stdout.strip()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(data_file, data_dir / "abalone.data")
    n_trials = 5
    command = ["-m", "sweep=quick", f"hydra.sweeper.n_trials={n_trials}", *TINY,
               f"hydra.sweeper.stale_after={STALE_AFTER}", f"hydra.sweeper.storage={postgres_url}",
               "tracking=server", f"tracking.uri={mlflow_server}", "workers=container",
               "workers.count=3", "workers.engine=podman", f"workers.image={image}",
               "workers.build=false", f"workers.data_dir={data_dir}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = scrubbed_environ(CONTAINERS_CONF=podman_env["CONTAINERS_CONF"],
                           ABALONE_DATA=str(data_file))

    # The first run: kill the container of a running trial, then Ctrl-C the command.
    with open(tmp_path / "first.log", "w") as out:
        coordinator = subprocess.Popen([sys.executable, "-m", "abalone.train", *command],
                                       cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    names = [f"abalone-worker-{coordinator.pid}-{rank}" for rank in (1, 2, 3)]
    killed_trial = None
    try:
        deadline = time.monotonic() + 300
        while killed_trial is None:
            assert coordinator.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial started in a container"
            time.sleep(0.5)
            try:
                running = [t for t in load_study(postgres_url).trials
                           if t.state == TrialState.RUNNING]
            except ValueError:  # no study yet
                continue
            for trial in running:  # one that has started its MLflow run: mid-training
                name = "mlflow_run_id" in trial.user_attrs and container_of(trial, names,
                                                                           podman_env)
                if name:
                    podman(podman_env, "kill", name)
                    killed_trial, killed_at = trial.number, time.time()
                    break
        podman(podman_env, "wait", name, check=False)  # gone before the Ctrl-C
        coordinator.send_signal(signal.SIGINT)
        code = coordinator.wait(timeout=180)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
        podman(podman_env, "rm", "--force", *names, check=False)
    first = (tmp_path / "first.log").read_text()
    assert code == 130, first[-4000:]
    assert "interrupted" in first
    assert "trials of 5:" in first and "workers running: " in first  # the progress line
    assert podman(podman_env, "ps", "--all", "--quiet", "--filter",
                  f"name=abalone-worker-{coordinator.pid}").stdout.strip() == ""  # all stopped
    trials = load_study(postgres_url).trials
    by_number = {t.number: t for t in trials}
    # The killed container's trial is left RUNNING, unless the coordinator's stale-trial check
    # failed it and queued it again before the Ctrl-C: both are legal. The stopped workers'
    # trials are queued again.
    killed_state = by_number[killed_trial].state
    assert killed_state in (TrialState.RUNNING, TrialState.FAIL), [t.state for t in trials]
    assert not [t for t in trials if t.state == TrialState.RUNNING and t.number != killed_trial]
    assert all(any(retried_number(w) == t.number for w in trials)
               for t in trials if t.state == TrialState.FAIL)

    # The rerun: once the killed trial's last heartbeat (Optuna's, in the database; the kill
    # came after it) is older than stale_after, it fails that trial (if still RUNNING), queues it
    # again and finishes the study.
    if killed_state == TrialState.RUNNING:
        time.sleep(max(0.0, killed_at + STALE_AFTER + 1 - time.time()))
    done = run_cli(command, cwd=tmp_path, data=data_file, env={
        "CONTAINERS_CONF": podman_env["CONTAINERS_CONF"]}, timeout=600)
    second = done.stdout + done.stderr
    assert done.returncode == 0, second[-5000:]
    assert "started 3 container workers" in second

    trials = load_study(postgres_url).trials
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == n_trials
    retries = [t for t in trials if retried_number(t) == killed_trial]
    assert [t.state for t in retries] in ([TrialState.COMPLETE], [TrialState.PRUNED])
    assert retries[0].params == by_number[killed_trial].params
    assert {t.number: t for t in trials}[killed_trial].state == TrialState.FAIL

    client = MlflowClient(tracking_uri=mlflow_server)
    (parent,), trial_runs = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    numbers = [int(r.data.tags["optuna.trial_number"]) for r in trial_runs]
    assert len(numbers) == len(set(numbers))  # no trial number twice
    finished = {t.number for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert finished <= set(numbers)
    killed_run = client.get_run(by_number[killed_trial].user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"  # ended by a stale-trial check
    (version,) = client.search_model_versions("name='abalone-tensorflow-model'")
    assert version.run_id == parent.data.tags["best.run_id"]
    assert "as champion" in parent.data.tags["registration"]
    # And the fault soak's invariants (scripts/bench/invariants.py) after the kill and rerun.
    assert sweep_breaches(client, "abalone-tensorflow-experiment", load_study(postgres_url),
                          n_trials, "abalone-tensorflow-model", exit_code=done.returncode,
                          last_line=second.strip().splitlines()[-1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("storage, tracking, words", [
    ("optuna-studies.journal", [], "hydra.sweeper.storage=optuna-studies.journal is a file on "
                                   "this machine, which workers=container cannot share"),
    ("sqlite:///optuna.db", [], "hydra.sweeper.storage=sqlite:///optuna.db is a file on this "
                                "machine"),
    ("postgresql+psycopg2://optuna:s3cret@127.0.0.1:{port}/optuna",
     ["tracking=server", "tracking.uri=http://127.0.0.1:5000"],
     "cannot open the Optuna storage postgresql+psycopg2://optuna:***@127.0.0.1:{port}/optuna "
     "(config key hydra.sweeper.storage): connection to server at"),
    ("postgresql+psycopg2://optuna@127.0.0.1:{port}/optuna", [],
     "tracking.uri=sqlite:///mlflow.db is a store on this machine, which workers=container "
     "cannot write to; use an MLflow server"),
])
def test_a_fleet_without_shared_storage_is_refused_before_anything_starts(
        tmp_path, data_file, storage, tracking, words):
    port = free_port()  # nothing listens there
    storage, words = storage.format(port=port), words.format(port=port)
    done = run_cli(["-m", "sweep=quick", "workers=container", "workers.engine=podman",
                    f"hydra.sweeper.storage={storage}", *tracking], cwd=tmp_path, data=data_file)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert words in out, out[-3000:]
    assert "s3cret" not in out and "Traceback" not in out
    assert not list(tmp_path.iterdir())  # no study, no MLflow store, no worker's folder
