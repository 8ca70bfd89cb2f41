#!/usr/bin/env python
"""Benchmark: the AWS sample's recipe against our default run, the MLflow callback's overhead,
a sweep trial's overhead broken down into its parts, a sweep, its scaling with n_jobs, start-up
time, the study storage's per-trial cost (one process, and 1-64 simulated workers on PostgreSQL,
straight and through the gRPC storage proxy) and the registered model's latency and throughput
behind `mlflow models serve`.

    python scripts/benchmark.py                      # the full benchmark (~20 min on 2 cores)
    python scripts/benchmark.py --sweep-trials 50 --repeats 3 --postgres-url postgresql://...
    python scripts/benchmark.py --smoke              # tiny sizes: checks every figure appears
    python scripts/benchmark.py --sections serving   # one section
    python scripts/benchmark.py --sections fleet-storage --postgres-url postgresql+psycopg2://...

Every training figure comes from a fresh process (the real `python -m abalone.train`, or the
sample's recipe in its own interpreter), so imports and peak memory count as a user sees them;
only the callback's pairs of fits share one interpreter, to keep process noise out of a small ratio,
and the overhead's trials, which a sweep runs in one process anyway.
Ratios are taken pair by pair within this invocation and then their median, as the machine is
noisy. Writes OUT/benchmark.json and OUT/benchmark.md (OUT: --out, default benchmark-results/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
           "Viscera_weight", "Shell_weight", "Rings"]


# -- the sample's recipe, reproduced faithfully (run in its own interpreter) ---------------------

def sample_recipe(data_path: str, epochs: int, out_dir: str, tracking_uri: str | None) -> dict:
    """The AWS sample's training, as its script does it: scaler and one-hot fit on all rows,
    train_test_split(0.2, 42), numpy arrays, batch 32, validation_split=0.2, early stopping with
    patience 10 and a ModelCheckpoint; with `tracking_uri`, its callback's one request per metric.
    Its progress bars (verbose=1) are off, which only flatters it."""
    import numpy as np
    import pandas as pd
    import keras
    from sklearn.compose import ColumnTransformer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    np.random.seed(42)
    keras.utils.set_random_seed(42)
    frame = pd.read_csv(data_path, names=COLUMNS)
    features, target = frame.drop("Rings", axis=1), frame["Rings"].values
    preprocessor = ColumnTransformer([("num", StandardScaler(), COLUMNS[1:8]),
                                      ("cat", OneHotEncoder(), ["Sex"])])
    x = np.array(preprocessor.fit_transform(features), dtype=np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, np.array(target, dtype=np.float32), test_size=0.2, random_state=42)
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(64, activation="relu"), keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(32, activation="relu"), keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.001), loss="mse",
                  metrics=["mae"])
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=10,
                                               restore_best_weights=True),
                 keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "checkpoint-{epoch}.keras"),
                                                 save_best_only=True, monitor="val_loss")]
    requests = 0
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment("benchmark-sample-style")
        mlflow.start_run()

        class SampleStyleLogger(keras.callbacks.Callback):
            durations: list[float] = []

            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.time()

            def on_epoch_end(self, epoch, logs=None):
                nonlocal requests
                self.durations.append(time.time() - self.start)
                for name, value in (logs or {}).items():
                    mlflow.log_metric(name, value, step=epoch)
                    requests += 1
                mlflow.log_metric("epoch_duration", self.durations[-1], step=epoch)
                mlflow.log_metric("avg_epoch_duration", float(np.mean(self.durations)), step=epoch)
                lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
                mlflow.log_metric("learning_rate", lr, step=epoch)
                requests += 3

        callbacks.append(SampleStyleLogger())
    start = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=epochs, batch_size=32, validation_split=0.2,
                        callbacks=callbacks, verbose=0).history
    fit_seconds = time.perf_counter() - start
    if tracking_uri:
        mlflow.end_run()
    predicted = model.predict(x_test, verbose=0).ravel()
    residual = y_test - predicted
    return {"fit_seconds": fit_seconds, "epochs": len(history["loss"]),
            "test_rmse": float(np.sqrt(np.mean(residual ** 2))),
            "test_mae": float(np.mean(np.abs(residual))),
            "test_r2": float(1 - np.sum(residual ** 2) / np.sum((y_test - y_test.mean()) ** 2)),
            "metric_requests": requests}


# -- processes -------------------------------------------------------------------------------

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
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"ABALONE_DATA": data_path, "PYTHONUNBUFFERED": "1", **extra})
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
    """`function(*arguments)` of this file, called in a new Python process: its JSON-able result,
    and the process's measurements from `run_measured`."""
    code = ("import json, sys; sys.path.insert(0, %r); import benchmark; "
            "print('RESULT', json.dumps(benchmark.%s(*%r)))"
            % (str(Path(__file__).parent), function, arguments))
    measured = run_measured([sys.executable, "-c", code], cwd, env)
    return json.loads(measured["output"].split("RESULT ", 1)[1].splitlines()[0]), measured


def sample_run(data_path: str, epochs: int, tracking_uri: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="abalone-sample-") as tmp:
        result, measured = in_fresh_interpreter(
            "sample_recipe", (data_path, epochs, tmp, tracking_uri), Path(tmp),
            base_env(data_path, TF_CPP_MIN_LOG_LEVEL="2"))
    result["seconds_per_epoch"] = result["fit_seconds"] / result["epochs"]
    result["peak_rss_mib"] = measured["peak_rss_mib"]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# MLflow 3's server starts job consumers (for its GenAI jobs, unused by tracking) that poll their
