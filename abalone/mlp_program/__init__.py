"""Training MLP regressors on compiled TensorFlow programs kept across the runs of a process
(`trainer.fit_path: shared`): a sweep's trials stop paying a fresh trace each.

Keras's `fit` traces its train and test functions for every new model (1-2 s here, more than the
arithmetic of a trial's epochs). A program instead holds the network's weights, batch-norm
statistics, Adam's moments and the dropout seeds in variables of any shape, and takes what a
trial varies as values (`program`); one program per activation serves every depth up to its
capacity. A run loads its freshly built Keras model's initial weights and seeds into it, trains,
and copies the result back (the epoch the run keeps: `abalone.callbacks.BestEpoch`): the Keras
model of the run's own architecture is what is evaluated, logged and registered.

Models it cannot run exactly (another shape, layer options, task, loss or optimizer, or a Keras
without the public API it reads) are left to `fit`; `plan` says why.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from abalone.mlp_program.plan import Block, MlpPlan, plan
from abalone.mlp_program.program import MlpProgram

__all__ = ["Block", "MlpPlan", "MlpProgram", "fit", "plan", "program_for"]

# The fewest blocks a program has: depths 1-4 (sweeps/search.yaml's 2-4) share one program per
# activation; deeper networks take the next power of two.
MIN_CAPACITY = 4
_PROGRAMS: dict[tuple, MlpProgram] = {}


def program_for(p: MlpPlan) -> MlpProgram:
    """The process's program for the plan's network: one per activation for every depth up to
    its capacity, the blocks a network lacks switched off (a program costs 1.5-3 s to trace;
    a block switched off costs a step microseconds); a network whose blocks differ in
    activation gets a program of its own depth."""
    activations = tuple(b.dense.activation for b in p.blocks)
    if len(set(activations)) == 1:
        capacity = max(MIN_CAPACITY, 1 << (len(activations) - 1).bit_length())
        activations = activations[:1] * capacity
    program = _PROGRAMS.get(activations)
    if program is None:
        program = _PROGRAMS[activations] = MlpProgram(activations)
    return program


def fit(p: MlpPlan, train: tuple[dict, np.ndarray], val: tuple[dict, np.ndarray],
        batch_size: int, seed: int, epochs: int, callbacks: list, chooser=None) -> None:
    """`model.fit` of the plan's model on its program, with the callbacks; `chooser` (one of
    them, an `abalone.callbacks.BestEpoch`) has the program keep the epoch it chooses, in a
    snapshot inside the program."""
    program = program_for(p)
    x_train = tf.convert_to_tensor(ops.convert_to_numpy(p.features(train[0])))
    x_val = tf.convert_to_tensor(ops.convert_to_numpy(p.features(val[0])))
    y_train, y_val = tf.constant(train[1], tf.float32), tf.constant(val[1], tf.float32)
    # The order fit's tf.data pipeline (abalone.data.fit_arguments) draws, epoch by epoch: Keras
    # iterates the pipeline twice per epoch (an iterator it opens and does not read), so epoch k
    # gets the pipeline's permutation 2k.
    rows = len(train[1])
    # Without tf.data's autotuning thread, as in fit's pipeline (abalone.data.fit_arguments):
    # an iterator kept alive by a pruned trial's traceback waits for it when freed.
    options = tf.data.Options()
    options.autotune.enabled = False
    orders = iter(tf.data.Dataset.range(rows).shuffle(rows, seed=seed,
                                                      reshuffle_each_iteration=True)
                  .batch(rows).repeat().with_options(options))
    if chooser is not None:
        chooser.saves_weights = False  # the program keeps its own snapshot
    callback_list = keras.callbacks.CallbackList(callbacks, model=p.model)
    program.load(p)
    p.model.stop_training = False
    callback_list.on_train_begin()
    logs: dict = {}
    from_snapshot = False
    try:  # whatever stops training (a pruner, Ctrl-C), the model holds what was trained
        for epoch in range(epochs):
            callback_list.on_epoch_begin(epoch)
            if epoch:
                next(orders)
            # The state the previous epoch left is the one to keep so far: copy it first.
            snapshot = chooser is not None and chooser.keep_best and epoch > 0 \
                and chooser.best_epoch == epoch - 1
            loss, rmse, mae = program.train_epoch(x_train, y_train, tf.cast(next(orders),
                                                                            tf.int32),
                                                  tf.constant(batch_size, tf.int32),
                                                  tf.constant(snapshot))
            val_loss, val_rmse, val_mae = program.test(x_val, y_val)
            logs = {"loss": float(loss), "mae": float(mae), "rmse": float(rmse),
                    "val_loss": float(val_loss), "val_mae": float(val_mae),
                    "val_rmse": float(val_rmse)}
            callback_list.on_epoch_end(epoch, logs)
            if p.model.stop_training:
                break
        from_snapshot = chooser is not None and chooser.kept_epoch != chooser.last_epoch
    finally:
        program.store(p, from_snapshot)
    callback_list.on_train_end(logs)
