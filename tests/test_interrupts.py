"""Ctrl-C on a single run, as a person presses it mid-training: one line, exit 130, the run
KILLED with a note that counts the epochs it holds, nothing registered. SIGTERM and SIGHUP end a
run or a sweep the same way (exit 143, 129), a sweep's worker processes stop with it (even when
it is killed), a signal during registration leaves no model version, and a second signal ends
the shutdown at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from abalone.sweep.slots import retried_number
from bench.services import gone
from conftest import (CLI_TIMEOUT, TINY, Proxy, load_study, poll, scrubbed_environ,
                      sweep_runs)


@pytest.mark.slow
def test_ctrl_c_on_a_single_run_ends_it_killed_with_one_line(tmp_path, data_file, monkeypatch):
    env = {**scrubbed_environ(), "ABALONE_DATA": str(data_file)}
    process = subprocess.Popen(
        [sys.executable, "-m", "abalone.train", "trainer.epochs=100000", "trainer.patience=0",
         "trainer.batch_size=1024"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:  # the epoch lines: training is well under way at epoch 40
        lines.append(line)
        if re.search(r"epoch +40/", line) or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    out = "".join(lines) + rest
    assert process.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert out.rstrip().splitlines()[-1] == (
        "interrupted: the run ended KILLED; nothing was registered")

    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name(
        "abalone-tensorflow-experiment").experiment_id])
    assert run.info.status == "KILLED"
    logged = len(client.get_metric_history(run.info.run_id, "val_rmse"))
    assert logged >= 39  # the line of epoch 40 was printed before the logger saw it, perhaps
    assert run.data.tags["mlflow.note.content"] == f"Interrupted (Ctrl-C) after {logged} epochs."
    assert client.search_registered_models() == []
    assert os.path.isdir(tmp_path / "outputs")


# -- SIGTERM (SLURM, Kubernetes, docker stop, a spot interruption) and SIGHUP (ssh dropping) ---

def start(args: list[str], cwd, data_file, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "abalone.train", *args], cwd=cwd,
                            env=scrubbed_environ(ABALONE_DATA=str(data_file)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


class Output:
    """A process's output, read line by line as it comes (on a thread of its own)."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(process.stdout),
                                       daemon=True)
        self.thread.start()

    def wait_for(self, pattern: str, timeout: float = CLI_TIMEOUT) -> None:
        poll(lambda: any(re.search(pattern, line) for line in self.lines),
             f"a line matching {pattern!r}", timeout)

    @property
    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def assert_stops_within(process: subprocess.Popen, seconds: float) -> float:
    """The seconds the process took to exit, which must be at most `seconds`."""
    start_time = time.monotonic()
    process.wait(timeout=seconds)
    return time.monotonic() - start_time


@pytest.mark.slow
def test_sigterm_ends_a_single_run_killed_with_one_line(tmp_path, data_file, monkeypatch):
    process = start(["trainer.epochs=100000", "trainer.patience=0", "trainer.batch_size=1024"],
                    tmp_path, data_file)
    output = Output(process)
    output.wait_for(r"epoch +20/")
    process.send_signal(signal.SIGTERM)
    assert_stops_within(process, 20)
    out = output.text
    assert process.returncode == 143, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert out.rstrip().splitlines()[-1] == (
        "interrupted by SIGTERM: the run ended KILLED; nothing was registered")
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"  # absolute: MLflow caches stores by URI
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name(
        "abalone-tensorflow-experiment").experiment_id])
    assert run.info.status == "KILLED"
    logged = len(client.get_metric_history(run.info.run_id, "val_rmse"))
    assert run.data.tags["mlflow.note.content"] == f"Interrupted (SIGTERM) after {logged} epochs."
    assert client.search_registered_models() == []


def running_trials(storage: str, count: int) -> list:
    """Once `count` trials are RUNNING with their MLflow runs started: those trials."""
    def ready():
        try:
            trials = load_study(storage).trials
        except (ValueError, KeyError):
            return None
        running = [t for t in trials if t.state == TrialState.RUNNING
                   and "mlflow_run_id" in t.user_attrs]
        return running if len(running) >= count else None
    return poll(ready, f"{count} trials running", every=0.5)


