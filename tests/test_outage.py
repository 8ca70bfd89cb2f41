"""A sweep rides out outages of its tracking server: a real `mlflow server` killed (its whole
process group) and started again on the same port and store, and a proxy answering 503 and 429.

The outages wait on purpose and are kept to a few seconds: each sweep carries several of them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from abalone.sweep import slots

from conftest import (CLI_TIMEOUT, Proxy, free_port, load_study, poll, scrubbed_environ,
                      start_mlflow_server, sweep_runs)

pytestmark = pytest.mark.slow

MODEL = "abalone-tensorflow-model"
EPOCHS = 6
# Random trials of the quick sweep, every epoch run (no pruner, no early stopping), one line each.
SWEEP = ["-m", "sweep=quick", f"trainer.epochs={EPOCHS}", "trainer.patience=0",
         "trainer.verbose=1", "hydra.sweeper.pruner.name=none", "hydra.sweeper.sampler.name=random",
         "tracking=server"]
EPOCH_KEYS = ("loss", "val_loss", "rmse", "val_rmse", "mae", "val_mae", "learning_rate",
              "epoch_duration")


class Server:
    """An `mlflow server` that the test kills and starts again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        _, self.proc = start_mlflow_server(self.root, "--artifacts-destination",
                                           str(self.root / "artifacts"), port=self.port)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the CLI and its uvicorn child
        self.proc.wait()


@pytest.fixture
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


