"""Our MLflow callback sends one batched request per epoch, never one per metric."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

EPOCH_KEYS = {"loss", "val_loss", "mae", "val_mae", "rmse", "val_rmse", "learning_rate",
              "epoch_duration"}



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


def fit_with_logger(client, epochs: int, interval: float = 0.0, optimizer="adam") -> None:
    import keras

    from abalone.callbacks import MlflowLogger
    from abalone.model import build_regressor
    from test_config_and_model import abalone_table

    rng = np.random.default_rng(0)
    table = abalone_table(0.0, 1.0)
    x = {name: rng.integers(0, 3, (64, 1)).astype("int32") for name in table.categorical}
    x.update({c: rng.random((64, 1), dtype="float32") for c in table.numeric})
    y = rng.random((64, 1), dtype="float32")
    model = build_regressor(8, 1, 1.0, "relu", 0.0, False, table=table)
    model.compile(optimizer, loss="mse", metrics=[keras.metrics.RootMeanSquaredError(name="rmse"),
                                               keras.metrics.MeanAbsoluteError(name="mae")])
    model.fit(x, y, validation_split=0.25, epochs=epochs, batch_size=16, verbose=0,
              callbacks=[MlflowLogger(client, "run-1", interval=interval)])


def logged(client) -> dict[tuple[str, int], list[float]]:
    values: dict[tuple[str, int], list[float]] = {}
    for _, call in client.calls:
        for metric in call["metrics"]:
            values.setdefault((metric.key, metric.step), []).append(metric.value)
    return values


def test_at_most_one_batched_call_per_epoch_off_the_training_thread():
    client = RecordingClient()
    fit_with_logger(client, epochs=3)
    assert {name for name, _ in client.calls} == {"log_batch"}  # nothing but batches
    assert 1 <= len(client.calls) <= 4  # 3 epochs + the total, fewer when epochs share one
    for _, call in client.calls:
        assert call["run_id"] == "run-1"
        assert call["thread"] != threading.current_thread().name  # training did not wait
    values = logged(client)
    assert set(values) == {(key, step) for key in EPOCH_KEYS for step in (1, 2, 3)} | {
        ("total_training_time", 0)}
    assert all(len(v) == 1 and np.isfinite(v[0]) for v in values.values())  # each exactly once


class SlowClient(RecordingClient):
    def log_batch(self, *args, **kwargs):
        time.sleep(0.3)  # a slow server: epochs finish faster than requests
        super().log_batch(*args, **kwargs)


def test_a_slow_server_gets_fewer_larger_batches_and_training_waits_for_them():
    client = SlowClient()
    fit_with_logger(client, epochs=8)
    assert len(client.calls) < 8
    assert len(logged(client)) == 8 * len(EPOCH_KEYS) + 1  # none lost, all sent before fit returned


def test_short_epochs_share_a_request_per_interval():
    client = RecordingClient()
    start = time.monotonic()
    fit_with_logger(client, epochs=10, interval=60.0)
    assert time.monotonic() - start < 30  # the end of training does not wait out the interval
    assert len(client.calls) == 1  # all ten epochs and the total in one request
    assert len(logged(client)) == 10 * len(EPOCH_KEYS) + 1


class FailingClient(RecordingClient):
    def log_batch(self, *args, **kwargs):
        raise ConnectionError("server went away")


def test_a_refused_batch_fails_the_training():
    with pytest.raises(ConnectionError, match="server went away"):
        fit_with_logger(FailingClient(), epochs=2)


def test_a_scheduled_learning_rate_is_logged_as_the_optimizer_sees_it():
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5)
    client = RecordingClient()
    fit_with_logger(client, epochs=4, optimizer=keras.optimizers.Adam(schedule))
    values = logged(client)
    # 48 training rows in batches of 16: 3 steps per epoch, so the rate halves every epoch
    # (the value the optimizer uses next, as Keras's own `optimizer.learning_rate` gives it).
    assert [values[("learning_rate", step)][0] for step in (1, 2, 3, 4)] == pytest.approx(
        [0.05, 0.025, 0.0125, 0.00625])


def test_a_schedule_for_scalar_steps_only_is_evaluated_step_by_step():
    import keras

    # With a warm-up, Keras's CosineDecay branches with ops.cond, which takes scalars only.
    schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=9, warmup_target=0.1,
                                                      warmup_steps=3)
    client = RecordingClient()
    fit_with_logger(client, epochs=4, optimizer=keras.optimizers.Adam(schedule))
    values = logged(client)
    expected = [float(keras.ops.convert_to_numpy(schedule(3 * epoch))) for epoch in (1, 2, 3, 4)]
    assert [values[("learning_rate", step)][0] for step in (1, 2, 3, 4)] == pytest.approx(expected)
    assert len(set(expected)) == 4


def test_a_remembered_interrupt_stops_training_at_the_epoch_end():
    import keras

    from abalone.callbacks import RaiseOnInterrupt

    interrupted, epochs_seen = threading.Event(), []

    class SetAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            epochs_seen.append(epoch)
            interrupted.set()

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", loss="mse")
    with pytest.raises(KeyboardInterrupt):
        model.fit(np.zeros((8, 2)), np.zeros((8, 1)), epochs=5, verbose=0,
                  callbacks=[SetAfterFirstEpoch(), RaiseOnInterrupt(interrupted)])
    assert epochs_seen == [0]


def test_learning_curves_of_a_diverged_run_say_why_they_are_empty():
    import math

    import matplotlib.pyplot as plt

    from abalone.evaluate import learning_curves

    diverged = learning_curves({"loss": [math.nan, math.inf], "val_loss": [math.nan, math.nan],
                                "rmse": [math.inf, math.nan], "val_rmse": [math.nan, 3.0]})
    texts = [[t.get_text() for t in ax.texts] for ax in diverged.axes]
    assert texts == [["no finite loss to draw:\ntraining diverged"], []]
    assert [len(ax.lines) for ax in diverged.axes] == [0, 1]  # val_rmse has a finite point
    plt.close(diverged)
    fine = learning_curves({"loss": [3.0, 2.0], "val_loss": [3.5, 2.5]})
    assert [len(ax.lines) for ax in fine.axes] == [2, 0] and not fine.axes[0].texts
    plt.close(fine)
