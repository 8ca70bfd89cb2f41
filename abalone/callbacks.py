"""Keras callbacks: our MLflow logger, the terminal's one line per epoch, the epoch whose weights
a run keeps (and early stopping on the same value), and the checks that stop training
(divergence, a sweep's Ctrl-C).

`MlflowLogger` sends epochs' metrics in batched requests (the AWS sample sends one blocking
request per metric) from a background thread, so training never waits on the network: at most one
request per epoch, and when epochs are shorter than `interval` seconds the epochs of that interval
share one request, which keeps the client's and the server's work off the training's cores.
Training returns only after the last batch is acknowledged, so a run never ends with metrics in
flight. (MLflow's own asynchronous logging costs most of a second to shut down at every run's end.)
While the tracking server is away (`abalone.tracking.ServerOutage` holds the request), training
goes on and its epochs wait in the queue, in order, each with its own step and the time it ended;
they go out in the first request after the server is back.
The learning rate comes from the configuration (`abalone.model.LearningRate`, a NumPy formula);
for an optimizer the configuration does not describe, a scheduled rate is evaluated on the sender
thread, for all epochs of a request at once: a Keras schedule costs about a millisecond of eager
ops per call, several percent of an epoch of the default model if evaluated every epoch.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Callable, NamedTuple

import keras
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from abalone.config import AbaloneError, ConfigError

log = logging.getLogger(__name__)


def current_learning_rate(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class _Logged(NamedTuple):
    """One epoch's (or the end's) values, queued for the sender thread."""

    values: dict[str, float]
    step: int
    timestamp: int  # milliseconds, taken when the epoch ended
    iterations: int | None = None  # optimizer steps so far, when learning_rate is still to add


class MlflowLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics off the training thread, at most one request per epoch.

    Per epoch: Keras's logs (loss, mae, rmse and their val_ twins), learning_rate and
    epoch_duration (seconds), at step = epoch number (from 1). At the end: total_training_time.
    """

    def __init__(self, client: MlflowClient, run_id: str, interval: float = 1.0,
                 learning_rate: Callable[[int], float] | None = None):
        super().__init__()
        self.client = client
        self.run_id = run_id
        self.interval = interval
        self.learning_rate = learning_rate  # after an epoch (from 0), from the configuration
        self._sender: threading.Thread | None = None

    def on_train_begin(self, logs=None):
        self._train_start = time.perf_counter()
        # A copy of the optimizer's schedule (a pure function of the step), for the sender.
        learning_rate = self.model.optimizer.get_config()["learning_rate"]
        self._schedule = (keras.optimizers.schedules.deserialize(learning_rate)
                          if isinstance(learning_rate, dict) else None)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Exception | None = None
        self._sender = threading.Thread(target=self._send, name="mlflow-logger", daemon=True)
        self._sender.start()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        values = {k: float(v) for k, v in (logs or {}).items()}
        values["epoch_duration"] = time.perf_counter() - self._epoch_start
        optimizer = self.model.optimizer
        iterations = None
        if self.learning_rate is not None:
            values["learning_rate"] = self.learning_rate(epoch)
        elif self._schedule is None:  # a variable: reading it costs microseconds
            values["learning_rate"] = current_learning_rate(optimizer)
        else:
            iterations = int(optimizer.iterations)
        self._queue(values, epoch + 1, iterations)

    def on_train_end(self, logs=None):
        self._queue({"total_training_time": time.perf_counter() - self._train_start}, 0)
        self.close()

    def close(self) -> None:
        """Send what is queued and stop the sender thread. Keras skips on_train_end when fit
        raises (a pruned trial, Ctrl-C), so the caller then closes the logger itself."""
        if self._sender is None:
            return
        self._outbox.put(None)
        try:
            self._sender.join()
        except KeyboardInterrupt:  # while the sender waits out an outage: it stops waiting
            from abalone.tracking import OUTAGE

            OUTAGE.interrupt()
            raise
        self._sender = None
        if self._error is not None:
            raise self._error  # the server refused or never got a batch

    def _queue(self, values: dict[str, float], step: int, iterations: int | None = None):
        self._outbox.put(_Logged(values, step, int(time.time() * 1000), iterations))

    def _metrics(self, entries: list[_Logged]) -> list[Metric]:
        scheduled = [entry for entry in entries if entry.iterations is not None]
        if scheduled:
            rates = self._learning_rates([entry.iterations for entry in scheduled])
            for entry, rate in zip(scheduled, rates):
                entry.values["learning_rate"] = rate
        return [Metric(key, value, entry.timestamp, entry.step)
                for entry in entries for key, value in entry.values.items()]

    def _learning_rates(self, iterations: list[int]) -> list[float]:
        """The schedule at each step: one vectorised call (eager ops cost ~1 ms a call), or one
        call per step for a schedule written for scalar steps only."""
        try:
            rates = keras.ops.convert_to_numpy(self._schedule(np.asarray(iterations)))
            if rates.shape == (len(iterations),):
                return rates.tolist()
        except Exception:  # noqa: BLE001 - e.g. a warm-up schedule's ops.cond on a vector
            pass
        return [float(keras.ops.convert_to_numpy(self._schedule(i))) for i in iterations]

    def _send(self) -> None:
        finished = False
        while not finished:
            entries = [self._outbox.get()]
            if entries[0] is None:
                return
            deadline = time.monotonic() + self.interval
            while True:  # the epochs of the next `interval` seconds join this request
                try:
                    entry = self._outbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if entry is None:  # training ended: send now
                    finished = True
                    break
                entries.append(entry)
            if self._error is None:
                try:
                    self.client.log_batch(self.run_id, metrics=self._metrics(entries))
                except Exception as err:  # re-raised on the training thread at the end
                    self._error = err


