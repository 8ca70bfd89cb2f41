"""Keras callbacks: our MLflow logger and the terminal's one line per epoch.

`MlflowLogger` sends each epoch's metrics as one batched request (the AWS sample sends one
blocking request per metric) from a background thread, so training never waits on the network,
and waits for all of them before training returns, so a run never ends with metrics in flight.
(MLflow's own asynchronous logging costs most of a second to shut down at every run's end.)
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import keras
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger("abalone")


def current_learning_rate(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class MlflowLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics with one batched call off the training thread; waits for them
    all at the end.

    Per epoch: Keras's logs (loss, mae, rmse and their val_ twins), learning_rate and
    epoch_duration (seconds), at step = epoch number (from 1). At the end: total_training_time.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        super().__init__()
        self.client = client
        self.run_id = run_id
        self._pending: list = []

    def on_train_begin(self, logs=None):
        self._train_start = time.perf_counter()
        self._pending = []
        # One worker: batches reach the server in epoch order.
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-logger")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        values = {k: float(v) for k, v in (logs or {}).items()}
        values["learning_rate"] = current_learning_rate(self.model.optimizer)
        values["epoch_duration"] = time.perf_counter() - self._epoch_start
        self._log(values, step=epoch + 1)

    def on_train_end(self, logs=None):
        self._log({"total_training_time": time.perf_counter() - self._train_start}, step=0)
        pending, self._pending = self._pending, []
        self._sender.shutdown(wait=True)
        for sent in pending:
            sent.result()  # raises if the server refused a batch

    def _log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self._pending.append(self._sender.submit(self.client.log_batch, self.run_id,
                                                 metrics=metrics))


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