# Two processes (the command and the one it starts), trials long enough to be signalled in.
TWO_PROCESSES = ["-m", "sweep=quick", "trainer.epochs=400", "trainer.patience=0",
                 "trainer.verbose=0", "hydra.sweeper.pruner.name=none", "hydra.sweeper.n_jobs=2"]


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_it_and_its_worker_process(tmp_path, data_file):
    # SIGTERM to the command alone (as `kill PID` or a scheduler that knows one pid sends it):
    # the command stops its own trial and its worker process, which stops its trial as well.
    storage = str(tmp_path / "optuna-studies.journal")
    process = start(TWO_PROCESSES, tmp_path, data_file, start_new_session=True)
    output = Output(process)
    trials = running_trials(storage, 2)
    worker = {t.user_attrs["pid"] for t in trials} - {process.pid}
    assert len(worker) == 1, [t.user_attrs for t in trials]
    os.kill(process.pid, signal.SIGTERM)
    seconds = assert_stops_within(process, 20)
    out = output.text
    assert process.returncode == 143, out[-4000:]
    assert gone(worker.pop())
    assert "Traceback" not in out, out[-4000:]
    assert out.rstrip().splitlines()[-1] == (
        "interrupted by SIGTERM: the running trial was marked FAIL and queued again; finished "
        "trials are kept in the study")
    assert ("interrupted (stopped by its sweep command): the running trial was marked FAIL and "
            "queued again") in out
    study = load_study(storage)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,), runs = sweep_runs(client)
    assert parent.info.status == "KILLED"
    for trial in trials:  # each FAIL, its parameters queued again, its run KILLED with why
        assert study.trials[trial.number].state == TrialState.FAIL
        assert [t for t in study.trials if retried_number(t) == trial.number]
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        why = ("SIGTERM" if trial.user_attrs["pid"] == process.pid
               else "stopped by its sweep command")
        assert run.data.tags["mlflow.note.content"].startswith(f"Interrupted ({why}) after ")
    print(f"a sweep of two processes stopped {seconds:.1f} s after SIGTERM")


@pytest.mark.slow
def test_a_sigkilled_sweep_leaves_no_worker_process_behind(tmp_path, data_file):
    storage = str(tmp_path / "optuna-studies.journal")
    process = start(TWO_PROCESSES, tmp_path, data_file, start_new_session=True)
    output = Output(process)
    trials = running_trials(storage, 2)
    (worker,) = {t.user_attrs["pid"] for t in trials} - {process.pid}
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    poll(lambda: gone(worker), "the worker process outlived its sweep", timeout=10)
    out = output.text
    assert f"interrupted (its sweep command, pid {process.pid}, is gone): the running trial " \
           "was marked FAIL and queued again" in out, out[-3000:]
    (mine,) = [t for t in trials if t.user_attrs["pid"] == worker]
    study = load_study(storage)
    assert study.trials[mine.number].state == TrialState.FAIL
    assert [t for t in study.trials if retried_number(t) == mine.number]


@pytest.mark.slow
def test_sighup_ends_a_sweep_as_ctrl_c_does(tmp_path, data_file):
    storage = str(tmp_path / "optuna-studies.journal")
    process = start([*TWO_PROCESSES[:-1]], tmp_path, data_file, start_new_session=True)
    output = Output(process)
    (trial,) = running_trials(storage, 1)
    process.send_signal(signal.SIGHUP)
    assert_stops_within(process, 20)
    out = output.text
    assert process.returncode == 129, out[-3000:]
    assert out.rstrip().splitlines()[-1].startswith("interrupted by SIGHUP: the running trial")
    study = load_study(storage)
    assert study.trials[trial.number].state == TrialState.FAIL
    assert [t for t in study.trials if retried_number(t) == trial.number]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,), _ = sweep_runs(client)
    assert parent.info.status == "KILLED"


