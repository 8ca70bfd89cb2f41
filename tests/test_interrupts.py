"""Ctrl-C on a single run, as a person presses it mid-training: one line, exit 130, the run
KILLED with a note that counts the epochs it holds, nothing registered."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import scrubbed_environ


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