# queue at about 40% of a core while idle: on 2 cores, noise in every fit measured beside them.
QUIET_SERVER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """An `mlflow server` on 127.0.0.1 for the callback measurements."""

    def __enter__(self) -> str:
        self.tmp = tempfile.TemporaryDirectory(prefix="abalone-bench-server-")
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.tmp.name}/s.db",
             "--artifacts-destination", f"{self.tmp.name}/artifacts"],
            cwd=self.tmp.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **QUIET_SERVER})
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                return url
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.tmp.cleanup()


# -- the sections ------------------------------------------------------------------------------

def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def bench_default_vs_sample(args) -> dict:
    epochs_override = [f"trainer.epochs={args.epochs}"] if args.epochs else []
    sample_epochs = args.epochs or 100
    ours, sample = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        sample.append(sample_run(args.data, sample_epochs))
        ours.append(our_run(args.data, epochs_override, again=True))
    keys = ("fit_seconds", "seconds_per_epoch", "epochs", "test_rmse", "test_mae", "test_r2",
            "peak_rss_mib")
    result = {"sample": {k: median_of(sample, k) for k in keys},
              "ours": {k: median_of(ours, k) for k in keys + (
                  "first_epoch_seconds", "first_epoch_seconds_existing_store", "wall_seconds")},
              "fit_speedup": statistics.median(s["fit_seconds"] / o["fit_seconds"]
                                               for s, o in zip(sample, ours)),
              "repeats": args.repeats}
    result["test_rmse_not_worse"] = result["ours"]["test_rmse"] <= result["sample"]["test_rmse"]
    if args.jax:
        jax_runs = [our_run(args.data, epochs_override, {"KERAS_BACKEND": "jax"})
                    for _ in range(args.repeats)]
        result["ours_jax"] = {k: median_of(jax_runs, k) for k in keys + ("first_epoch_seconds",)}
    return result


def bench_callback(args) -> dict:
    """Our callback's cost: the default run's training, untracked and with our MlflowLogger
    against a real server, alternating in one fresh interpreter (see `callback_pairs`); and the
    sample's one-request-per-metric logging against the same server, for contrast."""
    with MlflowServer() as url:
        pairs, _ = in_fresh_interpreter(
            "callback_pairs", (args.data, url, args.callback_epochs, args.callback_pairs), REPO,
            base_env(args.data))
        sample_off = sample_run(args.data, args.callback_epochs)
        sample_on = sample_run(args.data, args.callback_epochs, tracking_uri=url)
    ratios = [on / off - 1 for off, on in pairs]
    return {"epochs": args.callback_epochs, "pairs": len(pairs), "pair_seconds": pairs,
            "untracked_fit_seconds": statistics.median(p[0] for p in pairs),
            "tracked_fit_seconds": statistics.median(p[1] for p in pairs),
            "overhead_fraction": statistics.median(ratios),
            "overhead_quartiles": [min(ratios), max(ratios)] if len(ratios) < 2 else
            statistics.quantiles(ratios, n=4)[::2],
            "sample_style_untracked_fit_seconds": sample_off["fit_seconds"],
            "sample_style_tracked_fit_seconds": sample_on["fit_seconds"],
            "sample_style_requests": sample_on["metric_requests"],
            "sample_style_overhead_fraction": sample_on["fit_seconds"] / sample_off["fit_seconds"] - 1}


def callback_pairs(data_path: str, url: str, epochs: int, pairs: int) -> list[tuple[float, float]]:
    """(untracked, tracked) model.fit seconds of the default run's model and data, `pairs` times.

    Built as `python -m abalone.train` builds them (same config, model, tf.data input; tracked:
    a new run and our MlflowLogger with a real MlflowClient), but in one interpreter, alternating
    which of a pair goes first: a fresh process per fit adds more noise than the callback costs.
    A first pair warms the interpreter and is not counted.
    """
    import mlflow
    from hydra import compose, initialize_config_dir

    from abalone import data
    from abalone.callbacks import MlflowLogger
    from abalone.serving import model_inputs
    from abalone.train import CONF_DIR, build_model, import_keras

    keras = import_keras()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer.epochs={epochs}", "trainer.patience=0"])
    splits = data.split(data.load(Path(data_path)), cfg.data)
    train = (model_inputs(splits.train), data.target(splits.train))
    val = (model_inputs(splits.val), data.target(splits.val))
    client = mlflow.MlflowClient(tracking_uri=url)
    experiment_id = client.create_experiment(f"benchmark-callback-{time.time_ns()}")

    def fit_seconds(tracked: bool) -> float:
        keras.utils.set_random_seed(cfg.trainer.seed)
        model = build_model(cfg, splits, keras)
        callbacks = [keras.callbacks.TerminateOnNaN()]
        if tracked:
            run_id = client.create_run(experiment_id).info.run_id
            callbacks.append(MlflowLogger(client, run_id))
        start = time.perf_counter()
        model.fit(**data.fit_arguments(train, val, cfg.trainer.batch_size, cfg.trainer.seed,
                                       keras.backend.backend()),
                  epochs=epochs, verbose=0, callbacks=callbacks)
        seconds = time.perf_counter() - start
        if tracked:
            client.set_terminated(run_id)
        return seconds

    results = []
    for i in range(pairs + 1):
        first = i % 2 == 0
        a, b = fit_seconds(first), fit_seconds(not first)
        if i:
            results.append((b, a) if first else (a, b))
    return results