class Sweep:
    """The CLI in a subprocess, its output read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path, data: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "abalone.train", *args], cwd=cwd,
                                     env=scrubbed_environ(ABALONE_DATA=str(data)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ended = False
        self.seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()
        with self.seen:
            self.ended = True  # the output is complete
            self.seen.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = CLI_TIMEOUT) -> None:
        """Until `count` lines match `pattern` (the process's exit ends the wait too)."""
        def seen() -> int:
            return sum(1 for line in self.lines if re.search(pattern, line))

        with self.seen:
            if not self.seen.wait_for(lambda: seen() >= count or self.ended, timeout):
                raise AssertionError(f"no line matching {pattern!r}:\n{self.output[-4000:]}")
            assert seen() >= count, (
                f"exited before line {count} matching {pattern!r}:\n{self.output[-4000:]}")

    def finish(self) -> int:
        code = self.proc.wait(timeout=CLI_TIMEOUT)
        with self.seen:  # the last lines, up to the end of the output
            assert self.seen.wait_for(lambda: self.ended, 60), "the output did not end"
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def assert_trial_runs_whole(client: MlflowClient, study: optuna.Study) -> dict[int, object]:
    """Every COMPLETE trial's run FINISHED with all its epochs' metrics, once each, in order of
    the time each epoch ended; returns the trial runs by trial number."""
    _, runs = sweep_runs(client)
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        run = by_number[trial.number]
        assert run.info.status == "FINISHED", trial.number
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert "test_rmse" in run.data.metrics
        for key in EPOCH_KEYS:
            history = sorted(client.get_metric_history(run.info.run_id, key),
                             key=lambda m: m.step)
            assert [m.step for m in history] == list(range(1, EPOCHS + 1)), (trial.number, key)
            assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    return by_number


def assert_champion(client: MlflowClient, study: optuna.Study) -> None:
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == study.best_trial.user_attrs["mlflow_run_id"]


DOWN = re.escape("unreachable (")


def outage_lines(output: str) -> tuple[list[str], list[str]]:
    lines = output.splitlines()
    return ([line for line in lines if "unreachable (" in line],
            [line for line in lines if re.search(r"back after [\d.]+s; \d+ requests? waited",
                                                 line)])


def test_sweep_rides_out_restarts_mid_trial_between_trials_and_at_registration(
        tmp_path, data_file, server):
    sweep = Sweep([*SWEEP, "hydra.sweeper.n_trials=2", f"tracking.uri={server.url}"], tmp_path,
                  data_file)
    # Mid-trial: training goes on to its last epoch while the server is down. Each outage
    # lasts until the sweep has reported it, so each is seen whatever the machine's speed.
    sweep.wait_for(rf"epoch +2/{EPOCHS}")
    server.kill()
    sweep.wait_for(rf"epoch +{EPOCHS}/{EPOCHS}")
    sweep.wait_for(DOWN)
    server.start()
    restarted_ms = int(time.time() * 1000)
    # Between trials: the result's report on the parent run and the next run's start wait.
    sweep.wait_for(r"trial +0 +COMPLETE")
    server.kill()
    sweep.wait_for(DOWN, count=2)
    server.start()
    # The champion's registration.
    sweep.wait_for(r"study '.*': 2 COMPLETE")
    server.kill()
    sweep.wait_for(DOWN, count=3)
    server.start()
    assert sweep.finish() == 0, sweep.output[-6000:]
    out = sweep.output
    assert "Traceback" not in out and "Retrying (" not in out, out[-6000:]
    down, back = outage_lines(out)
    assert len(down) == 3 and len(back) == 3, out[-6000:]
    assert server.url in down[0] and "Connection" in down[0]

    study = load_study(str(tmp_path / "optuna-studies.journal"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    client = MlflowClient(tracking_uri=server.url)
    runs = assert_trial_runs_whole(client, study)
    # The epochs held back during the outage went out with the time each one ended.
    first = client.get_metric_history(runs[0].info.run_id, "val_rmse")
    assert max(m.timestamp for m in first) < restarted_ms
    (parent,), _ = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_complete"] == 2
    assert parent.data.tags["registration"].startswith("registered")
    assert_champion(client, study)


PERMANENT_ERRORS_CHECK = """
import sys
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from abalone import tracking
from abalone.config import TrackingConfig

url, run_id = sys.argv[1:]
tracking.connect(OmegaConf.structured(TrackingConfig(uri=url, outage_grace=30)))
print("connected", flush=True)
for _ in sys.stdin:  # the test sets the proxy's answer, then asks for one request
    try:
        MlflowClient(tracking_uri=url).get_run(run_id)
        print("answered", flush=True)
    except MlflowException:
        print("MlflowException", flush=True)
"""


def test_outage_beyond_grace_stops_the_sweep_and_a_rerun_resumes_through_throttling(
        tmp_path, data_file, server):
    # Named: the rerun reaches the server through a proxy, another tracking.uri.
    args = [*SWEEP, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=outage"]
    sweep = Sweep([*args, f"tracking.uri={server.url}", "tracking.outage_grace=3"], tmp_path,
                  data_file)
    sweep.wait_for(rf"epoch +2/{EPOCHS}")
    server.kill()
    assert sweep.finish() == 1, sweep.output[-6000:]
    out = sweep.output
    assert "Traceback" not in out, out[-6000:]
    assert re.search(rf"error: the MLflow tracking server at {server.url} was unreachable for "
                     r"\d+s, longer than tracking.outage_grace=3s", out), out[-6000:]
    assert len(outage_lines(out)[0]) == 1
    # The sweep stopped instead of failing trial after trial; the outage failed the trial, not
    # its parameters, which are queued again.
    journal = str(tmp_path / "optuna-studies.journal")
    assert [t.state for t in load_study(journal).trials] == [TrialState.FAIL,
                                                              TrialState.WAITING]

    server.start()
    proxy = Proxy(server.url)
    try:
        # The same sweep again (the default grace), through a proxy that throttles a while.
        sweep = Sweep([*args, f"tracking.uri={proxy.url}"], tmp_path, data_file)
        sweep.wait_for(rf"epoch +2/{EPOCHS}")
        # Each answer holds until a request got it: one outage, 503 then 429.
        proxy.status = 503
        poll(lambda: proxy.answered[503] >= 1, "no request got the 503")
        proxy.status = 429
        poll(lambda: proxy.answered[429] >= 1, "no request got the 429")
        proxy.status = None
        assert sweep.finish() == 0, sweep.output[-6000:]
        down, back = outage_lines(sweep.output)
        assert len(down) == 1 and "HTTP 503" in down[0] and len(back) == 1, sweep.output[-6000:]

        study = load_study(journal)
        # The outage failed trial 0, not its parameters: they ran again (trial 1), and
        # n_trials=2 finished trials besides.
        assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                                   TrialState.COMPLETE]
        assert study.trials[0].user_attrs["transport_fault"]
        assert slots.retried_number(study.trials[1]) == 0
        assert study.trials[1].params == study.trials[0].params
        client = MlflowClient(tracking_uri=server.url)
        runs = assert_trial_runs_whole(client, study)
        # The run the outage left RUNNING was ended by the rerun.
        assert runs[0].info.status == "FAILED" and runs[0].data.tags["optuna.state"] == "FAIL"
        (parent,), _ = sweep_runs(client)
        assert parent.info.status == "FINISHED"
        assert_champion(client, study)

        # Permanent errors are not retried: one request, one error. In a process of its own:
        # connect() sets its process's MLflow tracking URI, which would outlive this test.
        check = subprocess.Popen(
            [sys.executable, "-c", PERMANENT_ERRORS_CHECK, proxy.url, runs[1].info.run_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=scrubbed_environ())
        assert check.stdout.readline().strip() == "connected"
        for status in (403, 404, 400, 500):
            proxy.status = status
            check.stdin.write("next\n")
            check.stdin.flush()
            assert check.stdout.readline().strip() == "MlflowException", status
            assert proxy.answered[status] == 1, status
        check.stdin.close()
        assert check.wait(timeout=60) == 0
    finally:
        proxy.close()
