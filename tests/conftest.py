"""Shared fixtures and helpers: the real data file, a real `mlflow server` on 127.0.0.1, the real
CLI, a PostgreSQL cluster, moto's server, and the container images (each built once a session).

Markers (pyproject.toml): `slow` for a test that starts a process, server, container or browser,
or trains through the CLI; `container`, `browser`, `postgres` for what it needs besides.
`scripts/test.sh -m "not slow"` is the quick in-process tier."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.services import (  # noqa: F401 - test files import them from here
    Postgres, container_of, free_port, start_mlflow_server, stop, wait_for_http)
from left_behind import (  # noqa: F401 - hooks: no process left behind at the session's end
    pytest_configure, pytest_runtest_setup, pytest_runtest_teardown, pytest_sessionfinish,
    pytest_testnodedown)

REPO = Path(__file__).resolve().parents[1]
# How long one tiny CLI run may take before the test calls it hung (import + 2 epochs ~ 15 s).
CLI_TIMEOUT = 300
# Fixtures that bring a marker's resource: a test using one must carry the marker (and `slow`).
NEEDS = {"postgres_cluster": "postgres", "podman_env": "container", "browser": "browser",
         "mlflow_server": "slow", "moto_s3": "slow"}


# Tests in parallel (pytest-xdist: `scripts/test.sh -n 2`, with `--dist loadgroup` from
# pyproject.toml): each worker process has session fixtures of its own (a PostgreSQL cluster,
# moto, ...: cheap), and the tests of one group run on one worker, one after another. A group
# for each resource that is costly to build per worker or that exists once per machine, named by
# the marker or fixture that brings it; a new slow test using one joins its group by itself.
XDIST_GROUPS = {
    # the project's image, built once a session; the SageMaker SDK's local mode, whose
    # docker-compose network `sagemaker-local` is machine-wide
    "container": "podman",
    "slurm_cluster": "slurm",  # one SLURM cluster (munged, slurmdbd, MariaDB) on this machine
}


def pytest_collection_modifyitems(config, items):
    """A test using a PostgreSQL cluster, Podman, a browser or a server must be marked so, and
    every such mark implies `slow`: `-m "not slow"` must never start one. Tests sharing a
    resource get its pytest-xdist group (XDIST_GROUPS)."""
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        wanted = {NEEDS[f] for f in item.fixturenames if f in NEEDS}
        if marks & {"postgres", "container", "browser"}:
            wanted.add("slow")
        if wanted - marks:
            raise pytest.UsageError(f"{item.nodeid} needs the marker(s) {sorted(wanted - marks)}")
        groups = [g for key, g in XDIST_GROUPS.items() if key in marks | set(item.fixturenames)]
        if groups and config.pluginmanager.hasplugin("xdist"):
            item.add_marker(pytest.mark.xdist_group(groups[0]))


@pytest.fixture(autouse=True)
def no_leaked_environment(request):
    """Fail a test that leaves MLFLOW_* variables changed in this process's environment (e.g. by
    mlflow.set_tracking_uri or abalone's connect()): every later test would inherit them. The
    environment is put back, so only the leaking test fails."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    if after != before:
        for key in after.keys() - before.keys():
            del os.environ[key]
        os.environ.update(before)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        pytest.fail(f"{request.node.nodeid} leaked {changed} into os.environ; run such code in a "
                    "subprocess or use monkeypatch", pytrace=False)


