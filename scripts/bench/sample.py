"""Our default run against the AWS sample's recipe, which is reproduced here faithfully and run
in its own interpreter: fit time, epochs, held-out accuracy, peak memory, start-up."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.measure import base_env, in_fresh_interpreter, median_of, our_run

COLUMNS = ["Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
           "Viscera_weight", "Shell_weight", "Rings"]


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


def sample_run(data_path: str, epochs: int, tracking_uri: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="abalone-sample-") as tmp:
        result, measured = in_fresh_interpreter(
            "sample:sample_recipe", (data_path, epochs, tmp, tracking_uri), Path(tmp),
            base_env(data_path, TF_CPP_MIN_LOG_LEVEL="2"))
    result["seconds_per_epoch"] = result["fit_seconds"] / result["epochs"]
    result["peak_rss_mib"] = measured["peak_rss_mib"]
    return result


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

