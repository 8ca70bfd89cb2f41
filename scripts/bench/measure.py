"""How the sections measure: a command in a fresh process (wall seconds, peak memory, when its
first epoch line came), our default run read back from its MLflow run, a function of a `bench`
module called in a fresh interpreter, medians."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def run_measured(cmd: list[str], cwd: Path, env: dict, timeout: float = 3600) -> dict:
    """Run `cmd`; its output, wall seconds, peak RSS (MiB), and when its first epoch line came."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, first_epoch = [], None
    for line in proc.stdout:
        lines.append(line)
        if first_epoch is None and re.search(r"\bepoch +1/", line):
            first_epoch = time.monotonic() - start
        if time.monotonic() - start > timeout:
            proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"output": output, "wall_seconds": time.monotonic() - start,
            "peak_rss_mib": usage.ru_maxrss / 1024, "first_epoch_seconds": first_epoch}


def base_env(data_path: str, **extra: str) -> dict:
    """This environment without MLflow's settings, with the data file, unbuffered output, and
    scripts/ on PYTHONPATH so the process imports `bench` (a worker's simulated launcher, a
    section's function in a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    path = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    env.update({"ABALONE_DATA": data_path, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra})
    return env


def our_run(data_path: str, overrides: list[str], env_extra: dict | None = None,
            tracking_uri: str | None = None, again: bool = False) -> dict:
    """`python -m abalone.train OVERRIDES` in a fresh folder; figures read back from its MLflow
    run (the newest in `tracking_uri`, by default the run's own SQLite store). With `again`, the
    same command once more in that folder, for its start-up with the SQLite store in place."""
    import mlflow

    command = [sys.executable, "-m", "abalone.train", *overrides]
    env = base_env(data_path, **(env_extra or {}))
    with tempfile.TemporaryDirectory(prefix="abalone-bench-") as tmp:
        measured = run_measured(command, Path(tmp), env)
        client = mlflow.MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{tmp}/mlflow.db")
        experiment = client.get_experiment_by_name("abalone-tensorflow-experiment")
        (run,) = client.search_runs([experiment.experiment_id], max_results=1,
                                    order_by=["attributes.start_time DESC"])
        epochs = len(client.get_metric_history(run.info.run_id, "loss"))
        metrics = run.data.metrics
        rerun = run_measured(command, Path(tmp), env) if again else {}
    return {"fit_seconds": metrics["total_training_time"], "epochs": epochs,
            "seconds_per_epoch": metrics["total_training_time"] / epochs,
            "test_rmse": metrics["test_rmse"], "test_mae": metrics["test_mae"],
            "test_r2": metrics["test_r2"], "peak_rss_mib": measured["peak_rss_mib"],
            "first_epoch_seconds": measured["first_epoch_seconds"],
            "first_epoch_seconds_existing_store": rerun.get("first_epoch_seconds"),
            "wall_seconds": measured["wall_seconds"]}


def in_fresh_interpreter(function: str, arguments: tuple, cwd: Path, env: dict):
    """`function(*arguments)` ("module:name" of the `bench` package), called in a new Python
    process (`env` from `base_env`): its JSON-able result, and the process's measurements from
    `run_measured`."""
    module, name = function.split(":")
    code = (f"import json, bench.{module} as m; "
            f"print('RESULT', json.dumps(m.{name}(*{arguments!r})))")
    measured = run_measured([sys.executable, "-c", code], cwd, env)
    return json.loads(measured["output"].split("RESULT ", 1)[1].splitlines()[0]), measured


def with_overrides(fixed: dict, extra: list[str]) -> list[str]:
    """`fixed` as KEY=VALUE overrides, then those of `extra` that set other keys: the section's
    own values win, and each key is given once."""
    return [*(f"{k}={v}" for k, v in fixed.items()),
            *(o for o in extra if o.split("=", 1)[0].lstrip("+~") not in fixed)]


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None
