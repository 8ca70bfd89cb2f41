"""What a short sweep of our MLP reaches on scikit-learn's bundled tables, next to scikit-learn's
HistGradientBoosting on the same training and test rows (README, "Your own table").

    python scripts/table_baselines.py [--trials 6]

Each table is written to CSV and swept with `-m sweep=quick data=table` (the task's primary
validation metric: val_rmse or val_log_loss) into a throw-away SQLite store; the champion's
held-out metrics are read back from MLflow. The baseline trains on the training and validation
rows of the same splits (abalone.dataset.load with the same data settings) with its defaults.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from sklearn import datasets, ensemble, metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abalone import dataset  # noqa: E402
from abalone.config import TableDataConfig  # noqa: E402


def tables() -> dict:
    cancer = datasets.load_breast_cancer(as_frame=True)
    frame = cancer.frame.copy()
    frame["target"] = frame["target"].map(dict(enumerate(cancer.target_names)))
    return {"diabetes (regression)": datasets.load_diabetes(as_frame=True, scaled=False).frame,
            "breast cancer (2 classes)": frame,
            "wine (3 classes)": datasets.load_wine(as_frame=True).frame}


def baseline(path: Path) -> tuple[dict, float]:
    ds = dataset.load(OmegaConf.merge(OmegaConf.structured(TableDataConfig),
                                      {"path": str(path), "target": "target"}))
    train = pd.concat([ds.splits.train, ds.splits.val])
    columns = ds.columns
    start = time.perf_counter()
    if ds.task == "regression":
        model = ensemble.HistGradientBoostingRegressor(random_state=0)
        model.fit(train[columns], train["target"])
        predicted = model.predict(ds.splits.test[columns])
        found = {"test_rmse": metrics.root_mean_squared_error(ds.splits.test["target"],
                                                              predicted)}
    else:
        model = ensemble.HistGradientBoostingClassifier(random_state=0)
        model.fit(train[columns], train["target"])
        p = model.predict_proba(ds.splits.test[columns])
        truth = ds.splits.test["target"]
        found = {"test_log_loss": metrics.log_loss(truth, p, labels=model.classes_),
                 "test_accuracy": metrics.accuracy_score(truth, model.classes_[p.argmax(1)])}
    return found, time.perf_counter() - start


def sweep(path: Path, task: str, trials: int, root: Path) -> tuple[dict, float]:
    import mlflow

    metric = "val_rmse" if task == "regression" else "val_log_loss"
    uri = f"sqlite:///{root}/mlflow.db"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "abalone.train", "-m", "sweep=quick", "data=table",
         f"data.path={path}", "data.target=target", f"hydra.sweeper.metric={metric}",
         f"hydra.sweeper.n_trials={trials}", f"tracking.uri={uri}",
         f"tracking.experiment={path.stem}", f"hydra.sweep.dir={root}/multirun/{path.stem}"],
        cwd=root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(path.stem).experiment_id
    (parent,) = [r for r in client.search_runs([experiment])
                 if r.data.tags.get("abalone.role") == "sweep"]
    champion = client.get_run(parent.data.tags["best.run_id"]).data.metrics
    return {k: v for k, v in champion.items() if k.startswith("test_")}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    rows = ["| table | rows | ours: sweep=quick, champion | HistGradientBoosting |",
            "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, frame in tables().items():
            path = root / (name.split()[0] + ".csv")
            frame.to_csv(path, index=False)
            theirs, their_seconds = baseline(path)
            task = "regression" if "test_rmse" in theirs else "classification"
            ours, our_seconds = sweep(path, task, args.trials, root)
            shown = [k for k in ("test_rmse", "test_log_loss", "test_accuracy") if k in theirs]

            def cell(found: dict, seconds: float) -> str:
                return ", ".join(f"{k[5:]} {found[k]:.3f}" for k in shown) + f" ({seconds:.0f} s)"

            rows.append(f"| {name} | {len(frame)} | {cell(ours, our_seconds)} "
                        f"({args.trials} trials) | {cell(theirs, their_seconds)} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
