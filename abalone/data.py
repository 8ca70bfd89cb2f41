"""The rows as Keras's `model.fit` takes them (`fit_arguments`). What the rows are, where they come
from and how they are checked and split: abalone/dataset.py, abalone/table.py, abalone/source.py.
"""

from __future__ import annotations

import numpy as np


def fit_arguments(train: tuple[dict, np.ndarray], val: tuple[dict, np.ndarray],
                  batch_size: int, seed: int, backend: str) -> dict:
    """The data arguments of `model.fit`. Under TensorFlow: cached tf.data pipelines (given
    NumPy arrays, Keras rebuilds its data adapter every epoch, about half an epoch's time here);
    under other backends the arrays, which their trainers iterate directly. Validation rows go
    in one batch."""
    val_rows = len(val[1])
    if backend != "tensorflow":
        return {"x": train[0], "y": train[1], "batch_size": batch_size, "shuffle": True,
                "validation_data": val, "validation_batch_size": val_rows}
    import tensorflow as tf

    # No autotuning thread: an iterator that outlives its fit (a pruned trial's traceback holds
    # it until Python's cyclic collector frees it) waits for that thread when destroyed, whose
    # wake-up period has grown towards 60 s by then: the sweep's 25-79 s stalls (issue #33).
    options = tf.data.Options()
    options.autotune.enabled = False
    rows = tf.data.Dataset.from_tensor_slices(train).cache()
    rows = rows.shuffle(len(train[1]), seed=seed, reshuffle_each_iteration=True)
    return {"x": rows.batch(batch_size).prefetch(1).with_options(options),
            "shuffle": False,  # the pipeline shuffles; Keras warns if told to as well
            "validation_data": tf.data.Dataset.from_tensor_slices(val).batch(val_rows).cache()
            .with_options(options)}
