"""Our MLflow callback sends one batched request per epoch, never one per metric."""

from __future__ import annotations

import numpy as np

EPOCH_KEYS = {"loss", "val_loss", "mae", "val_mae", "rmse", "val_rmse", "learning_rate",
              "epoch_duration"}


import threading


class RecordingClient:
    """Stands in for MlflowClient and records every tracking call made on it."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __getattr__(self, name):  # any other tracking call is recorded too, and counted
        def record(*args, **kwargs):
            self.calls.append((name, kwargs))
        return record

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.calls.append(("log_batch", {"run_id": run_id, "metrics": list(metrics),
                                         "thread": threading.current_thread().name}))


def test_one_batched_call_per_epoch_off_the_training_thread():
    import keras

    from abalone.callbacks import MlflowLogger
    from abalone.data import NUMERIC_COLUMNS
    from abalone.model import build_regressor

    rng = np.random.default_rng(0)
    x = {"Sex": rng.integers(0, 3, (64, 1)).astype("int32")}
    x.update({c: rng.random((64, 1), dtype="float32") for c in NUMERIC_COLUMNS})
    y = rng.random((64, 1), dtype="float32")
    model = build_regressor(8, 1, 1.0, "relu", 0.0, False, feature_mean=np.zeros(7),
                            feature_variance=np.ones(7))
    model.compile("adam", loss="mse", metrics=[keras.metrics.RootMeanSquaredError(name="rmse"),
                                               keras.metrics.MeanAbsoluteError(name="mae")])
    client = RecordingClient()
    model.fit(x, y, validation_split=0.25, epochs=3, batch_size=16, verbose=0,
              callbacks=[MlflowLogger(client, "run-1")])

    assert [name for name, _ in client.calls] == ["log_batch"] * 4  # 3 epochs + the total
    per_epoch, final = client.calls[:3], client.calls[3]
    for step, (_, call) in enumerate(per_epoch, start=1):
        assert call["run_id"] == "run-1"
        assert call["thread"] != threading.current_thread().name  # training did not wait
        assert {m.key for m in call["metrics"]} == EPOCH_KEYS
        assert {m.step for m in call["metrics"]} == {step}
        assert all(np.isfinite(m.value) for m in call["metrics"])
    assert [m.key for m in final[1]["metrics"]] == ["total_training_time"]
