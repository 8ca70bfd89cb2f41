#!/usr/bin/env python
"""Benchmark: the AWS sample's recipe against our default run, the MLflow callback's overhead,
a sweep trial's overhead broken down into its parts, a sweep, its scaling with n_jobs, start-up
time, the study storage's per-trial cost (one process, and 1-64 simulated workers on PostgreSQL,
straight and through the gRPC storage proxy) and the registered model's latency and throughput
behind `mlflow models serve`; when named, a sweep's throughput against the plain Optuna script a
user would write instead, and its memory over a long sweep (issue #21).

    python scripts/benchmark.py                      # the full benchmark (~20 min on 2 cores)
    python scripts/benchmark.py --sweep-trials 50 --repeats 3 --postgres-url postgresql://...
    python scripts/benchmark.py --smoke              # tiny sizes: checks every figure appears
    python scripts/benchmark.py --sections serving   # one section
    python scripts/benchmark.py --sections throughput,memory  # ~8 min + ~25 min on 2 cores
    python scripts/benchmark.py --sections throughput --sweep-overrides "a=b c=d"
    python scripts/benchmark.py --sections fleet-storage --postgres-url postgresql+psycopg2://...

Every training figure comes from a fresh process (the real `python -m abalone.train`, or the
sample's recipe in its own interpreter), so imports and peak memory count as a user sees them;
only the callback's pairs of fits share one interpreter, to keep process noise out of a small ratio,
and the overhead's trials, which a sweep runs in one process anyway.
Ratios are taken pair by pair within this invocation and then their median, as the machine is
noisy. Writes OUT/benchmark.json and OUT/benchmark.md (OUT: --out, default benchmark-results/).

The sections are modules of scripts/bench/ (this file's sibling, so `python scripts/benchmark.py`
imports them); their Hydra launchers are in scripts/hydra_plugins/abalone_bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from bench import (callback, equal_work, faults, fleet_storage, memory, overhead, report,
                   sample, serving, stalls, storage, sweep, throughput)


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
    parser.add_argument("--sweep-overrides", nargs="*", default=[],
                        help="Hydra overrides added to the sweeps' commands (sweeps, throughput, "
                        "memory), as separate words or in one quoted string")
    parser.add_argument("--equal-sets", type=int, default=20,
                        help="equal-work: parameter sets both sides train")
    parser.add_argument("--equal-epochs", type=int, default=30)
    parser.add_argument("--stall-sweeps", type=int, default=10,
                        help="stalls: watched sweep=search runs in a row (--sweep-trials each)")
    parser.add_argument("--storage-trials", type=int, default=50)
    parser.add_argument("--overhead-trials", type=int, default=12,
                        help="two-epoch trials per store for the per-trial overhead")
    parser.add_argument("--memory-trials", type=int, default=500,
                        help="memory: two-epoch trials in one sweeping process")
    parser.add_argument("--postgres-url", default=None,
                        help="also time the study storage on this PostgreSQL database")
    parser.add_argument("--no-scale", action="store_true", help="skip the n_jobs=2 sweep")
    parser.add_argument("--fleet-workers", type=int, nargs="+",
                        default=list(fleet_storage.FLEET_WORKERS),
                        help="fleet-storage: simulated worker processes, one run per count")
    parser.add_argument("--fleet-trials-per-worker", type=int, default=10)
    parser.add_argument("--fleet-epochs", type=int, default=20, help="pruning reports per trial")
    parser.add_argument("--fleet-epoch-seconds", type=float, default=0.05)
    parser.add_argument("--fleet-stale-after", type=int, default=8,
                        help="the workers' hydra.sweeper.stale_after: they beat every "
                        "stale_after/4 s, at least 1 s")
    parser.add_argument("--serving-requests", type=int, default=200,
                        help="timed /invocations requests per batch size")
    parser.add_argument("--sections",
                        default="default,callback,overhead,sweeps,storage,fleet-storage,serving",
                        help="comma-separated subset to run (the report shows only those); "
                        "fleet-storage needs --postgres-url; `throughput` (against the plain "
                        "Optuna peer, --sweep-trials trials), `memory` (--memory-trials), "
                        "`stalls` (--stall-sweeps watched sweeps), `equal-work` (the same "
                        "--equal-sets parameter sets on both sides, no pruning) and `faults` (the "
                        "fault soak) run only when named")
    parser.add_argument("--seed", type=int, default=0,
                        help="faults: the soak's seed (its first sweep's schedule)")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="faults: how long the soak starts new sweeps")
    parser.add_argument("--container-image", default=None,
                        help="faults: an image of the project (built on the DLC stand-in); with "
                        "it, sweeps on PostgreSQL may run on 2 Podman container workers and "
                        "draw kill -9 of one (needs CONTAINERS_CONF as tests/container sets it)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, to check that every figure is produced")
    args = parser.parse_args()
    if not args.data:
        parser.error("give --data or set ABALONE_DATA")
    args.data = str(Path(args.data).resolve())
    args.sweep_overrides = [word for item in args.sweep_overrides for word in shlex.split(item)]
    if args.memory_trials < 2:
        parser.error("--memory-trials must be at least 2 (RSS is compared between two trials)")
    if args.smoke:
        args.repeats, args.epochs, args.callback_epochs, args.callback_pairs = 1, 2, 2, 1
        args.sweep_trials, args.storage_trials, args.serving_requests = 2, 3, 3
        args.overhead_trials, args.memory_trials, args.stall_sweeps = 3, 3, 1
        args.equal_sets, args.equal_epochs = 7, 2
        args.sweep_overrides = ["trainer.epochs=2", *args.sweep_overrides]
        args.fleet_workers, args.fleet_trials_per_worker, args.fleet_epochs = [2], 2, 3
        args.fleet_epoch_seconds = 0.02
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
        results["default_vs_sample"] = sample.bench_default_vs_sample(args)
    if "callback" in sections:
        print("callback overhead ...", flush=True)
        results["callback"] = callback.bench_callback(args)
    if "overhead" in sections:
        print("per-trial overhead ...", flush=True)
        results["overhead"] = overhead.bench_overhead(args)
    if "sweeps" in sections:
        print("sweeps ...", flush=True)
        results["sweeps"] = [sweep.bench_sweep(args, 1)]
        if not args.no_scale:
            results["sweeps"].append(sweep.bench_sweep(args, 2))
    if "throughput" in sections:
        print("throughput: sweep=search against the plain Optuna peer ...", flush=True)
        results["throughput"] = throughput.bench_throughput(args)
    if "equal-work" in sections:
        print("equal work: the same parameter sets, ours and the peer ...", flush=True)
        results["equal_work"] = equal_work.bench_equal_work(args)
    if "stalls" in sections:
        print(f"stalls: {args.stall_sweeps} watched sweep=search runs ...", flush=True)
        results["stalls"] = stalls.bench_stalls(args)
    if "memory" in sections:
        print(f"memory over {args.memory_trials} trials in one process ...", flush=True)
        results["memory"] = memory.bench_memory(args)
    if "storage" in sections:
        print("study storage ...", flush=True)
        results["storage"] = storage.bench_storage(args)
    if "fleet-storage" in sections:
        print("many workers on one study database ...", flush=True)
        results["fleet_storage"] = fleet_storage.bench_fleet_storage(args)
    if "serving" in sections:
        print("serving ...", flush=True)
        results["serving"] = serving.bench_serving(args)
    if "faults" in sections:
        print(f"fault soak, seed {args.seed}, {args.minutes:g} minutes ...", flush=True)
        results["faults"] = faults.bench_faults(args)
    results["targets"] = report.targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2, default=str))
    text = report.markdown(results)
    (args.out / "benchmark.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
