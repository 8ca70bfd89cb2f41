"""No process left behind: the session-end check (tests/conftest.py imports these hooks).

Every process the tests start inherits ABALONE_TEST_PROCESS from the pytest process that runs
them (tests build their subprocesses' environments from os.environ), and /proc/PID/environ keeps
it, so a process still running when the session ends is found even after its parent died and
init adopted it (a server's worker), or when it made a session of its own (a daemon). The check
runs after every fixture is torn down, so what a session fixture keeps until its own teardown
(the PostgreSQL cluster, moto, the SLURM cluster) counts only if that teardown left it running.
Such processes are killed, listed with the test that was running when each started, and fail
the run. Under pytest-xdist each worker checks its own and the controller fails the run."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

MARK = "ABALONE_TEST_PROCESS"
GRACE = 20  # seconds for processes signalled in a teardown to end before they count
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_test_starts: list[tuple[float, str]] = []  # (seconds since boot, nodeid), in order
# (pid, start) -> the test after whose teardown the process was first seen running: exact where
# start times (10 ms ticks) cannot tell two quick tests apart.
_first_seen: dict[tuple[int, float], str] = {}
_reported: list[str] = []  # under xdist, the controller's collection of its workers' lines


def pytest_configure(config):
    # Per process: an xdist worker replaces its controller's value, so each checks its own.
    os.environ[MARK] = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _test_starts.append((time.clock_gettime(time.CLOCK_BOOTTIME), item.nodeid))


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    for pid, (start, _) in started_by_us().items():
        _first_seen.setdefault((pid, start), item.nodeid)


def started_by_us() -> dict[int, tuple[float, str]]:
    """{pid: (start, command line)} of the live processes carrying this process's mark (start in
    seconds since boot)."""
    needle = f"\0{MARK}={os.environ[MARK]}\0".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in b"\0" + (entry / "environ").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:  # it ended meanwhile, or is not ours to read
            continue
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[19]) / _CLOCK_TICKS, command)
    return found


def _started_during(start: float) -> str:
    """The test whose setup began last before `start` (seconds since boot)."""
    earlier = [nodeid for begun, nodeid in _test_starts if begun <= start + 1 / _CLOCK_TICKS]
    return earlier[-1] if earlier else "(before the first test)"


def left_behind() -> list[str]:
    """Lines naming each process of ours still running GRACE s from now (or when all ended
    sooner); those are killed."""
    deadline = time.monotonic() + GRACE
    while (found := started_by_us()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [f"pid {pid} `{command[:200]}`, started during "
            f"{_first_seen.get((pid, start)) or _started_during(start)}"
            for pid, (start, command) in sorted(found.items())]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _reported.extend(getattr(node, "workeroutput", {}).get("left_behind", []))


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears the session's fixtures down
def pytest_sessionfinish(session):
    lines = left_behind()
    if hasattr(session.config, "workerinput"):  # an xdist worker: its controller reports
        session.config.workeroutput["left_behind"] = lines
        return
    lines += _reported
    if not lines:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", f"{len(lines)} process(es) left behind, now killed", red=True)
        for line in lines:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
