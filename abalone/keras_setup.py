"""Keras's set-up for a run: its import (with its backend's devices), quietly, and the seeds,
without clearing TensorFlow's caches of compiled functions the shared program keeps."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def _native_stderr_captured():
    """Hold back what native code writes to stderr (TensorFlow's absl lines, which ignore
    TF_CPP_MIN_LOG_LEVEL before absl is initialised); replay it if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_keras():
    """Import Keras (and its backend) and initialise the backend's devices, quietly."""
    with _native_stderr_captured():
        import keras

        keras.ops.convert_to_numpy(keras.ops.zeros(1))
    return keras


def seed_randomness(seed: int, keras) -> None:
    """`keras.utils.set_random_seed`, except that TensorFlow's global seed is left alone when it
    already has this value: setting it clears TensorFlow's caches of instantiated functions,
    which costs the next call of every compiled function ~0.7 s (a sweep's trials keep theirs,
    abalone/mlp_program.py). Keras draws its initializers' seeds from Python's `random`."""
    if keras.backend.backend() != "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    import random

    import numpy as np
    import tensorflow as tf
    from tensorflow.python.eager import context

    random.seed(seed)
    np.random.seed(seed)
    if context.global_seed() != seed:
        tf.random.set_seed(seed)
