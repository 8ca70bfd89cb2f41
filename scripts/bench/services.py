"""Servers on 127.0.0.1 and the processes behind them, for the benchmark and the tests alike
(tests/conftest.py re-exports these names): a free port, waiting for an HTTP answer, a real
`mlflow server`, stopping a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


# MLflow 3's server starts job consumers (for its GenAI jobs, unused by tracking) that poll their
# queue at about 40% of a core while idle: on 2 cores, noise in every fit measured beside them.
QUIET_SERVER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_server(root: Path, *extra: str, env: dict | None = None,
                        port: int | None = None, python: str = sys.executable):
    """An `mlflow server` subprocess on 127.0.0.1 (`port`, else a free one) with its store under
    `root`, run by `python` (another venv's, for another MLflow version); returns (url, proc).
    The server leads its own process group (uvicorn is its child), so a caller can kill the
    whole server with os.killpg."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [python, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db", *extra],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**(env or os.environ), **QUIET_SERVER})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc)
    except RuntimeError:
        proc.kill()
        raise RuntimeError((root / "server.log").read_text()[-3000:])
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
