"""Keras model and optimizer builders; conf/model and conf/optimizer name them as `_target_`.

The model owns its preprocessing (normalisation with statistics of the training rows, Sex
one-hot), so a saved model takes raw measurements. Keras 3 only: no TensorFlow imports, so the
same code runs under KERAS_BACKEND=jax.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from abalone.config import OptimizerName, Schedule
from abalone.serving import NUMERIC_COLUMNS, SEX_VALUES


def hidden_widths(units: int, depth: int, taper: float) -> list[int]:
    return [max(1, round(units * taper**i)) for i in range(depth)]


def build_regressor(units: int, depth: int, taper: float, activation: str, dropout: float,
                    batch_norm: bool, *, feature_mean: np.ndarray,
                    feature_variance: np.ndarray) -> keras.Model:
    """An MLP on normalised measurements and one-hot Sex, with a linear Rings output."""
    inputs = {"Sex": keras.Input(shape=(1,), dtype="int32", name="Sex")}
    inputs.update({c: keras.Input(shape=(1,), dtype="float32", name=c) for c in NUMERIC_COLUMNS})
    measurements = layers.Concatenate(name="measurements")([inputs[c] for c in NUMERIC_COLUMNS])
    x = layers.Concatenate(name="features")([
        layers.Normalization(mean=feature_mean, variance=feature_variance,
                             name="normalise")(measurements),
        layers.CategoryEncoding(num_tokens=len(SEX_VALUES), output_mode="one_hot",
                                name="sex_one_hot")(inputs["Sex"]),
    ])
    for width in hidden_widths(units, depth, taper):
        x = layers.Dense(width, activation=activation)(x)
        if batch_norm:
            x = layers.BatchNormalization()(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, layers.Dense(1, name="Rings")(x), name="abalone_regressor")


def build_optimizer(name: str, lr: float, weight_decay: float, momentum: float, schedule: str,
                    decay_rate: float, final_lr_fraction: float, *, steps_per_epoch: int,
                    epochs: int) -> keras.optimizers.Optimizer:
    if Schedule(schedule) is Schedule.cosine:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=steps_per_epoch * epochs, alpha=final_lr_fraction)
    elif Schedule(schedule) is Schedule.exponential:
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=steps_per_epoch, decay_rate=decay_rate)
    else:
        learning_rate = lr
    # Keras multiplies by a weight decay of 0.0 on every step; None skips that work.
    decay = weight_decay or None
    name = OptimizerName(name)
    if name is OptimizerName.adamw:
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    if name is OptimizerName.sgd:
        return keras.optimizers.SGD(learning_rate, momentum=momentum, weight_decay=decay)
    return keras.optimizers.Adam(learning_rate, weight_decay=decay)
