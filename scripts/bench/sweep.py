"""A real `sweep=search` (`python -m abalone.train -m`) in a fresh folder: wall time, trials per
minute, pruned share, and the champion's held-out RMSE."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.measure import base_env, run_measured


def bench_sweep(args, n_jobs: int) -> dict:
    import mlflow
    import optuna

    from abalone.sweep.storage import make_storage

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

