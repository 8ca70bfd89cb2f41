"""Faults on purpose: a real `mlflow server` behind our fault proxy (scripts/bench/faultproxy.py)
that loses replies after the server acted, resets connections, delays and throttles, and the
records checked afterwards: runs, model versions and metric points exist exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from bench.faultproxy import FaultProxy
from bench.invariants import run_breaches
from conftest import REPO

pytestmark = pytest.mark.slow

CREATIONS = r"^POST /api/2\.0/mlflow/(runs/create|runs/log-batch|model-versions/create|" \
            r"registered-models/create)"

# One process's runs, metric batches and registrations through the proxy; prints what it made.
CREATE = """
import json, sys
import mlflow
from mlflow.entities import Metric
from omegaconf import OmegaConf
from abalone import tracking
from abalone.tracking import sweep_runs
from abalone.config import TrackingConfig

url, count = sys.argv[1], int(sys.argv[2])
experiment_id = tracking.connect(OmegaConf.structured(TrackingConfig(uri=url, outage_grace=60)))
client = mlflow.MlflowClient()
parent = sweep_runs.open_parent_run(client, experiment_id, "faults", "here", {"a": "1"})
made = {"parent": parent, "runs": [], "versions": []}
for i in range(count):
    with tracking.TrackedRun(experiment_id, f"t{i}", {"optuna.trial_number": str(i)},
                             {"p": str(i)}, parent_run_id=parent, is_trial=True) as run:
        for step in (1, 2, 3):
            client.log_batch(run.run_id, metrics=[Metric(k, step * 0.5, 1000 + step, step)
                                                  for k in ("loss", "val_loss")])
        model = client.create_logged_model(experiment_id, name="model", source_run_id=run.run_id)
        version = tracking.register(f"models:/{model.model_id}", "faults-model", run.run_id,
                                    {"test_rmse": 1.0})
        made["runs"].append(run.run_id)
        made["versions"].append(version.version)
client.set_terminated(parent, "FINISHED")
print(json.dumps(made))
"""


def create_through(proxy: FaultProxy, count: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", CREATE, proxy.url, str(count)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("seed", [1, 2])
def test_runs_versions_and_metric_points_exist_once_through_lost_replies(mlflow_server, seed):
    port = int(mlflow_server.rsplit(":", 1)[1])
    # Every creation and metric batch meets a fault half the time: mostly replies lost after
    # the server acted, which the client cannot tell from a reset before it did.
    proxy = FaultProxy(port, seed, {"drop": 0.3, "reset": 0.1, "503": 0.05, "delay": 0.05},
                       only=CREATIONS, delay=0.2)
    try:
        made = create_through(proxy, 6)
    finally:
        proxy.close()
    assert proxy.injected["drop"] >= 3, proxy.injected  # the schedule did lose replies

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("abalone-tensorflow-experiment")
    breaches, by_number, (parent,) = run_breaches(client, experiment.experiment_id)
    assert breaches == []
    assert sorted(by_number) == list(range(6))
    assert [r[0].info.run_id for _, r in sorted(by_number.items())] == made["runs"]
    assert parent.info.run_id == made["parent"]
    versions = client.search_model_versions("name = 'faults-model'")
    assert sorted(int(v.version) for v in versions) == sorted(map(int, made["versions"]))
    assert sorted(v.run_id for v in versions) == sorted(made["runs"])  # one version per run
    for run_id in made["runs"]:
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3]


def test_the_server_drops_a_resent_metric_batch(mlflow_server):
    """Why a metric batch may be resent: the SQL store's primary key holds each point once."""
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run("0")
    batch = [Metric("loss", 0.5, 1000, 1), Metric("loss", 0.25, 2000, 2)]
    client.log_batch(run.info.run_id, metrics=batch)
    client.log_batch(run.info.run_id, metrics=batch)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] \
        == [(1, 0.5), (2, 0.25)]