@pytest.fixture
def held(mlflow_server):
    """A proxy in front of the MLflow server that holds the reply to the first request whose
    path contains `held.path` until `held.release` is set (the server has acted by then)."""
    holding, release = threading.Event(), threading.Event()

    def rewrite(path, status, body):
        if held_path[0] and held_path[0] in path and not holding.is_set():
            holding.set()
            release.wait(60)
        return body

    held_path = [""]
    proxy = Proxy(mlflow_server, rewrite)
    proxy.holding, proxy.release, proxy.held_path = holding, release, held_path
    yield proxy
    release.set()
    proxy.close()


@pytest.mark.slow
def test_a_signal_during_registration_leaves_no_model_version(tmp_path, data_file, held,
                                                              mlflow_server):
    held.held_path[0] = "model-versions/create"
    process = start([*TINY, "tracking=server", f"tracking.uri={held.url}"], tmp_path, data_file)
    output = Output(process)
    poll(held.holding.is_set, "the model version's creation", every=0.1)
    process.send_signal(signal.SIGTERM)  # the version exists; its reply is held
    time.sleep(1)
    held.release.set()
    assert_stops_within(process, 20)
    out = output.text
    assert process.returncode == 143, out[-3000:]
    assert out.rstrip().splitlines()[-1] == (
        "interrupted by SIGTERM: the run ended KILLED; nothing was registered")
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.search_model_versions("name='abalone-tensorflow-model'") == []
    (run,) = client.search_runs([client.get_experiment_by_name(
        "abalone-tensorflow-experiment").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_a_second_signal_during_the_shutdown_ends_it_at_once(tmp_path, data_file, held):
    # The shutdown's first request to the server (the epochs the run holds) waits on the proxy;
    # a second SIGTERM then ends the process at once.
    held.held_path[0] = "metrics/get-history"
    process = start(["trainer.epochs=100000", "trainer.patience=0", "trainer.batch_size=1024",
                     "tracking=server", f"tracking.uri={held.url}"], tmp_path, data_file)
    output = Output(process)
    output.wait_for(r"epoch +20/")
    process.send_signal(signal.SIGTERM)
    poll(held.holding.is_set, "the shutdown's first request", timeout=20, every=0.1)
    process.send_signal(signal.SIGTERM)
    assert_stops_within(process, 5)
    out = output.text
    assert process.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    assert out.rstrip().splitlines()[-1] == (
        "interrupted again (SIGTERM): leaving at once; a trial or run left RUNNING is ended by "
        "the next command")


@pytest.mark.slow
def test_signals_never_break_the_journal_lock_another_process_holds(tmp_path, data_file):
    # This test holds the study journal's lock (Optuna's: a symlink beside it) as another
    # process would; the sweep, stopping on SIGTERM, waits for it to write its trial's end, and a
    # second SIGTERM while it waits (Optuna's lock, interrupted, removes the lock it waits for)
    # must leave the lock alone. Released, the sweep writes its line whole and leaves.
    journal = tmp_path / "optuna-studies.journal"
    lock = Path(f"{journal}.lock")
    process = start([*TWO_PROCESSES[:-1]], tmp_path, data_file, start_new_session=True)
    output = Output(process)
    (trial,) = running_trials(str(journal), 1)

    def take() -> bool:
        try:
            os.symlink(journal, lock)
            return True
        except FileExistsError:  # the sweep is writing: its lock
            return False

    poll(take, "the journal's lock", every=0.01)
    try:
        process.send_signal(signal.SIGTERM)  # it stops, and waits for the lock to end its trial
        time.sleep(3)
        assert process.poll() is None, output.text[-3000:]
        process.send_signal(signal.SIGTERM)
        time.sleep(3)
        assert lock.is_symlink(), "a signal removed the lock another process holds"
        assert process.poll() is None, output.text[-3000:]
    finally:
        lock.unlink()
    assert_stops_within(process, 20)
    out = output.text
    assert process.returncode == 143, out[-3000:]
    assert out.rstrip().splitlines()[-1].startswith("interrupted again (SIGTERM): leaving at once")
    assert journal.read_bytes().endswith(b"\n")
    assert load_study(str(journal)).trials[trial.number].state == TrialState.FAIL
