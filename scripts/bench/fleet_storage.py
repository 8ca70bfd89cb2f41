"""The study storage under many workers: 1-64 worker processes of the real sweep command on one
PostgreSQL study, straight and through the gRPC storage proxy (`python -m abalone.storage_proxy`).

Each worker is `python -m abalone.train -m sweep=search workers=local tracking.enabled=false`
with the study's name and storage (the command line `abalone.sweep.coordinator.worker_argv`
gives real workers), a rank of its own, the random sampler (so the figures are the storage's,
not TPE's) and the launcher `hydra_plugins.abalone_bench.simulated_launcher.SimulatedLauncher`
in place of training: the sweeper's own loop runs around trials of `--fleet-epochs` x
`--fleet-epoch-seconds` of sleep. Until this package, the section ran a copy of that loop and
timed each storage call (ask, tell, ...) by replacing the functions it called; now the sweeper
runs unchanged and the launcher times what it sees from its seat: the start, the span between
two trials (tell, the trial's line, the checks, ask, owner attributes together) and each epoch's
report. The cost of what it cannot see, the heartbeat thread's beats (every `stale_after`/4 s),
shows in the database's and the proxy's CPU seconds, read from /proc as before.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hydra_plugins.abalone_bench.simulated_launcher import SPANS
from bench.measure import REPO, base_env
from bench.services import free_port

FLEET_WORKERS = (1, 4, 16, 64)


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


def start_workers(args, folder: Path, storage_url: str, study_name: str,
                  workers: int) -> list[tuple[subprocess.Popen, Path]]:
    """`workers` sweep commands on the study, each logging to folder/worker-RANK.log."""
    from abalone.sweep.coordinator import worker_argv
    from abalone.trial import RANK_ENV

    own = ["sweep=search", "tracking.enabled=false", f"trainer.epochs={args.fleet_epochs}",
           f"hydra.sweeper.n_trials={workers * args.fleet_trials_per_worker}",
           "hydra.sweeper.sampler.name=random",
           f"hydra.sweeper.stale_after={args.fleet_stale_after}",
           "hydra.launcher._target_=hydra_plugins.abalone_bench.simulated_launcher."
           "SimulatedLauncher",
           f"+hydra.launcher.folder={folder}",
           f"+hydra.launcher.epoch_seconds={args.fleet_epoch_seconds}"]
    started = []
    for rank in range(1, workers + 1):
        argv = worker_argv(own, study_name, storage_url, folder / f"sweep-{rank}")
        log = folder / f"worker-{rank}.log"
        with open(log, "w") as out:
            started.append((subprocess.Popen(
                [sys.executable, "-m", "abalone.train", "-m", *argv], cwd=folder, stdout=out,
                stderr=subprocess.STDOUT, env=base_env(args.data, **{RANK_ENV: str(rank)})), log))
    return started


def failure(code: int, log: Path) -> str | None:
    """Why a worker failed: its `error:` line, else its log's last line (a traceback's)."""
    from abalone.workers.base import exit_status

    if code == 0:
        return None
    reason = exit_status(code, log)
    if "error: " not in reason:
        lines = log.read_text(errors="replace").strip().splitlines()
        reason += f", {lines[-1] if lines else 'no output'}"
    return reason.removeprefix("failed: ")


def fleet_run(args, storage_url: str, database_url: str, workers: int,
              proxy_pid: int | None) -> dict:
    """`workers` worker processes on one new study, started together once all have imported:
    trials per second from then to the last one's end, the launcher's spans (percentiles), the
    peak of the database's connections, and the CPU seconds per trial of the database, the
    proxy and the workers, with the machine's load."""
    import json

    import optuna
    import sqlalchemy

    from abalone.study.storage import make_storage

    study_name = f"fleet-{workers}-{time.time_ns()}"
    optuna.create_study(study_name=study_name, storage=make_storage(storage_url))
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.pool.NullPool)
    postmaster = postmaster_pid(engine)
    with tempfile.TemporaryDirectory(prefix="abalone-bench-fleet-") as tmp:
        folder = Path(tmp)
        procs = start_workers(args, folder, storage_url, study_name, workers)
        while sum(1 for _ in folder.glob("ready-*")) + sum(
                1 for p, _ in procs if p.poll() is not None) < workers:
            time.sleep(0.05)  # each worker is ready, or has failed before it could be
        load_before = os.getloadavg()[0]
        cpu = [machine_cpu(), postmaster and process_cpu_seconds(postmaster, children=True),
               proxy_pid and process_cpu_seconds(proxy_pid)]
        start = time.monotonic()
        (folder / "go").touch()
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
        codes = [proc.wait(timeout=3600) for proc, _ in procs]
        wall = time.monotonic() - start
        running = False
        counter.join()
        busy, total = (after - before for after, before in zip(machine_cpu(), cpu[0]))
        errors = [failure(code, log) for code, (_, log) in zip(codes, procs)]
        reports = [json.loads(path.read_text()) for path in folder.glob("worker-*.json")]
    trials = sum(r["trials"] for r in reports)
    per_trial = max(trials, 1)
    operations = {}
    for name in SPANS:
        values = sorted(v for r in reports for v in r["spans"][name])
        if values:
            operations[name] = {"calls_per_trial": len(values) / per_trial, **{
                f"p{q}_ms": values[min(len(values) - 1, len(values) * q // 100)] * 1000
                for q in (50, 90, 99)}}
    between = [v for r in reports for v in r["spans"]["between_trials"]]
    reporting = sum(v for r in reports for v in r["spans"]["report"])
    result = {"workers": workers, "trials": trials, "wall_seconds": wall,
              "trials_per_second": trials / wall,
              "ideal_trials_per_second": workers / (args.fleet_epochs * args.fleet_epoch_seconds),
              # The sweeper's thread outside the simulated training, per trial.
              "storage_seconds_per_trial": (statistics.fmean(between) if between else 0.0)
              + reporting / per_trial,
              "operations": operations, "peak_connections": max(connections, default=0),
              "worker_cpu_seconds_per_trial": sum(r["cpu_seconds"] for r in reports) / per_trial,
              "machine_busy_fraction": busy / total, "load_before": load_before,
              "failed_workers": sum(1 for e in errors if e),
              "errors": sorted({e for e in errors if e})}
    if postmaster:
        result["database_cpu_seconds_per_trial"] = (
            process_cpu_seconds(postmaster, children=True) - cpu[1]) / per_trial
    if proxy_pid:
        result["proxy_cpu_seconds_per_trial"] = (
            process_cpu_seconds(proxy_pid) - cpu[2]) / per_trial
    engine.dispose()
    return result


def bench_fleet_storage(args) -> dict:
    """`fleet_run` for each of `--fleet-workers`, straight on PostgreSQL, then through the gRPC
    storage proxy in front of it. Trials are short, so storage is a larger share than with real
    trials."""
    import optuna
    from optuna.storages import GrpcStorageProxy

    from abalone.study.storage import heartbeat_interval

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = {"epochs": args.fleet_epochs, "epoch_seconds": args.fleet_epoch_seconds,
              "heartbeat_seconds": heartbeat_interval(args.fleet_stale_after),
              "trials_per_worker": args.fleet_trials_per_worker, "cpus": os.cpu_count(),
              "postgresql": [], "grpc_proxy": []}
    for workers in args.fleet_workers:
        print(f"  {workers} workers on PostgreSQL ...", flush=True)
        result["postgresql"].append(fleet_run(args, args.postgres_url, args.postgres_url,
                                              workers, None))
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "abalone.storage_proxy", args.postgres_url,
                              "--port", str(port)], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        GrpcStorageProxy(host="127.0.0.1", port=port).wait_server_ready(timeout=120)
        for workers in args.fleet_workers:
            print(f"  {workers} workers through the gRPC proxy ...", flush=True)
            result["grpc_proxy"].append(fleet_run(args, f"grpc://127.0.0.1:{port}",
                                                  args.postgres_url, workers, proxy.pid))
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    return result