def bench_sweep(args, n_jobs: int) -> dict:
    import mlflow
    import optuna

    from abalone.study import make_storage

    overrides = ["-m", "sweep=search", f"hydra.sweeper.n_trials={args.sweep_trials}",
                 f"hydra.sweeper.n_jobs={n_jobs}", *args.sweep_overrides]
    with tempfile.TemporaryDirectory(prefix="abalone-bench-sweep-") as tmp:
        measured = run_measured([sys.executable, "-m", "abalone.train", *overrides], Path(tmp),
                                base_env(args.data))
        storage = make_storage(f"{tmp}/optuna-studies.journal")
        (summary,) = optuna.get_all_study_summaries(storage)
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = [t.state.name for t in study.trials]
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                                     registry_uri=f"sqlite:///{tmp}/mlflow.db")
        champion = client.get_model_version_by_alias("abalone-tensorflow-model", "champion")
        best_value = study.best_value
    finished = states.count("COMPLETE") + states.count("PRUNED")
    return {"n_trials": args.sweep_trials, "n_jobs": n_jobs,
            "wall_seconds": measured["wall_seconds"],
            "trials_per_minute": finished / measured["wall_seconds"] * 60,
            "pruned_fraction": states.count("PRUNED") / len(states),
            "failed": states.count("FAIL"),
            "best_val_rmse": best_value,
            "champion_test_rmse": float(champion.tags["test_rmse"]),
            "peak_rss_mib": measured["peak_rss_mib"]}


def bench_storage(args) -> dict:
    """Seconds of storage work per trial (ask, owner attributes, one report per epoch, tell)."""
    import optuna

    from abalone.study import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    targets = {"journal_file": None}
    if args.postgres_url:
        targets["postgresql"] = args.postgres_url
    result = {}
    with tempfile.TemporaryDirectory(prefix="abalone-bench-storage-") as tmp:
        for name, url in targets.items():
            storage = make_storage(url or f"{tmp}/bench.journal")
            study = optuna.create_study(study_name=f"bench-{time.time_ns()}", storage=storage)
            space = {"x": optuna.distributions.FloatDistribution(0, 1)}
            start = time.perf_counter()
            for _ in range(args.storage_trials):
                trial = study.ask(space)
                for key in ("host", "pid", "heartbeat"):
                    trial.set_user_attr(key, 1)
                for epoch in range(20):
                    trial.report(float(epoch), epoch)
                study.tell(trial, 1.0)
            result[name] = (time.perf_counter() - start) / args.storage_trials
    return {"seconds_per_trial": result, "reports_per_trial": 20}


# -- many workers on one study database ----------------------------------------------------------

FLEET_WORKERS = (1, 4, 16, 64)
# The storage calls of one trial, in the sweeper's order (run_trials, run_one, beat, report).
# "report" is one epoch's trial.report + should_prune, as KerasPruningCallback makes them.
FLEET_OPERATIONS = ("work_left", "fail_stale_trials", "ask", "within_total", "mark_owner",
                    "report", "heartbeat", "tell", "best_trial")


