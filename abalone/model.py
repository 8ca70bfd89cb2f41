"""Keras model and optimizer builders; conf/model and conf/optimizer name them as `_target_`.

The model owns its preprocessing (normalisation with statistics of the training rows, one-hot
categories: `TableInputs`), so a saved model takes raw values; its head, loss and metrics fit the
task (`compile_arguments`); a run measures a built model's size and speed (`model_properties`).
Keras 3 only: no TensorFlow imports, so the same code runs under KERAS_BACKEND=jax.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import keras
import numpy as np
from keras import layers

from abalone.config import ConfigError, OptimizerName, Schedule
from abalone.serving import REGRESSION, flag_name, input_name


def hidden_widths(units: int, depth: int, taper: float) -> list[int]:
    return [max(1, round(units * taper**i)) for i in range(depth)]


@dataclass
class TableInputs:
    """What a model builder is given as `table=` (the contract: docs/your-data.md): the model's
    inputs by name, the statistics and vocabulary sizes of the training rows, the task. Its
    `inputs`, `features` and `head` build the usual parts; a builder may use them or not."""

    numeric: list[str]  # input names of numeric columns, float32 (rows, 1)
    mean: np.ndarray  # of the numeric columns over the training rows
    variance: np.ndarray
    # input name -> indices it takes, int32 (rows, 1): 0 for a value the training rows never
    # had, except in a column of declared values (data.categories), which refuses any other
    categorical: dict[str, int]
    flags: list[str] = field(default_factory=list)  # 1.0 where a missing value was filled in
    task: str = REGRESSION
    n_classes: int | None = None  # classification: 2 or more
    output_name: str = "output"

    @property
    def n_outputs(self) -> int:
        """Units of the output: 1 (regression, or the positive class's probability), else one
        probability per class."""
        return 1 if self.task == REGRESSION or self.n_classes == 2 else self.n_classes

    def inputs(self) -> dict:
        found = {name: keras.Input(shape=(1,), dtype="int32", name=name)
                 for name in self.categorical}
        found.update({name: keras.Input(shape=(1,), dtype="float32", name=name)
                      for name in [*self.numeric, *self.flags]})
        return found

    def features(self, inputs: dict):
        """One float vector per row: normalised numbers, one-hot categories, missing flags."""
        parts = []
        if self.numeric:
            numbers = (layers.Concatenate(name="measurements")([inputs[c] for c in self.numeric])
                       if len(self.numeric) > 1 else inputs[self.numeric[0]])
            parts.append(layers.Normalization(mean=self.mean, variance=self.variance,
                                              name="normalise")(numbers))
        parts += [layers.CategoryEncoding(num_tokens=n, output_mode="one_hot",
                                          name=f"{c.lower()}_one_hot")(inputs[c])
                  for c, n in self.categorical.items()]
        parts += [inputs[c] for c in self.flags]
        return layers.Concatenate(name="features")(parts) if len(parts) > 1 else parts[0]

    def head(self, x):
        activation = (None if self.task == REGRESSION else
                      "sigmoid" if self.n_classes == 2 else "softmax")
        return layers.Dense(self.n_outputs, activation=activation, name=self.output_name)(x)


def table_inputs(spec: dict) -> TableInputs:
    """The table's inputs, from abalone/dataset.py's spec of the training rows."""
    return TableInputs(
        [input_name(c) for c in spec["numeric"]], np.asarray(spec["mean"]),
        np.asarray(spec["variance"]),
        {input_name(c): len(spec["vocabulary"][c]) + (c not in spec["declared"])
         for c in spec["categorical"]},
        [flag_name(c) for c in spec["flagged"]], spec["task"],
        len(spec["classes"]) if spec["classes"] else None, input_name(spec["target"]))


def build_mlp(units: int, depth: int, taper: float, activation: str, dropout: float,
              batch_norm: bool, *, table: TableInputs) -> keras.Model:
    """An MLP on the table's features with the task's head."""
    inputs = table.inputs()
    x = table.features(inputs)
    for width in hidden_widths(units, depth, taper):
        x = layers.Dense(width, activation=activation)(x)
        if batch_norm:
            x = layers.BatchNormalization()(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, table.head(x), name=f"table_{table.task}")


build_regressor = build_mlp  # the name conf/model's options have always used


def check_built(model, builder: str, table: TableInputs) -> None:
    """A builder's model must be a keras.Model taking (some of) the table's inputs by name and
    giving `table.n_outputs` values per row; else ConfigError naming the builder and what it
    returned, before anything trains."""
    def fail(what: str):
        raise ConfigError(f"model builder {builder} returned {what}; it must return a "
                          f"keras.Model on table.inputs() with {table.n_outputs} output(s) per "
                          "row (docs/your-data.md)")

    if not isinstance(model, keras.Model):
        fail(f"a {type(model).__module__}.{type(model).__qualname__}: {str(model)[:80]!r}")
    try:
        names = {t.name for t in model.inputs}
        shapes = [tuple(t.shape) for t in model.outputs]
    except (AttributeError, ValueError):
        fail("a model without defined inputs (build it with keras.Input / table.inputs())")
    unknown = names - set(table.inputs())
    if unknown:
        fail(f"a model with inputs {sorted(unknown)} the table has no column for")
    if len(shapes) != 1 or shapes[0][-1] != table.n_outputs:
        fail(f"a model with output shape(s) {shapes}")


def compile_arguments(table: TableInputs) -> dict:
    """The task's loss and per-epoch metrics (each logged, val_ too, and a sweep's metric)."""
    if table.task == REGRESSION:
        return {"loss": "mse",
                "metrics": [keras.metrics.RootMeanSquaredError(name="rmse"),
                            keras.metrics.MeanAbsoluteError(name="mae")]}
    binary = table.n_classes == 2
    metrics = [keras.metrics.BinaryCrossentropy(name="log_loss") if binary else
               keras.metrics.SparseCategoricalCrossentropy(name="log_loss"),
               keras.metrics.BinaryAccuracy(name="accuracy") if binary else
               keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
               MacroF1(table.n_classes)]
    if binary:
        metrics.append(keras.metrics.AUC(name="auc"))
    return {"loss": "binary_crossentropy" if binary else "sparse_categorical_crossentropy",
            "metrics": metrics}


class MacroF1(keras.metrics.Metric):
    """F1 of each class, averaged (scikit-learn's f1_score(average="macro")), from a confusion
    matrix summed over the epoch; Keras's own F1Score wants one-hot labels."""

    def __init__(self, n_classes: int, name: str = "f1", **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_classes = n_classes
        self.confusion = self.add_variable(shape=(n_classes, n_classes), initializer="zeros",
                                           name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        truth = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        guess = (ops.cast(ops.reshape(y_pred, (-1,)) > 0.5, "int32") if self.n_classes == 2
                 else ops.argmax(y_pred, axis=-1))
        self.confusion.assign_add(ops.matmul(
            ops.transpose(ops.one_hot(truth, self.n_classes)), ops.one_hot(guess, self.n_classes)))

    def result(self):
        ops = keras.ops
        both = ops.sum(self.confusion, axis=0) + ops.sum(self.confusion, axis=1)
        return ops.mean(ops.divide_no_nan(2 * ops.diagonal(self.confusion), both))

    def reset_state(self):
        self.confusion.assign(keras.ops.zeros((self.n_classes, self.n_classes)))

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes}


@dataclass(frozen=True)
class LearningRate:
    """The learning rate `build_optimizer`'s settings give at each optimizer step, read from the
    configuration by what needs it (the shared program, the epoch logger and printer) rather
    than back out of Keras's objects."""

    initial: float
    schedule: Schedule
    steps_per_epoch: int
    epochs: int
    decay_rate: float = 0.95  # exponential: factor per epoch
    final_fraction: float = 0.0  # cosine: the rate at the end, as a fraction of `initial`

    @classmethod
    def of(cls, optimizer_cfg, steps_per_epoch: int, epochs: int) -> LearningRate | None:
        """From conf/optimizer's settings; None for an optimizer built by a builder of one's
        own, which may schedule its rate otherwise."""
        if optimizer_cfg.get("_target_") != f"{__name__}.build_optimizer":
            return None
        return cls(float(optimizer_cfg.lr), Schedule(optimizer_cfg.schedule), steps_per_epoch,
                   epochs, float(optimizer_cfg.decay_rate), float(optimizer_cfg.final_lr_fraction))

    @property
    def decay_steps(self) -> int:
        return self.steps_per_epoch * (self.epochs if self.schedule is Schedule.cosine else 1)

    def keras(self):
        """The rate as Keras's optimizers take it: a float or a schedule."""
        if self.schedule is Schedule.cosine:
            return keras.optimizers.schedules.CosineDecay(
                self.initial, decay_steps=self.decay_steps, alpha=self.final_fraction)
        if self.schedule is Schedule.exponential:
            return keras.optimizers.schedules.ExponentialDecay(
                self.initial, decay_steps=self.decay_steps, decay_rate=self.decay_rate)
        return self.initial

    def at(self, steps) -> np.ndarray:
        """The rate at each optimizer step in `steps` (Keras's schedules' formulas)."""
        step = np.asarray(steps, dtype=np.float64)
        if self.schedule is Schedule.cosine:
            cosine = 0.5 * (1 + np.cos(np.pi * np.minimum(step, self.decay_steps)
                                       / self.decay_steps))
            return self.initial * ((1 - self.final_fraction) * cosine + self.final_fraction)
        if self.schedule is Schedule.exponential:
            return self.initial * self.decay_rate ** (step / self.decay_steps)
        return np.full_like(step, self.initial)

    def after_epoch(self, epoch: int) -> float:
        """The rate the optimizer uses next once epoch `epoch` (from 0) has ended."""
        return float(self.at((epoch + 1) * self.steps_per_epoch))


def build_optimizer(name: str, lr: float, weight_decay: float, momentum: float, schedule: str,
                    decay_rate: float, final_lr_fraction: float, *, steps_per_epoch: int,
                    epochs: int) -> keras.optimizers.Optimizer:
    learning_rate = LearningRate(lr, Schedule(schedule), steps_per_epoch, epochs, decay_rate,
                                 final_lr_fraction).keras()
    # Keras multiplies by a weight decay of 0.0 on every step; None skips that work.
    decay = weight_decay or None
    name = OptimizerName(name)
    if name is OptimizerName.adamw:
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    if name is OptimizerName.sgd:
        return keras.optimizers.SGD(learning_rate, momentum=momentum, weight_decay=decay)
    return keras.optimizers.Adam(learning_rate, weight_decay=decay)


# Rows in the batch whose prediction time `predict_seconds` measures.
PREDICT_BATCH = 256


def model_properties(model, rows: dict, keras) -> dict[str, float]:
    """What a sweep may optimise or constrain besides validation metrics: the parameter count,
    and the median seconds of one prediction on PREDICT_BATCH rows on this machine (after a
    warm-up call; a direct call, as serving makes)."""
    batch = {name: column[:PREDICT_BATCH] for name, column in rows.items()}
    keras.ops.convert_to_numpy(model(batch, training=False))
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(model(batch, training=False))
        seconds.append(time.perf_counter() - start)
    return {"params_count": float(model.count_params()),
            "predict_seconds": sorted(seconds)[len(seconds) // 2]}
