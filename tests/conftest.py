"""Shared fixtures: the real data file, a real `mlflow server` on 127.0.0.1, and the real CLI."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.services import (  # noqa: F401 - test files import them from here
    QUIET_SERVER, free_port, start_mlflow_server, stop, wait_for_http)

REPO = Path(__file__).resolve().parents[1]
# How long one tiny CLI run may take before the test calls it hung (import + 2 epochs ~ 15 s).
CLI_TIMEOUT = 300


@pytest.fixture(scope="session")
def data_file() -> Path:
    """The UCI file named by $ABALONE_DATA (CI points it at the shared copy)."""
    value = os.environ.get("ABALONE_DATA")
    if not value or not Path(value).is_file():
        pytest.fail("set ABALONE_DATA to a copy of the UCI abalone.data file to run the tests")
    return Path(value)


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """A fresh server per test, proxying artifacts into its own folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url, proc = start_mlflow_server(root, "--artifacts-destination", str(root / "artifacts"))
    yield url
    stop(proc)


def run_cli(args: list[str], cwd: Path, data: Path | None, env: dict | None = None,
            module: str = "abalone.train", timeout: float = CLI_TIMEOUT):
    """`python -m abalone.train ARGS` in `cwd`, as a user would type it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full_env.pop("ABALONE_DATA", None)
    if data is not None:
        full_env["ABALONE_DATA"] = str(data)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# Tiny but real: two epochs of the default model, quiet terminal lines still on.
TINY = ["trainer.epochs=2", "trainer.patience=0"]


def sweep_runs(client, experiment: str = "abalone-tensorflow-experiment"):
    """(parent runs, trial runs) of the experiment, deleted runs left out."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if r.data.tags.get("abalone.role") == "sweep"]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, trials


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster from Debian's server binaries, on 127.0.0.1 only."""
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bindirs:
        pytest.fail("PostgreSQL's server binaries are missing: scripts/test.sh installs Debian's "
                    "postgresql package")
    bindir = Path(bindirs[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="abalone-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l",
                    str(root / "server.log"), "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {root} -F", "start"], check=True,
                   capture_output=True)
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                    "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster, request):
    """A new, empty database in the session's cluster, for one test."""
    import psycopg2

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    connection = psycopg2.connect(postgres_cluster.replace("postgresql+psycopg2", "postgresql")
                                  + "/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return f"{postgres_cluster}/{name}"
