"""The peer of `sweep=search`: the plain Optuna script a user would write instead of our sweep,
run by the benchmark's `throughput` section as its own process (issue #21).

    python scripts/bench/peer_optuna.py --data abalone.data --tracking-uri sqlite:///mlflow.db

What sweeps/search.yaml configures, written with the libraries directly: Optuna's TPE sampler
(seed 42, 10 start-up trials; Optuna's defaults otherwise, where our sweeper adds
multivariate=True and constant_liar=True) and median pruner (5 start-up trials, 8 warm-up epochs)
on an in-memory study, the same space, 60 epochs, `study.optimize(n_trials=50, n_jobs=2)` (two
threads). The data and its train/validation/test split are abalone's own (`abalone.dataset`), the
network and optimizer abalone's `build_mlp` and `build_optimizer` (a user would copy them), the
training a plain `model.compile` and `model.fit` on NumPy arrays with Keras's defaults.
Tracking: optuna-integration's `MLflowCallback` (nested runs under one parent run, the trial's
value, params and user attributes), per-epoch metrics by a small Keras callback
(`mlflow.log_metrics`), and the trial's test RMSE.

One departure from the optuna-integration docs, in the peer's favour: `track_in_mlflow()`, their way
of logging into the callback's run from the objective, holds the callback's lock for the whole
objective, which would run the two threads' trials one after the other. The objective here opens
the trial's run itself and hands its id to the callback as `track_in_mlflow` does (the trial's
system attribute `mlflow_run_id`), so the two threads train at once.

Prints one line `RESULT {json}`: wall seconds (from the script's start, imports included), the
trials' states, the epochs they trained (their pruning reports), the best trial's validation and
test RMSE.
"""

from __future__ import annotations

import time

START = time.monotonic()

import argparse  # noqa: E402 - after START, so the wall time counts the imports
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from optuna_integration import KerasPruningCallback, MLflowCallback  # noqa: E402
from optuna_integration.mlflow.mlflow import RUN_ID_ATTRIBUTE_KEY  # noqa: E402

import abalone  # noqa: E402
from abalone import dataset  # noqa: E402
from abalone.model import build_mlp, build_optimizer  # noqa: E402

# conf/optimizer/adam.yaml and adamw.yaml, as a user would copy them: cosine decay of the lr.
OPTIMIZERS = {"adam": {"final_lr_fraction": 0.0}, "adamw": {"final_lr_fraction": 0.05}}


class EpochMetrics(keras.callbacks.Callback):
    """Every epoch's metrics (loss, rmse, mae and their val_), into the trial's active run."""

    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the UCI abalone.data file")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--enqueue", default=None,
                        help="a JSON list of parameter sets tried first, in order (equal work)")
    parser.add_argument("--no-pruning", action="store_true")
    args = parser.parse_args()

    # conf/data/abalone.yaml as a run composes it: the AWS sample's test rows, validation rows
    # by split_seed.
    with initialize_config_dir(config_dir=str(Path(abalone.__file__).resolve().parent / "conf"),
                               version_base="1.3"):
        ds = dataset.load(compose(config_name="config", overrides=[f"data.path={args.data}"]).data)
    splits = {"train": ds.splits.train, "val": ds.splits.val, "test": ds.splits.test}
    x = {name: ds.inputs(frame) for name, frame in splits.items()}
    y = {name: ds.targets(frame) for name, frame in splits.items()}
    table = ds.table  # the inputs and their statistics, shared by every trial's network
    keras.utils.set_random_seed(args.seed)

    mlflow.set_tracking_uri(args.tracking_uri)
    study = optuna.create_study(
        study_name="peer-optuna", direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10),
        pruner=(optuna.pruners.NopPruner() if args.no_pruning else
                optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=8)))
    if args.enqueue:
        with open(args.enqueue) as sets:
            for params in json.load(sets):
                study.enqueue_trial(params)
    mlflow.set_experiment(study.study_name)  # the callback's experiment (create_experiment)

    with mlflow.start_run(run_name="peer-optuna-sweep") as parent:
        parent_id = parent.info.run_id
        tracker = MLflowCallback(tracking_uri=args.tracking_uri, metric_name="val_rmse",
                                 mlflow_kwargs={"nested": True,
                                                "tags": {"mlflow.parentRunId": parent_id}})

        def objective(trial: optuna.Trial) -> float:
            units = trial.suggest_categorical("model.units", [64, 128, 256])
            depth = trial.suggest_int("model.depth", 2, 4)
            taper = trial.suggest_categorical("model.taper", [0.5, 1.0])
            activation = trial.suggest_categorical("model.activation", ["relu", "gelu"])
            dropout = trial.suggest_float("model.dropout", 0.0, 0.2)
            batch_norm = trial.suggest_categorical("model.batch_norm", [False, True])
            name = trial.suggest_categorical("optimizer", ["adam", "adamw"])
            lr = trial.suggest_float("optimizer.lr", 0.002, 0.03, log=True)
            weight_decay = trial.suggest_float("optimizer.weight_decay", 1e-6, 1e-3, log=True)
            batch_size = trial.suggest_categorical("trainer.batch_size", [128, 256, 512])

            model = build_mlp(units, depth, taper, activation, dropout, batch_norm, table=table)
            optimizer = build_optimizer(
                name, lr, weight_decay, momentum=0.0, schedule="cosine", decay_rate=0.95,
                steps_per_epoch=-(-len(y["train"]) // batch_size), epochs=args.epochs,
                **OPTIMIZERS[name])
            model.compile(optimizer=optimizer, loss="mse",
                          metrics=[keras.metrics.RootMeanSquaredError(name="rmse"),
                                   keras.metrics.MeanAbsoluteError(name="mae")])
            with mlflow.start_run(run_name=str(trial.number), parent_run_id=parent_id) as run:
                trial.storage.set_trial_system_attr(trial._trial_id, RUN_ID_ATTRIBUTE_KEY,
                                                    run.info.run_id)
                history = model.fit(x["train"], y["train"], batch_size=batch_size,
                                    epochs=args.epochs, validation_data=(x["val"], y["val"]),
                                    verbose=0, callbacks=[EpochMetrics(),
                                                          KerasPruningCallback(trial, "val_rmse")])
                test = model.evaluate(x["test"], y["test"], verbose=0, return_dict=True)
                mlflow.log_metric("test_rmse", test["rmse"])
                trial.set_user_attr("test_rmse", test["rmse"])
            return history.history["val_rmse"][-1]

        study.optimize(objective, n_trials=args.trials, n_jobs=args.n_jobs, callbacks=[tracker])

    states = [t.state.name for t in study.trials]
    best = study.best_trial
    print("RESULT", json.dumps({
        "wall_seconds": time.monotonic() - START, "trials": len(states),
        "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "epochs": sum(len(t.intermediate_values) for t in study.trials),
        "best_trial": best.number, "best_val_rmse": best.value,
        "best_test_rmse": best.user_attrs["test_rmse"]}), flush=True)


if __name__ == "__main__":
    main()
