"""Keras callbacks: our MLflow logger and the terminal's one line per epoch.

`MlflowLogger` sends epochs' metrics in batched requests (the AWS sample sends one blocking
request per metric) from a background thread, so training never waits on the network: at most one
request per epoch, and when epochs are shorter than `interval` seconds the epochs of that interval
share one request, which keeps the client's and the server's work off the training's cores.
Training returns only after the last batch is acknowledged, so a run never ends with metrics in
flight. (MLflow's own asynchronous logging costs most of a second to shut down at every run's end.)
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import keras
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger("abalone")


def current_learning_rate(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class MlflowLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics off the training thread, at most one request per epoch.

    Per epoch: Keras's logs (loss, mae, rmse and their val_ twins), learning_rate and
    epoch_duration (seconds), at step = epoch number (from 1). At the end: total_training_time.
    """

    def __init__(self, client: MlflowClient, run_id: str, interval: float = 1.0):
        super().__init__()
        self.client = client
        self.run_id = run_id
        self.interval = interval

    def on_train_begin(self, logs=None):
        self._train_start = time.perf_counter()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Exception | None = None
        self._sender = threading.Thread(target=self._send, name="mlflow-logger", daemon=True)
        self._sender.start()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        values = {k: float(v) for k, v in (logs or {}).items()}
        values["learning_rate"] = current_learning_rate(self.model.optimizer)
        values["epoch_duration"] = time.perf_counter() - self._epoch_start
        self._queue(values, step=epoch + 1)

    def on_train_end(self, logs=None):
        self._queue({"total_training_time": time.perf_counter() - self._train_start}, step=0)
        self._outbox.put(None)
        self._sender.join()
        if self._error is not None:
            raise self._error  # the server refused or never got a batch

    def _queue(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._outbox.put([Metric(key, value, now, step) for key, value in values.items()])

    def _send(self) -> None:
        finished = False
        while not finished:
            metrics = self._outbox.get()
            if metrics is None:
                return
            deadline = time.monotonic() + self.interval
            while True:  # the epochs of the next `interval` seconds join this request
                try:
                    more = self._outbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:  # training ended: send now
                    finished = True
                    break
                metrics.extend(more)
            if self._error is None:
                try:
                    self.client.log_batch(self.run_id, metrics=metrics)
                except Exception as err:  # re-raised on the training thread at the end
                    self._error = err


class EpochPrinter(keras.callbacks.Callback):
    """One readable line per epoch instead of Keras's progress bars."""

    KEYS = ("loss", "val_loss", "rmse", "val_rmse", "mae", "val_mae")

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        figures = "  ".join(f"{k} {logs[k]:.4f}" for k in self.KEYS if k in logs)
        log.info("epoch %*d/%d  %s  lr %.2e  %.2fs", len(str(self.epochs)), epoch + 1,
                 self.epochs, figures, current_learning_rate(self.model.optimizer),
                 time.perf_counter() - self._start)
