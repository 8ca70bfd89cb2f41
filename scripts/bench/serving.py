"""The registered model behind `mlflow models serve`: start-up, and latency and throughput per
batch size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import base_env, run_measured
from bench.sample import COLUMNS
from bench.services import free_port, wait_for_http

SERVING_BATCHES = (1, 100, 10_000)


def bench_serving(args) -> dict:
    """The registered model behind `mlflow models serve --env-manager local`: seconds from the
    command to /ping answering, then per batch size (raw rows of the file, sampled with
    replacement, as `dataframe_split` JSON) the latency of `/invocations` requests sent one after
    another by one client on a kept-alive connection, and rows per second. The model is the
    default run's with 2 epochs: training longer changes its weights, not its cost."""
    import http.client

    import pandas as pd

    rows = pd.read_csv(args.data, names=COLUMNS).drop(columns="Rings")
    with tempfile.TemporaryDirectory(prefix="abalone-bench-serving-") as tmp:
        run_measured([sys.executable, "-m", "abalone.train", "trainer.epochs=2"], Path(tmp),
                     base_env(args.data))
        port = free_port()
        # The command runs `uvicorn` from PATH, as with the venv active; and starts it as a
        # child, hence a process group to stop.
        env = base_env(args.data, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
                       PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m",
             "models:/abalone-tensorflow-model/1", "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(port)], cwd=tmp, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=300)
            ready_seconds = time.monotonic() - start
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            batches = []
            for size in SERVING_BATCHES:
                sample = rows.sample(size, replace=size > len(rows), random_state=0)
                body = ('{"dataframe_split": %s}'
                        % sample.to_json(orient="split", index=False)).encode()
                latencies = []
                for request in range(args.serving_requests + 1):  # the first one warms up
                    sent = time.perf_counter()
                    connection.request("POST", "/invocations", body,
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    answer = response.read()
                    if request:
                        latencies.append(time.perf_counter() - sent)
                    if response.status != 200:
                        raise RuntimeError(f"/invocations answered {response.status}: "
                                           f"{answer[:1000]!r}")
                if len(json.loads(answer)["predictions"]) != size:
                    raise RuntimeError(f"/invocations did not predict {size} rows")
                p90 = (statistics.quantiles(latencies, n=10, method="inclusive")[-1]
                       if len(latencies) > 1 else latencies[0])
                batches.append({"rows": size, "requests": len(latencies),
                                "median_ms": statistics.median(latencies) * 1000,
                                "p90_ms": p90 * 1000,
                                "rows_per_second": size * len(latencies) / sum(latencies)})
            connection.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return {"ready_seconds": ready_seconds, "batches": batches}

