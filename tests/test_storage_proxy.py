"""A sweep through Optuna's gRPC storage proxy (`python -m abalone.storage_proxy`) in front of a
real PostgreSQL database: the trials land in the database, and a missing proxy fails fast."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO, TINY, free_port, run_cli, stop


@pytest.mark.slow
@pytest.mark.postgres
def test_sweep_through_the_grpc_proxy_lands_in_postgresql(tmp_path, data_file, postgres_url):
    port = free_port()
    log = open(tmp_path / "proxy.log", "w")
    proxy = subprocess.Popen([sys.executable, "-m", "abalone.storage_proxy", postgres_url,
                              "--port", str(port)], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port).wait_server_ready(60)
        done = run_cli(["-m", "sweep=quick", *TINY, "trainer.verbose=0",
                        "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
                        f"hydra.sweeper.storage=grpc://127.0.0.1:{port}"],
                       cwd=tmp_path, data=data_file)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    finally:
        stop(proxy)
    # Read back from the database itself: the sweep only knew the proxy's address.
    database = optuna.storages.RDBStorage(postgres_url)
    (summary,) = optuna.get_all_study_summaries(database)
    trials = optuna.load_study(study_name=summary.study_name, storage=database).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # The command and its second trial process (n_jobs=2) both open the study through the proxy
    # (a worker process that failed fails the command); which of them runs how many trials is
    # the scheduler's choice.
    assert 1 <= len({t.user_attrs["pid"] for t in trials}) <= 2
    assert all("mlflow_run_id" in t.user_attrs and t.intermediate_values for t in trials)
    proxy_log = (tmp_path / "proxy.log").read_text()
    assert "Optuna storage proxy for" in proxy_log
    # The sweep's locks (parent run, registration) are marker studies behind a proxy: quietly.
    assert f"A new study created in RDB with name: {summary.study_name}" in proxy_log
    assert ".lock" not in proxy_log and ".lock" not in done.stdout + done.stderr


@pytest.mark.slow
def test_no_proxy_at_the_address_fails_fast_naming_it(tmp_path, data_file):
    port = free_port()
    done = run_cli(["-m", "sweep=quick", *TINY, "hydra.sweeper.n_trials=1",
                    f"hydra.sweeper.storage=grpc://127.0.0.1:{port}"], cwd=tmp_path,
                   data=data_file, timeout=120)
    assert done.returncode != 0
    assert f"hydra.sweeper.storage=grpc://127.0.0.1:{port}: no Optuna storage proxy" in done.stderr
    assert "python -m abalone.storage_proxy" in done.stderr and "Traceback" not in done.stderr
