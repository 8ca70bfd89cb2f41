"""A real `sweep=search` (`python -m abalone.train -m`) in a fresh folder: wall time, trials per
minute, pruned share, and the champion's held-out RMSE."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.measure import base_env, run_measured


def sweep_outcome(folder: Path) -> dict:
    """What a sweep run in `folder` with its default stores left there: its trials' states and
    the epochs they trained (their pruning reports; from the study's journal), its best
    validation RMSE, its registered champion's test RMSE and the seconds its trials' epochs took
    (from the folder's MLflow store)."""
    import mlflow
    import optuna

    from abalone.study.storage import make_storage

    storage = make_storage(f"{folder}/optuna-studies.journal")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db",
                                 registry_uri=f"sqlite:///{folder}/mlflow.db")
    champion = client.get_model_version_by_alias("abalone-tensorflow-model", "champion")
    # Each epoch's own seconds (its first includes any trace): the training the trials did.
    training = sum(metric.value for t in study.trials if "mlflow_run_id" in t.user_attrs
                   for metric in client.get_metric_history(t.user_attrs["mlflow_run_id"],
                                                           "epoch_duration"))
    return {"states": [t.state.name for t in study.trials], "training_seconds": training,
            "epochs": sum(len(t.intermediate_values) for t in study.trials),
            "best_val_rmse": study.best_value,
            "champion_test_rmse": float(champion.tags["test_rmse"])}


def bench_sweep(args, n_jobs: int) -> dict:
    overrides = ["-m", "sweep=search", f"hydra.sweeper.n_trials={args.sweep_trials}",
                 f"hydra.sweeper.n_jobs={n_jobs}", *args.sweep_overrides]
    with tempfile.TemporaryDirectory(prefix="abalone-bench-sweep-") as tmp:
        measured = run_measured([sys.executable, "-m", "abalone.train", *overrides], Path(tmp),
                                base_env(args.data))
        outcome = sweep_outcome(Path(tmp))
    states = outcome["states"]
    finished = states.count("COMPLETE") + states.count("PRUNED")
    return {"n_trials": args.sweep_trials, "n_jobs": n_jobs,
            "wall_seconds": measured["wall_seconds"],
            "trials_per_minute": finished / measured["wall_seconds"] * 60,
            "pruned_fraction": states.count("PRUNED") / len(states),
            "failed": states.count("FAIL"),
            "best_val_rmse": outcome["best_val_rmse"],
            "champion_test_rmse": outcome["champion_test_rmse"],
            "peak_rss_mib": measured["peak_rss_mib"]}
