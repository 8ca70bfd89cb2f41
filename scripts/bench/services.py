"""Servers on 127.0.0.1 and the processes behind them, for the benchmark and the tests alike
(tests/conftest.py re-exports these names): a free port, waiting for an HTTP answer, a real
`mlflow server`, stopping a process, the Podman container a trial runs in."""

from __future__ import annotations

import contextlib
import os
import signal
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
    The server leads its own process group (uvicorn or gunicorn and their workers are its
    children): `stop(proc)` ends the whole server, `os.killpg` kills it."""
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
        stop(proc, timeout=5)
        raise RuntimeError((root / "server.log").read_text()[-3000:])
    return url, proc


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies left out)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or it ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to `proc` and, when it leads a process group of its own (start_new_session, as
    start_mlflow_server's servers do), to the whole group: a server's gunicorn or uvicorn workers
    outlive a signal to the `mlflow server` command alone, re-parented to init. SIGKILL to
    whatever is left after `timeout` s. (A pid never equals a group id in use, so the group
    `proc.pid` exists only if `proc` made it.)"""

    def signal_all(number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group_members(proc.pid):
                os.killpg(proc.pid, number)
            elif proc.poll() is None:
                proc.send_signal(number)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    while (proc.poll() is None or group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None or group_members(proc.pid):
        signal_all(signal.SIGKILL)
        proc.wait(timeout=30)


class Postgres:
    """A throwaway PostgreSQL cluster from Debian's server binaries on 127.0.0.1 only (as the
    `postgres` account when run as root: initdb refuses root), in `root`. `kill()` is kill -9 of
    the postmaster; `start()` again runs on the same data folder and port (crash recovery)."""

    def __init__(self, root: Path, port: int | None = None):
        import glob
        import pwd

        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bindirs:
            raise RuntimeError("PostgreSQL's server binaries are missing: scripts/test.sh "
                               "installs Debian's postgresql package")
        self.bindir = Path(bindirs[-1]).parent
        self.root, self.data, self.port = root, root / "data", port or free_port()
        self.as_postgres: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(root, account.pw_uid, account.pw_gid)
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.as_postgres, str(self.bindir / "initdb"), "-D", str(self.data),
                        "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True)
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}"
        self.start()

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_postgres, str(self.bindir / "pg_ctl"), "-D",
                               str(self.data), *args], check=check, capture_output=True,
                              text=True, timeout=120)

    def start(self) -> None:
        self._ctl("-l", str(self.root / "server.log"), "-w", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.root} -F", "start")

    def _processes(self) -> list[int]:
        """The cluster's processes: the postmaster and its children run in its data folder."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.readlink(entry / "cwd") == str(self.data):
                    found.append(int(entry.name))
            except OSError:
                pass
        return [pid for pid in found if not gone(pid)]

    def kill(self) -> None:
        """kill -9 of the postmaster and every backend (as a crashed host leaves none); one
        forked meanwhile is killed in the next round."""
        import signal

        deadline = time.monotonic() + 30
        while (victims := self._processes()) and time.monotonic() < deadline:
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def start_again(self, attempts: int = 10) -> None:
        """`start` after a kill: the port and shared memory of the killed cluster may take a
        moment to be released."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except subprocess.CalledProcessError:
                if attempt == attempts - 1:
                    log = (self.root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start again: {log}") from None
                time.sleep(2)

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg2

        connection = psycopg2.connect(self.url.replace("postgresql+psycopg2", "postgresql")
                                      + "/postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
            cursor.execute(f"CREATE DATABASE {name}")
        connection.close()
        return f"{self.url}/{name}"

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop", check=False)


def container_of(trial, names: list[str], env: dict | None = None) -> str | None:
    """The Podman container (of `names`) whose PID namespace the trial's process lives in."""
    for name in names:
        pid = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name], env=env,
                             capture_output=True, text=True).stdout.strip()
        try:
            if pid.isdigit() and int(pid) > 0 and os.readlink(f"/proc/{pid}/ns/pid") == \
                    trial.user_attrs.get("pid_namespace"):
                return name
        except OSError:  # it ended meanwhile
            continue
    return None