@pytest.fixture(autouse=True)
def quick_tests_start_no_process(request, monkeypatch):
    """A test not marked `slow` may not start Python (the CLI, a server, moto), a script of the
    project, Podman or a browser: the quick tier stays in-process. (Libraries' own helpers,
    such as ctypes running ldconfig, are left alone.)"""
    if request.node.get_closest_marker("slow"):
        return
    real = subprocess.Popen.__init__
    ours = (str(Path(sys.executable).parent), str(REPO))

    def refuse(self, args, *rest, **kwargs):
        program = str(args[0] if isinstance(args, (list, tuple)) else args).split()[0]
        if program.startswith(ours) or Path(program).name in (
                "python", "python3", "podman", "docker", "chromium", "bash", "sh", "runuser"):
            pytest.fail(f"{request.node.nodeid} starts {program}: mark it slow", pytrace=False)
        real(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def scrubbed_environ(**extra: str) -> dict[str, str]:
    """This process's environment without MLFLOW_* (a test's subprocess names its own store),
    plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **extra}


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
            module: str = "abalone.train", timeout: float = CLI_TIMEOUT,
            python: str = sys.executable):
    """`python -m abalone.train ARGS` in `cwd`, as a user would type it (`python`: another
    venv's, e.g. tests/venvs.py's with PyTorch)."""
    full_env = scrubbed_environ()
    full_env.pop("ABALONE_DATA", None)
    if data is not None:
        full_env["ABALONE_DATA"] = str(data)
    full_env.update(env or {})
    return subprocess.run([python, "-m", module, *args], cwd=cwd, env=full_env,
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
    root = Path(tempfile.mkdtemp(prefix="abalone-pg-"))
    try:
        cluster = Postgres(root)
    except RuntimeError as err:
        pytest.fail(str(err))
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster, request):
    """A new, empty database in the session's cluster, for one test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return postgres_cluster.create_database(name)


def load_study(storage: str):
    """The one study in `storage` (a journal file's path or a database URL), as abalone opens it."""
    import optuna

    from abalone.study.storage import make_storage

    (summary,) = optuna.get_all_study_summaries(make_storage(storage))
    return optuna.load_study(study_name=summary.study_name, storage=make_storage(storage))


def poll(condition, what: str, timeout: float = CLI_TIMEOUT, every: float = 0.2):
    """`condition()`'s first truthy value, checked every `every` s until `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s")


class Proxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of `upstream`, serving from a thread of its own. It
    records each request (method, path, headers); while `status` is set it answers every request
    with that status (and Retry-After: 1) instead, counting them in `answered`; `rewrite(path,
    status, body)` may change what the upstream answered."""

    def __init__(self, upstream: str, rewrite=None):
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.rewrite = rewrite or (lambda path, status, body: body)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.status: int | None = None
        self.answered: Counter = Counter()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy = self.server
        proxy.requests.append((self.command, self.path, dict(self.headers.items())))
        status = proxy.status
        if status is not None:
            proxy.answered[status] += 1
            self.send_response(status)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        # The upstream gets no Authorization: the client signed for the proxy's address.
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "authorization", "connection", "content-length")}
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        content = proxy.rewrite(self.path, response.status, response.read())
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


# -- moto's standalone server ----------------------------------------------------------------

@contextlib.contextmanager
def moto_server(log_path: Path, env: dict | None = None):
    """moto's server on 127.0.0.1 (its request log in `log_path`); yields its URL."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/moto-api/", proc)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """moto as the S3 endpoint for the session, with one bucket; its log lists every request."""
    import boto3

    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_server(log_path) as url:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
        s3.create_bucket(Bucket="abalone-bucket")
        yield url, s3, log_path


def opt_ml_folders(root: Path, data_file: Path, hyperparameters: str = "{}",
                   resource_config: dict | None = None) -> Path:
    """/opt/ml as SageMaker lays it out for one host: the `training` channel with the data file,
    input/config, model and output."""
    for sub in ("input/data/training", "input/config", "model", "output"):
        (root / sub).mkdir(parents=True)
    shutil.copy(data_file, root / "input/data/training/abalone.data")
    (root / "input/config/hyperparameters.json").write_text(hyperparameters)
    if resource_config is not None:
        (root / "input/config/resourceconfig.json").write_text(json.dumps(resource_config))
    return root


# -- Podman: the DLC stand-in and the project's image, once a session ---------------------------

CONTAINER_DIR = REPO / "tests" / "container"
# Per session: other checkouts on this machine share Podman's store.
SESSION = f"{os.getpid()}"
PROJECT_IMAGE = f"localhost/abalone-dlc-test:session-{SESSION}"
CONTAINER_TIMEOUT = 600


def podman(env: dict, *args: str, timeout: float = CONTAINER_TIMEOUT, check: bool = True):
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=check)


@pytest.fixture(scope="session")
def podman_env() -> dict[str, str]:
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        pytest.fail("podman and mmdebstrap are missing: scripts/test.sh installs them")
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINER_DIR / "containers.conf")}


@pytest.fixture(scope="session")
def standin_base(podman_env) -> str:
    """The DLC stand-in, tagged by the digest of its inputs: built once per change of them and
    kept between runs (it takes long)."""
    digest = hashlib.sha256()
    for path in sorted(CONTAINER_DIR.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    tag = f"localhost/abalone-dlc-standin:{digest.hexdigest()[:12]}"
    # Podman's store is machine-wide: another checkout's run that wants the same stand-in waits
    # for this build instead of making it a second time.
    with open(Path(tempfile.gettempdir()) / "abalone-dlc-standin.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman(podman_env, "image", "exists", tag, check=False).returncode != 0:
            subprocess.run([str(CONTAINER_DIR / "build_standin.sh"), tag], env=podman_env,
                           check=True, timeout=3600)
    return tag


@pytest.fixture(scope="session")
def project_image(standin_base, podman_env) -> str:
    """The project's Dockerfile, unchanged, on the stand-in; a tag of this session's own,
    removed at its end."""
    built = podman(podman_env, "build", "--network=host", "--build-arg",
                   f"BASE_IMAGE={standin_base}", "--tag", PROJECT_IMAGE, str(REPO),
                   timeout=1800, check=False)
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    yield PROJECT_IMAGE
    podman(podman_env, "rmi", "--force", PROJECT_IMAGE, check=False)