class TrainingDiverged(AbaloneError):
    """The loss became NaN or infinite."""


class RaiseOnDivergence(keras.callbacks.Callback):
    """Fails training at the end of an epoch whose loss is NaN or infinite. Placed after the
    loggers (the epoch is recorded) and before a sweep's pruner: Optuna's pruners prune NaN
    values once a trial has finished, and a diverged trial is a failure, not a pruned one."""

    def on_epoch_end(self, epoch, logs=None):
        if not math.isfinite(float((logs or {}).get("loss", math.nan))):
            raise TrainingDiverged("training loss became NaN or infinite; lower optimizer.lr "
                                   "or change the model")


class RaiseOnInterrupt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the next epoch end once `interrupted` is set. Python drops a
    Ctrl-C whose KeyboardInterrupt lands inside a finalizer (`__del__`), and TensorFlow's objects
    have many; the sweeper's SIGINT handler also sets this event, so such a Ctrl-C still stops."""

    def __init__(self, interrupted: threading.Event):
        super().__init__()
        self.interrupted = interrupted

    def on_epoch_end(self, epoch, logs=None):
        if self.interrupted.is_set():
            raise KeyboardInterrupt


class EpochPrinter(keras.callbacks.Callback):
    """One readable line per epoch instead of Keras's progress bars."""

    KEYS = ("loss", "val_loss", "rmse", "val_rmse", "mae", "val_mae", "accuracy", "val_accuracy")

    def __init__(self, epochs: int, learning_rate: Callable[[int], float] | None = None):
        super().__init__()
        self.epochs = epochs
        self.learning_rate = learning_rate  # after an epoch (from 0), from the configuration

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        figures = "  ".join(f"{k} {logs[k]:.4f}" for k in self.KEYS if k in logs)
        rate = (self.learning_rate(epoch) if self.learning_rate is not None
                else current_learning_rate(self.model.optimizer))
        log.info("epoch %*d/%d  %s  lr %.2e  %.2fs", len(str(self.epochs)), epoch + 1,
                 self.epochs, figures, rate, time.perf_counter() - self._start)


class BestEpoch(keras.callbacks.Callback):
    """The epoch whose weights a run keeps: with `keep_best` the one with the best `monitor`
    value (the lowest; the highest with `maximize`), else the last. With `patience`, training
    stops after that many epochs without a better value (early stopping on the same value).

    It saves the weights (and the optimizer's state) as the value improves and puts them back
    when training ends; the shared program (abalone.mlp_program) keeps a snapshot in its own
    variables instead and sets `saves_weights` False."""

    def __init__(self, monitor: str, maximize: bool = False, patience: int = 0,
                 keep_best: bool = True):
        super().__init__()
        self.monitor, self.maximize = monitor, maximize
        self.patience, self.keep_best = patience, keep_best
        self.saves_weights = True

    def on_train_begin(self, logs=None):
        self.best = self.best_epoch = self.last_epoch = None
        self.wait = 0
        self.saved: tuple | None = None

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = epoch
        logs = logs or {}
        if self.monitor not in logs:
            raise ConfigError(f"{self.monitor}, which chooses the epoch a run keeps, is not "
                              f"logged per epoch; use one of "
                              f"{sorted(k for k in logs if k.startswith('val_'))}")
        value = float(logs[self.monitor])
        if math.isfinite(value) and (self.best is None or (
                value > self.best if self.maximize else value < self.best)):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.keep_best and self.saves_weights:
                self.saved = (self.model.get_weights(),
                              [v.numpy() for v in self.model.optimizer.variables])
            return
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.model.stop_training = True

    @property
    def kept_epoch(self) -> int | None:
        """The epoch (from 0) whose weights the model holds once training has ended."""
        if self.keep_best and self.best_epoch is not None:
            return self.best_epoch
        return self.last_epoch

    def on_train_end(self, logs=None):
        if self.saved is not None and self.kept_epoch != self.last_epoch:
            weights, optimizer_state = self.saved
            self.model.set_weights(weights)
            for variable, value in zip(self.model.optimizer.variables, optimizer_state):
                variable.assign(value)
        self.saved = None