def fleet_worker(storage_url: str, study_name: str, settings: dict, ready, results) -> None:
    """One simulated worker process: the sweeper's trial loop through `abalone.study` (storage,
    stale-trial check, slots, owner attributes, heartbeat thread) around a cheap objective that
    sleeps `epoch_seconds` per epoch and reports each epoch to the default median pruner. Puts
    each storage call's seconds, its trial count and CPU seconds (or the error that stopped it)
    on `results`; waits at `ready` so that all workers start together."""
    import resource
    import random
    import threading

    import optuna

    from abalone import study as sweep
    from hydra_plugins.abalone_optuna_sweeper.config import PrunerConf

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seconds: dict[str, list[float]] = {name: [] for name in FLEET_OPERATIONS}
    lock = threading.Lock()

    def timed(name, call, *arguments):
        start = time.perf_counter()
        value = call(*arguments)
        with lock:
            seconds[name].append(time.perf_counter() - start)
        return value

    def beat(trial, stop: threading.Event) -> None:
        while not stop.wait(settings["heartbeat_seconds"]):
            timed("heartbeat", trial.set_user_attr, "heartbeat", time.time())

    def best_trial(study):
        try:
            return study.best_trial
        except ValueError:  # nothing complete yet
            return None

    trials, error, epochs, n_trials = 0, None, settings["epochs"], settings["n_trials"]
    try:
        study = optuna.load_study(study_name=study_name, storage=sweep.make_storage(storage_url),
                                  sampler=optuna.samplers.RandomSampler(),
                                  pruner=sweep.make_pruner(PrunerConf(), epochs))
    except Exception as err:  # reported, not raised: the others still run
        error = f"{type(err).__name__}: {err}"
    ready.wait(timeout=900)
    cpu_start = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    rng = random.Random(os.getpid())
    try:
        while not error and timed("work_left", sweep.work_left, study, n_trials):
            timed("fail_stale_trials", sweep.fail_stale_trials, study, settings["stale_after"],
                  lambda trial: None)
            if not timed("work_left", sweep.work_left, study, n_trials):
                break
            trial = timed("ask", study.ask, settings["space"])
            if not timed("within_total", sweep.within_total, study, trial.number, n_trials):
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            timed("mark_owner", sweep.mark_owner, trial)
            stop = threading.Event()
            heartbeat = threading.Thread(target=beat, args=(trial, stop), daemon=True)
            heartbeat.start()
            quality, state = rng.random(), optuna.trial.TrialState.COMPLETE
            for epoch in range(epochs):
                time.sleep(settings["epoch_seconds"])
                value = 2 + quality + 1 / (epoch + 1)
                start = time.perf_counter()
                trial.report(value, epoch)
                prune = trial.should_prune()
                with lock:
                    seconds["report"].append(time.perf_counter() - start)
                if prune:
                    state = optuna.trial.TrialState.PRUNED
                    break
            stop.set()
            heartbeat.join()
            timed("tell", study.tell, trial, value if state.name == "COMPLETE" else None, state)
            timed("best_trial", best_trial, study)
            trials += 1
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    # The first line only: SQLAlchemy's errors go on with a link.
    results.put({"seconds": seconds, "trials": trials, "error": error and error.splitlines()[0],
                 "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu_start})


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def process_cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU seconds of `pid` (with `children`: plus its reaped children's and its live ones')."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(float(v) for v in fields[11:15 if children else 13])
    if children:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                child = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile: its time went to the parent's reaped children
                continue
            if int(child[1]) == pid:
                total += float(child[11]) + float(child[12])
    return total / ticks


def postmaster_pid(engine) -> int | None:
    """The PID of the database's server, when it runs on this machine and we may read its data
    directory's name (a superuser); its CPU time is then the database's."""
    import sqlalchemy

    try:
        with engine.connect() as connection:
            directory = connection.execute(sqlalchemy.text("SHOW data_directory")).scalar()
        pid = int((Path(directory) / "postmaster.pid").read_text().split()[0])
        process_cpu_seconds(pid)
        return pid
    except Exception:  # not ours to measure: a remote or unprivileged database
        return None


def fleet_run(args, storage_url: str, database_url: str, workers: int, proxy_pid: int | None,
              settings: dict) -> dict:
    """`workers` simulated worker processes on one new study: trials per second from the moment
    all are ready to the last one's end, each storage call's latency percentiles, the peak of
    the database's connections, and the CPU seconds per trial of the database, the proxy and
    the workers, with the machine's load."""
    import multiprocessing
    import threading

    import optuna
    import sqlalchemy

    from abalone.study import make_storage

    study_name = f"fleet-{workers}-{time.time_ns()}"
    optuna.create_study(study_name=study_name, storage=make_storage(storage_url))
    settings = {**settings, "n_trials": workers * args.fleet_trials_per_worker}
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(workers + 1), context.Queue()
    procs = [context.Process(target=fleet_worker,
                             args=(storage_url, study_name, settings, ready, results))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.pool.NullPool)
    postmaster = postmaster_pid(engine)
    ready.wait(timeout=900)
    load_before = os.getloadavg()[0]
    cpu = [machine_cpu(), postmaster and process_cpu_seconds(postmaster, children=True),
           proxy_pid and process_cpu_seconds(proxy_pid)]
    start = time.monotonic()
    connections, running = [], True

    def count_connections() -> None:
        query = sqlalchemy.text("SELECT count(*) - 1 FROM pg_stat_activity "
                                "WHERE datname = current_database()")
        with engine.connect() as connection:
            while running:
                connections.append(connection.execute(query).scalar())
                time.sleep(0.25)

    counter = threading.Thread(target=count_connections, daemon=True)
    counter.start()
    reports = [results.get(timeout=3600) for _ in procs]
    wall = time.monotonic() - start
    running = False
    counter.join()
    for proc in procs:
        proc.join()
    busy, total = (after - before for after, before in zip(machine_cpu(), cpu[0]))
    trials = sum(r["trials"] for r in reports)
    per_trial = max(trials, 1)
    operations = {}
    for name in FLEET_OPERATIONS:
        values = sorted(v for r in reports for v in r["seconds"][name])
        if values:
            operations[name] = {"calls_per_trial": len(values) / per_trial, **{
                f"p{q}_ms": values[min(len(values) - 1, len(values) * q // 100)] * 1000
                for q in (50, 90, 99)}}
    blocking = sum(v for r in reports for name, values in r["seconds"].items()
                   if name != "heartbeat" for v in values)
    result = {"workers": workers, "trials": trials, "wall_seconds": wall,
              "trials_per_second": trials / wall,
              "ideal_trials_per_second": workers / (settings["epochs"] * settings["epoch_seconds"]),
              "storage_seconds_per_trial": blocking / per_trial,
              "operations": operations, "peak_connections": max(connections, default=0),
              "worker_cpu_seconds_per_trial": sum(r["cpu_seconds"] for r in reports) / per_trial,
              "machine_busy_fraction": busy / total, "load_before": load_before,
              "failed_workers": sum(1 for r in reports if r["error"]),
              "errors": sorted({r["error"] for r in reports if r["error"]})}
    if postmaster:
        result["database_cpu_seconds_per_trial"] = (
            process_cpu_seconds(postmaster, children=True) - cpu[1]) / per_trial
    if proxy_pid:
        result["proxy_cpu_seconds_per_trial"] = (
            process_cpu_seconds(proxy_pid) - cpu[2]) / per_trial
    engine.dispose()
    return result


def bench_fleet_storage(args) -> dict:
    """The study storage under many workers: `fleet_run` for each worker count, straight on
    PostgreSQL and through the gRPC storage proxy (`python -m abalone.storage_proxy`) in front of
    it. Trials are short (`--fleet-epochs` x `--fleet-epoch-seconds`), so storage is a larger share
    than with real trials; heartbeats come every `--fleet-heartbeat-seconds`."""
    import optuna
    from omegaconf import OmegaConf
    from optuna.storages import GrpcStorageProxy

    from abalone.study import search_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_file = OmegaConf.load(REPO / "sweeps" / "search.yaml")
    params = OmegaConf.to_container(sweep_file.hydra.sweeper.params)
    settings = {"space": search_space(params, [])[0], "epochs": args.fleet_epochs,
                "epoch_seconds": args.fleet_epoch_seconds,
                "heartbeat_seconds": args.fleet_heartbeat_seconds, "stale_after": 600}
    result = {"epochs": args.fleet_epochs, "epoch_seconds": args.fleet_epoch_seconds,
              "heartbeat_seconds": args.fleet_heartbeat_seconds,
              "trials_per_worker": args.fleet_trials_per_worker, "cpus": os.cpu_count(),
              "postgresql": [], "grpc_proxy": []}
    for workers in args.fleet_workers:
        print(f"  {workers} workers on PostgreSQL ...", flush=True)
        result["postgresql"].append(fleet_run(args, args.postgres_url, args.postgres_url,
                                              workers, None, settings))
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "abalone.storage_proxy", args.postgres_url,
                              "--port", str(port)], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        GrpcStorageProxy(host="127.0.0.1", port=port).wait_server_ready(timeout=120)
        for workers in args.fleet_workers:
            print(f"  {workers} workers through the gRPC proxy ...", flush=True)
            result["grpc_proxy"].append(fleet_run(args, f"grpc://127.0.0.1:{port}",
                                                  args.postgres_url, workers, proxy.pid,
                                                  settings))
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    return result


# The parts of a trial's time, roughly in the order a trial meets them: label -> [(where,
# attribute)]. A call counts under the first part already timing on the main thread, so parts
# never overlap (the model's calls inside fit count as fit, MlflowClient.log_batch inside
# log_model as the model).
TRIAL_PARTS = {
    "Optuna ask/tell and storage": [
        ("optuna.study.Study", "ask"), ("optuna.study.Study", "tell"),
        ("optuna.trial.Trial", "set_user_attr"), ("abalone.study", "work_left"),
        ("abalone.study", "within_total"), ("abalone.study", "fail_stale_trials"),
        ("abalone.study", "mark_owner")],
    "Hydra: composing the trial's config": [
        ("hydra._internal.config_loader_impl.ConfigLoaderImpl", "load_sweep_config")],
    "Hydra: job logging and .hydra/ files": [("hydra.core.utils", "configure_log"),
                                              ("hydra.core.utils", "_save_config")],
    "run set-up (seed, config checks and params, data hash, input columns)": [
        ("keras.utils", "set_random_seed"), ("abalone.train", "check_ranges"),
        ("abalone.tracking", "flat_params"), ("abalone.data", "sha256_of"),
        ("abalone.serving", "model_inputs")],
    "data load and split": [("abalone.data", "load"), ("abalone.data", "split")],
    "model build and compile": [("abalone.train", "build_model")],
    "MLflow run start and tags": [("abalone.tracking", "run_tags"), ("mlflow", "start_run")],
    "MLflow params; final metrics and tags": [
        ("mlflow.tracking.MlflowClient", "log_batch"), ("mlflow", "log_metrics"),
        ("mlflow", "log_metric"), ("mlflow", "set_tag")],
    "tf.data pipelines": [("abalone.data", "fit_arguments")],
    "fit": [("keras.Model", "fit")],
    "evaluation": [("keras.Model", "__call__"), ("abalone.evaluate", "regression_metrics")],
    "plots": [("abalone.evaluate", "save_plots"), ("abalone.evaluate", "save_learning_curves")],
    "saving the Keras model": [("keras.Model", "save")],
    "logging the MLflow model and requirements": [("abalone.tracking", "log_model")],
    "artifacts (config, plots)": [("abalone.train", "save_config"), ("mlflow", "log_artifact")],
    "MLflow run end": [("mlflow", "end_run")],
    "sweeper's report (best so far)": [
        ("hydra_plugins.abalone_optuna_sweeper.sweeper._Sweep", "report")],
}


FIT_ENDS = "Keras fit's set-up and end (awaiting the epochs' metrics)"


def trial_breakdown(data_path: str, tracking_uri: str, trials: int,
                    overrides: tuple[str, ...] = ()) -> dict:
    """Run a `sweep=search` of `trials` two-epoch trials in this interpreter (n_jobs=1, no
    pruner), timing the parts of TRIAL_PARTS on the main thread; per trial after the first (the
    first pays the imports): its wall time (from the previous trial's end to its own), fit time
    (first epoch's start to last epoch's end, as `total_training_time`), tracing (first epoch
    minus second, part of fit time), its overhead (wall minus fit time; and the CPU seconds of
    all threads outside fit time, steadier than wall seconds on a busy machine) and each part.
    The rest of the overhead, "Hydra job set-up and other", is what no part names."""
    import importlib
    import threading

    os.environ["ABALONE_DATA"] = data_path
    import keras
    from hydra.core.plugins import Plugins

    # Hydra's first plugin scan executes the launcher's and sweeper's modules anew: patch those.
    Plugins.instance()
    import hydra._internal.core_plugins.basic_launcher as basic_launcher

    import abalone.train

    current: dict[str, float] = {}
    active = threading.local()

    def timed(label: str, function):
        def wrapper(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread() or getattr(
                    active, "label", None):
                return function(*args, **kwargs)
            active.label = label
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                current[label] = current.get(label, 0.0) + time.perf_counter() - start
                active.label = None
        return wrapper

    for label, places in TRIAL_PARTS.items():
        for where, attribute in places:
            module_name, _, owner_name = where.rpartition(".")
            try:
                owner = importlib.import_module(where)
            except ImportError:
                owner = getattr(importlib.import_module(module_name), owner_name)
            setattr(owner, attribute, timed(label, getattr(owner, attribute)))

    epochs: list[tuple[float, float]] = []  # epochs' starts and ends: (wall, CPU of all threads)

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs.append((time.perf_counter(), time.process_time()))

        def on_epoch_end(self, epoch, logs=None):
            epochs.append((time.perf_counter(), time.process_time()))

    fit = keras.Model.fit

    def fit_with_epoch_times(self, *args, **kwargs):
        kwargs["callbacks"] = [EpochTimes(), *kwargs.get("callbacks", [])]
        return fit(self, *args, **kwargs)

    keras.Model.fit = fit_with_epoch_times
    records, last_end = [], [None, None]
    launch = basic_launcher.BasicLauncher.launch

    def launch_and_record(self, *args, **kwargs):
        # What the sweeper does between two launches (report, ask) counts with the next trial.
        epochs.clear()
        try:
            return launch(self, *args, **kwargs)
        finally:
            end, cpu_end = time.perf_counter(), time.process_time()
            if last_end[0] is not None and len(epochs) == 4:
                record = dict(current)
                record["wall"] = end - last_end[0]
                record["fit time"] = epochs[3][0] - epochs[0][0]
                record["tracing of the first epoch"] = ((epochs[1][0] - epochs[0][0])
                                                        - (epochs[3][0] - epochs[2][0]))
                record["overhead CPU"] = (cpu_end - last_end[1]) - (epochs[3][1] - epochs[0][1])
                records.append(record)
            last_end[:] = end, cpu_end
            current.clear()

    basic_launcher.BasicLauncher.launch = launch_and_record
    sys.argv = ["abalone.train", "-m", "sweep=search", f"hydra.sweeper.n_trials={trials}",
                "hydra.sweeper.n_jobs=1", "hydra.sweeper.pruner.name=none", "trainer.epochs=2",
                f"tracking.uri={tracking_uri}", "hydra.sweeper.storage=optuna.journal",
                *overrides]
    abalone.train.main()
    labels = [*(label for label in TRIAL_PARTS if label != "fit"), FIT_ENDS]
    for record in records:
        record["overhead"] = record["wall"] - record["fit time"]
        record[FIT_ENDS] = record["fit"] - record["fit time"]
        record["Hydra job set-up and other"] = record["overhead"] - sum(
            record.get(label, 0.0) for label in labels)
    parts = {label: statistics.median(r.get(label, 0.0) for r in records) for label in labels}
    summary = {key: statistics.median(r[key] for r in records)
               for key in ("wall", "fit time", "tracing of the first epoch", "overhead",
                           "overhead CPU", "Hydra job set-up and other")}
    return {"trials": len(records), "parts": parts, **summary, "per_trial": records,
            "load_average": os.getloadavg()[0]}


def bench_overhead(args) -> dict:
    """Per-trial overhead of two-epoch trials (see `trial_breakdown`), each in a fresh
    interpreter: with the local SQLite store, with an `mlflow server` on 127.0.0.1, and with the
    SQLite store logging every trial's model and plots (`log_models=all`, as before issue #13;
    by default only a trial that is the best so far does)."""
    result = {}
    for name, overrides in (("sqlite", ()), ("sqlite, log_models=all",
                                             ("hydra.sweeper.log_models=all",))):
        with tempfile.TemporaryDirectory(prefix="abalone-bench-overhead-") as tmp:
            result[name], _ = in_fresh_interpreter(
                "trial_breakdown",
                (args.data, "sqlite:///mlflow.db", args.overhead_trials, overrides),
                Path(tmp), base_env(args.data))
    with MlflowServer() as url, tempfile.TemporaryDirectory(prefix="abalone-bench-overhead-") as tmp:
        result["server"], _ = in_fresh_interpreter(
            "trial_breakdown", (args.data, url, args.overhead_trials), Path(tmp),
            base_env(args.data))
    return result


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
            while True:
                if proc.poll() is not None or time.monotonic() - start > 300:
                    raise RuntimeError("mlflow models serve did not start")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1):
                        break
                except OSError:
                    time.sleep(0.2)
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


def targets(results: dict) -> list[dict]:
    """Issues #5's and #13's targets (2 CPU cores, TensorFlow), each with the figure that
    decides it."""
    rows = []

    def add(target: str, figure: str, met: bool | str) -> None:
        rows.append({"target": target, "figure": figure,
                     "met": met if isinstance(met, str) else ("yes" if met else "NO")})

    if "default_vs_sample" in results:
        d = results["default_vs_sample"]
        add("default run fits >= 5x faster than the sample's recipe",
            f"{d['fit_speedup']:.1f}x", d["fit_speedup"] >= 5)
        add("... with a test RMSE no worse", f"{d['ours']['test_rmse']:.3f} vs "
            f"{d['sample']['test_rmse']:.3f}", d["test_rmse_not_worse"])
        for key, when in (("first_epoch_seconds_existing_store", "a later run in the folder"),
                          ("first_epoch_seconds", "the first run, creating the MLflow store")):
            add(f"first epoch within 8 s of the command ({when})", f"{d['ours'][key]:.1f} s",
                d["ours"][key] <= 8)
    if "callback" in results:
        c = results["callback"]
        add("our callback adds <= 5% to fit time", f"{c['overhead_fraction'] * 100:+.1f}%",
            c["overhead_fraction"] <= 0.05)
    if "overhead" in results:
        for store, o in results["overhead"].items():
            if "log_models" in store:  # the old behaviour, for contrast
                continue
            add(f"per-trial overhead <= 0.5 s (two-epoch trials, {store})",
                f"{o['overhead']:.2f} s (load {o['load_average']:.1f})", o["overhead"] <= 0.5)
    for sweep in results.get("sweeps", []):
        too_few = None if sweep["n_trials"] >= 50 else f"n/a ({sweep['n_trials']} trials, not 50)"
        jobs = f"n_jobs={sweep['n_jobs']}"
        add(f"50-trial sweep=search within 5 min ({jobs})",
            f"{sweep['wall_seconds']:.0f} s", too_few or sweep["wall_seconds"] <= 300)
        add(f"... its champion's test RMSE <= 2.07 ({jobs})",
            f"{sweep['champion_test_rmse']:.3f}", too_few or sweep["champion_test_rmse"] <= 2.07)
        if sweep["n_jobs"] == 2:  # issue #13: sweep=search's own n_jobs
            add("50-trial sweep=search within 2 min, champion's test RMSE <= 2.10 (n_jobs=2)",
                f"{sweep['wall_seconds']:.0f} s, {sweep['champion_test_rmse']:.3f}",
                too_few or (sweep["wall_seconds"] <= 120 and sweep["champion_test_rmse"] <= 2.10))
    return rows


def markdown(results: dict) -> str:
    lines = ["# Benchmark", ""]
    if results.get("targets"):
        lines += ["| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['figure']} | {t['met']} |" for t in results["targets"]]
        lines.append("")
    if "default_vs_sample" in results:
        d = results["default_vs_sample"]
        s, o = d["sample"], d["ours"]
        lines += [f"Median of {d['repeats']} interleaved runs each.", "",
                  "| figure | AWS sample's recipe | our default run |", "| --- | --- | --- |"]
        for key, fmt in (("fit_seconds", "{:.2f} s"), ("seconds_per_epoch", "{:.3f} s"),
                         ("epochs", "{:.0f}"), ("test_rmse", "{:.3f}"), ("test_mae", "{:.3f}"),
                         ("test_r2", "{:.3f}"), ("peak_rss_mib", "{:.0f} MiB")):
            lines.append(f"| {key} | {fmt.format(s[key])} | {fmt.format(o[key])} |")
        lines += ["", f"- fit speed-up (median of pairwise ratios): **{d['fit_speedup']:.1f}x**; "
                  f"test RMSE no worse: {d['test_rmse_not_worse']}",
                  f"- command start to first epoch line: "
                  f"{o['first_epoch_seconds_existing_store']:.1f} s with the folder's MLflow "
                  f"store in place, {o['first_epoch_seconds']:.1f} s creating it "
                  f"(whole default run: {o['wall_seconds']:.1f} s)"]
        if "ours_jax" in d:
            j = d["ours_jax"]
            lines.append(f"- KERAS_BACKEND=jax: fit {j['fit_seconds']:.2f} s, "
                         f"{j['seconds_per_epoch']:.3f} s/epoch, {j['epochs']:.0f} epochs, test "
                         f"RMSE {j['test_rmse']:.3f}, first epoch at "
                         f"{j['first_epoch_seconds']:.1f} s")
    if "callback" in results:
        c = results["callback"]
        lines += ["", f"## MLflow callback ({c['epochs']} epochs, real `mlflow server` on "
                  "127.0.0.1)", "",
                  f"- our callback (median of {c['pairs']} alternating pairs): fit "
                  f"{c['untracked_fit_seconds']:.2f} s untracked, "
                  f"{c['tracked_fit_seconds']:.2f} s tracked: "
                  f"**{c['overhead_fraction'] * 100:+.1f}%** (median of pairwise ratios; "
                  f"quartiles {c['overhead_quartiles'][0] * 100:+.1f}% / "
                  f"{c['overhead_quartiles'][1] * 100:+.1f}%)",
                  f"- sample-style logging ({c['sample_style_requests']} requests): "
                  f"{c['sample_style_untracked_fit_seconds']:.2f} s → "
                  f"{c['sample_style_tracked_fit_seconds']:.2f} s: "
                  f"**{c['sample_style_overhead_fraction'] * 100:+.1f}%**"]
    if "overhead" in results:
        o = results["overhead"]
        stores = list(o)
        lines += ["", "## Per-trial overhead (`sweep=search`, two-epoch trials, n_jobs=1; median "
                  "seconds of the trials after the first)", "",
                  "| part | " + " | ".join(stores) + " |", "| --- |" + " --- |" * len(stores)]
        for key in ("wall", "fit time", "tracing of the first epoch", "overhead",
                    "overhead CPU"):
            lines.append(f"| **{key}** | " + " | ".join(f"{o[s][key]:.3f}" for s in stores) + " |")
        for label in o[stores[0]]["parts"]:
            lines.append(f"| {label} | " + " | ".join(f"{o[s]['parts'][label]:.3f}"
                                                     for s in stores) + " |")
        lines.append("| Hydra job set-up and other | " + " | ".join(
            f"{o[s]['Hydra job set-up and other']:.3f}" for s in stores) + " |")
        lines += ["", "Trials: " + ", ".join(f"{s} {o[s]['trials']}" for s in stores)
                  + "; load average (1 min) at the end: " + ", ".join(
                      f"{s} {o[s]['load_average']:.1f}" for s in stores)]
    if "sweeps" in results:
        lines += ["", "## Sweeps (`sweep=search`)", "",
                  "| n_jobs | trials | wall | trials/min | pruned | best val RMSE | champion test "
                  "RMSE |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for sweep in results["sweeps"]:
            lines.append(f"| {sweep['n_jobs']} | {sweep['n_trials']} | "
                         f"{sweep['wall_seconds']:.0f} s | {sweep['trials_per_minute']:.1f} | "
                         f"{sweep['pruned_fraction']:.0%} | {sweep['best_val_rmse']:.3f} | "
                         f"{sweep['champion_test_rmse']:.3f} |")
    if "serving" in results:
        sv = results["serving"]
        lines += ["", "## Serving (`mlflow models serve`, one client, requests one after another)",
                  "", f"- command to /ping answering: {sv['ready_seconds']:.1f} s", "",
                  "| rows per request | median latency | p90 latency | rows/s |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {b['rows']} | {b['median_ms']:.1f} ms | {b['p90_ms']:.1f} ms | "
                  f"{b['rows_per_second']:.0f} |" for b in sv["batches"]]
    if "fleet_storage" in results:
        fleet = results["fleet_storage"]
        lines += ["", f"## Many workers on one study database ({fleet['cpus']} cores shared by "
                  "the database, the proxy and every worker)", "",
                  f"Trials of {fleet['epochs']} epochs x {fleet['epoch_seconds']} s sleep, "
                  f"{fleet['trials_per_worker']} per worker, heartbeat every "
                  f"{fleet['heartbeat_seconds']} s; CPU seconds per trial.", "",
                  "| storage | workers | trials/s | of ideal | storage s/trial | ask p50/p99 | "
                  "report p50/p99 | tell p50/p99 | heartbeat p99 | connections | database CPU "
                  "| proxy CPU | worker CPU | machine busy | load before | failed workers |",
                  "|" + " --- |" * 16]

        def latency(run: dict, name: str, quantiles=("p50", "p99")) -> str:
            op = run["operations"].get(name)
            return "/".join(f"{op[q + '_ms']:.0f}" for q in quantiles) + " ms" if op else "-"

        def cpu(run: dict, key: str) -> str:
            return f"{run[key]:.3f}" if key in run else "-"

        for kind in ("postgresql", "grpc_proxy"):
            for run in fleet[kind]:
                lines.append(
                    f"| {kind} | {run['workers']} | {run['trials_per_second']:.2f} | "
                    f"{run['trials_per_second'] / run['ideal_trials_per_second']:.0%} | "
                    f"{run['storage_seconds_per_trial']:.3f} | {latency(run, 'ask')} | "
                    f"{latency(run, 'report')} | {latency(run, 'tell')} | "
                    f"{latency(run, 'heartbeat', ('p99',))} | {run['peak_connections']} | "
                    f"{cpu(run, 'database_cpu_seconds_per_trial')} | "
                    f"{cpu(run, 'proxy_cpu_seconds_per_trial')} | "
                    f"{run['worker_cpu_seconds_per_trial']:.3f} | "
                    f"{run['machine_busy_fraction']:.0%} | {run['load_before']:.1f} | "
                    f"{run['failed_workers']} {'; '.join(run['errors'])[:200]} |")
    if "storage" in results:
        st = results["storage"]
        lines += ["", "## Study storage", ""]
        lines += [f"- {name}: {seconds * 1000:.1f} ms per trial ({st['reports_per_trial']} "
                  "pruning reports)" for name, seconds in st["seconds_per_trial"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("ABALONE_DATA"),
                        help="the UCI abalone.data file (default: $ABALONE_DATA)")
    parser.add_argument("--out", default="benchmark-results", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="cap epochs of both trainings (default: each recipe's own)")
    parser.add_argument("--callback-epochs", type=int, default=60, help="the default run's")
    parser.add_argument("--callback-pairs", type=int, default=40,
                        help="fits vary by ±20%% here; the median needs many pairs")
    parser.add_argument("--sweep-trials", type=int, default=50)
    parser.add_argument("--sweep-overrides", nargs="*", default=[])
    parser.add_argument("--storage-trials", type=int, default=50)
    parser.add_argument("--overhead-trials", type=int, default=12,
                        help="two-epoch trials per store for the per-trial overhead")
    parser.add_argument("--postgres-url", default=None,
                        help="also time the study storage on this PostgreSQL database")
    parser.add_argument("--no-scale", action="store_true", help="skip the n_jobs=2 sweep")
    parser.add_argument("--fleet-workers", type=int, nargs="+", default=list(FLEET_WORKERS),
                        help="fleet-storage: simulated worker processes, one run per count")
    parser.add_argument("--fleet-trials-per-worker", type=int, default=10)
    parser.add_argument("--fleet-epochs", type=int, default=20, help="pruning reports per trial")
    parser.add_argument("--fleet-epoch-seconds", type=float, default=0.05)
    parser.add_argument("--fleet-heartbeat-seconds", type=float, default=0.5,
                        help="the sweeper beats every stale_after/4 s, at least 1 s")
    parser.add_argument("--serving-requests", type=int, default=200,
                        help="timed /invocations requests per batch size")
    parser.add_argument("--sections",
                        default="default,callback,overhead,sweeps,storage,fleet-storage,serving",
                        help="comma-separated subset to run (the report shows only those); "
                        "fleet-storage needs --postgres-url")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, to check that every figure is produced")
    args = parser.parse_args()
    if not args.data:
        parser.error("give --data or set ABALONE_DATA")
    args.data = str(Path(args.data).resolve())
    if args.smoke:
        args.repeats, args.epochs, args.callback_epochs, args.callback_pairs = 1, 2, 2, 1
        args.sweep_trials, args.storage_trials, args.serving_requests = 2, 3, 3
        args.overhead_trials = 3
        args.sweep_overrides = ["trainer.epochs=2", *args.sweep_overrides]
        args.fleet_workers, args.fleet_trials_per_worker, args.fleet_epochs = [2], 2, 3
        args.fleet_epoch_seconds, args.fleet_heartbeat_seconds = 0.02, 0.02
    try:
        import jax  # noqa: F401
        args.jax = True
    except ImportError:
        args.jax = False

    results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
               "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    sections = set(args.sections.split(","))
    if "fleet-storage" in sections and not args.postgres_url:
        if args.sections != parser.get_default("sections"):
            parser.error("--sections fleet-storage needs --postgres-url")
        print("many workers on one database: skipped (no --postgres-url)", flush=True)
        sections.discard("fleet-storage")
    if "default" in sections:
        print("default run vs the sample's recipe ...", flush=True)
        results["default_vs_sample"] = bench_default_vs_sample(args)
    if "callback" in sections:
        print("callback overhead ...", flush=True)
        results["callback"] = bench_callback(args)
    if "overhead" in sections:
        print("per-trial overhead ...", flush=True)
        results["overhead"] = bench_overhead(args)
    if "sweeps" in sections:
        print("sweeps ...", flush=True)
        results["sweeps"] = [bench_sweep(args, 1)]
        if not args.no_scale:
            results["sweeps"].append(bench_sweep(args, 2))
    if "storage" in sections:
        print("study storage ...", flush=True)
        results["storage"] = bench_storage(args)
    if "fleet-storage" in sections:
        print("many workers on one study database ...", flush=True)
        results["fleet_storage"] = bench_fleet_storage(args)
    if "serving" in sections:
        print("serving ...", flush=True)
        results["serving"] = bench_serving(args)
    results["targets"] = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2, default=str))
    report = markdown(results)
    (args.out / "benchmark.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
