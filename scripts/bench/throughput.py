"""Sweep throughput against the peer (issue #21): in one benchmark run, side by side, our
`python -m abalone.train -m sweep=search` as a user runs it (its 50 trials, n_jobs=2, the local
SQLite MLflow store and journal study storage it defaults to, in a fresh folder) and the plain
Optuna script a user would write instead (bench/peer_optuna.py, its own process, the same space,
epochs, pruning, data and two threads). Each is timed end to end from outside, imports included;
the ratio is the peer's wall time over ours."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.measure import SCRIPTS, base_env, run_measured, with_overrides
from bench.sweep import sweep_outcome

PEER_JOBS = 2  # sweeps/search.yaml's n_jobs: the peer's threads
PEER_EPOCHS = 60  # sweeps/search.yaml's trainer.epochs


def bench_throughput(args) -> dict:
    epochs = args.epochs or PEER_EPOCHS
    fixed = {"hydra.sweeper.n_trials": args.sweep_trials}
    if args.epochs:
        fixed["trainer.epochs"] = args.epochs
    ours_command = [sys.executable, "-m", "abalone.train", "-m", "sweep=search",
                    *with_overrides(fixed, args.sweep_overrides)]
    with tempfile.TemporaryDirectory(prefix="abalone-bench-throughput-") as tmp:
        load_ours = os.getloadavg()[0]
        measured = run_measured(ours_command, Path(tmp), base_env(args.data))
        outcome = sweep_outcome(Path(tmp))
    states = outcome["states"]
    ours = {"wall_seconds": measured["wall_seconds"], "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "epochs": outcome["epochs"], "best_val_rmse": outcome["best_val_rmse"],
            "champion_test_rmse": outcome["champion_test_rmse"],
            "training_seconds": outcome["training_seconds"],
            "peak_rss_mib": measured["peak_rss_mib"], "load_before": load_ours,
            "command": " ".join(["python", *ours_command[1:]])}

    with tempfile.TemporaryDirectory(prefix="abalone-bench-peer-") as tmp:
        load_peer = os.getloadavg()[0]
        measured = run_measured(
            [sys.executable, str(SCRIPTS / "bench" / "peer_optuna.py"), "--data", args.data,
             "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--trials", str(args.sweep_trials),
             "--epochs", str(epochs), "--n-jobs", str(PEER_JOBS)], Path(tmp),
            base_env(args.data))
    reported = json.loads(measured["output"].split("RESULT ", 1)[1].splitlines()[0])
    peer = {"wall_seconds": measured["wall_seconds"],
            "script_wall_seconds": reported["wall_seconds"], "complete": reported["complete"],
            "pruned": reported["pruned"], "failed": reported["failed"],
            "epochs": reported["epochs"], "best_val_rmse": reported["best_val_rmse"],
            "best_test_rmse": reported["best_test_rmse"],
            "peak_rss_mib": measured["peak_rss_mib"], "load_before": load_peer}
    # The samplers differ (ours: multivariate TPE with a constant liar), so the pruner stops
    # different trials on each side: seconds per trained epoch compare the work done too.
    for side in (ours, peer):
        side["seconds_per_epoch"] = side["wall_seconds"] / max(1, side["epochs"])
    result = {"n_trials": args.sweep_trials, "epochs": epochs, "ours": ours, "peer": peer,
              "speedup": peer["wall_seconds"] / ours["wall_seconds"],
              "speedup_per_epoch": peer["seconds_per_epoch"] / ours["seconds_per_epoch"]}
    print(f"throughput, {args.sweep_trials} trials of {epochs} epochs: ours "
          f"{ours['wall_seconds']:.1f} s (champion test RMSE {ours['champion_test_rmse']:.3f}; "
          f"{ours['complete']} complete, {ours['pruned']} pruned, {ours['failed']} failed, "
          f"{ours['epochs']} epochs), peer {peer['wall_seconds']:.1f} s (best trial's test RMSE "
          f"{peer['best_test_rmse']:.3f}; {peer['complete']} complete, {peer['pruned']} pruned, "
          f"{peer['failed']} failed, {peer['epochs']} epochs); peer/ours "
          f"{result['speedup']:.2f}x, per trained epoch {result['speedup_per_epoch']:.2f}x; "
          f"our trials' epochs took {ours['training_seconds']:.1f} s in all (half of it is the "
          f"least wall time two processes could take)", flush=True)
    return result
