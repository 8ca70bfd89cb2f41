"""The test suite's own session-end check (tests/left_behind.py): a pytest run whose tests leave
processes running fails, naming each and the test it started in, and kills them; what a session
fixture keeps until its own teardown does not count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, scrubbed_environ
from left_behind import GRACE

SUITE = '''
import subprocess
import pytest


@pytest.fixture(scope="session")
def daemon():
    proc = subprocess.Popen(["sleep", "3000"], start_new_session=True)
    yield proc
    proc.terminate()
    proc.wait()


def test_a_session_fixtures_process_runs_until_its_teardown(daemon):
    assert daemon.poll() is None


def test_one_that_leaves_a_process_of_its_own_session():
    subprocess.Popen(["sleep", "3001"], start_new_session=True)


def test_one_that_leaves_an_orphan():
    subprocess.run(["sh", "-c", "sleep 3002 &"], check=True)  # its parent ends at once
'''
CONFTEST = ("from left_behind import (pytest_configure, pytest_runtest_setup, "
            "pytest_runtest_teardown, "
            "pytest_sessionfinish, pytest_testnodedown)\n")


def sleeping(seconds: str) -> list[int]:
    """The live `sleep SECONDS` processes on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == \
                    f"sleep\0{seconds}\0".encode():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def run_suite(folder: Path, *args: str, only: str = "") -> subprocess.CompletedProcess:
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_suite.py").write_text(SUITE)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           *(["-k", only] if only else []), *args, "test_suite.py"],
                          cwd=folder, capture_output=True, text=True, timeout=GRACE + 120,
                          env=scrubbed_environ(PYTHONPATH=str(REPO / "tests")))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_a_run_that_leaves_processes_fails_naming_them_and_kills_them(tmp_path, workers):
    done = run_suite(tmp_path, *workers)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "3 passed" in out and "2 process(es) left behind, now killed" in out, out
    assert "`sleep 3001`, started during test_suite.py::test_one_that_leaves_a_process_of_its_" \
           "own_session" in out, out
    assert "`sleep 3002`, started during test_suite.py::test_one_that_leaves_an_orphan" in out
    assert "sleep 3000" not in out  # the session fixture's, stopped by its teardown
    assert sleeping("3000") == sleeping("3001") == sleeping("3002") == []


@pytest.mark.slow
def test_a_run_that_leaves_nothing_passes(tmp_path):
    done = run_suite(tmp_path, only="session_fixture")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "left behind" not in done.stdout + done.stderr
