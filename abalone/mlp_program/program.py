"""The compiled train and test functions of the shared program, and its variables: every hidden
block's weights, batch-norm statistics, Adam's moments and dropout seed state, of any shape.

A program has a capacity of blocks, each with its activation; a network of fewer blocks leaves
the first ones switched off (`active`): such a block is the identity on the features (its kernel
the identity matrix, its bias zero, its activation's output not taken, its learning rate zero),
so one program serves every depth up to its capacity at the cost of a product of the feature
vector with an identity matrix per switched-off block. Batch norm and dropout are switches too.
What a trial varies is a value: widths, depth, batch size, the dropout rate, the learning rate
and its cosine decay, weight decay.

It does what `fit` does with the same Keras ops in the same order (Dense, activation, batch
norm, stateless dropout with the layer's seeds, MSE, Keras's decoupled weight decay then the Adam
step, the cosine schedule), so per-epoch metrics agree with `model.fit` to float rounding
(tests/test_mlp_program.py; pyproject.toml bounds Keras and TensorFlow to the versions it passed
on, as these copy Keras's behaviour).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from abalone.mlp_program.plan import MlpPlan


def _variable(rank: int, dtype=tf.float32):
    """A variable whose `rank` dimensions take each run's sizes."""
    return tf.Variable(tf.zeros([0] * rank, dtype), shape=[None] * rank, trainable=False)


def moment_slots(optimizer, trainable: list) -> list[tuple[int, int]]:
    """For each of `trainable`, the indices in `optimizer.variables` of Adam's first and second
    moments, found through Keras's public API: a copy of the optimizer (`from_config`) built
    for stand-ins of the same shapes takes one step (`apply`) from zero state with gradient
    i + 1 everywhere for variable i, which puts (1 - beta_1)(i + 1) in its first moment and
    (1 - beta_2)(i + 1)^2 in its second. Raises if the optimizer keeps them otherwise."""
    probe = type(optimizer).from_config(optimizer.get_config())
    stand_ins = [keras.Variable(ops.zeros(v.shape, v.dtype)) for v in trainable]
    probe.build(stand_ins)
    probe.apply([ops.full(v.shape, float(i + 1)) for i, v in enumerate(trainable)], stand_ins)
    after = [ops.convert_to_numpy(v.value) for v in probe.variables]
    slots = []
    for i, var in enumerate(trainable):
        found = [[j for j, value in enumerate(after) if value.shape == tuple(var.shape)
                  and np.allclose(value, expected, rtol=1e-5, atol=0)]
                 for expected in ((1 - optimizer.beta_1) * (i + 1),
                                  (1 - optimizer.beta_2) * (i + 1) ** 2)]
        if [len(f) for f in found] != [1, 1] or len(after) != len(optimizer.variables):
            raise RuntimeError(
                f"Keras {keras.__version__}'s {type(optimizer).__name__} does not keep Adam's "
                f"moments as the shared program writes them (variable {var.path}): train with "
                "trainer.fit_path=keras")
        slots.append((found[0][0], found[1][0]))
    return slots


class MlpProgram:
    """The compiled functions for networks of up to `len(activations)` hidden blocks with these
    activations; its variables take each run's shapes."""

    def __init__(self, activations: tuple):
        self.activations = activations  # the layers' own functions
        n = self.capacity = len(activations)
        self.kernels = [_variable(2) for _ in range(n + 1)]  # the head's last
        self.biases = [_variable(1) for _ in range(n + 1)]
        self.gammas, self.betas, self.moving_means, self.moving_variances = (
            [_variable(1) for _ in range(n)] for _ in range(4))
        self.seeds = [_variable(1, tf.int64) for _ in range(n)]  # the dropout layers' states
        # Trained variables by block, the head's last: a block switched off is not updated.
        self.groups = [[self.kernels[i], self.biases[i], self.gammas[i], self.betas[i]]
                       for i in range(n)] + [[self.kernels[n], self.biases[n]]]
        self.trainable = [var for group in self.groups for var in group]
        self._position = {id(var): j for j, var in enumerate(self.trainable)}
        self.momentums = [_variable(len(v.shape)) for v in self.trainable]
        self.velocities = [_variable(len(v.shape)) for v in self.trainable]
        self.iterations = tf.Variable(0, dtype=tf.int64)
        per_block = {"active": tf.bool, "train": tf.float32, "norm": tf.bool,
                     "rate": tf.float32, "momentum": tf.float32, "epsilon": tf.float32}
        self.block_settings = {k: [_variable(0, dtype) for _ in range(n)]
                               for k, dtype in per_block.items()}
        self.settings = {k: _variable(0) for k in (
            "lr", "alpha", "decay_steps", "cosine", "weight_decay", "beta_1", "beta_2",
            "epsilon")}
        # Everything a run's result is, and its snapshot: the weights of the epoch the run
        # keeps, copied inside the program when that epoch is over (`train_epoch`'s `snapshot`).
        self.state = [*self.trainable, *self.moving_means, *self.moving_variances,
                      *self.momentums, *self.velocities, *self.seeds, self.iterations]
        self.kept = [tf.Variable(0, dtype=tf.int64) if v is self.iterations
                     else _variable(len(v.shape), v.dtype) for v in self.state]
        self._kept_of = dict(zip(map(id, self.state), self.kept))
        spec = tf.TensorSpec([None, None], tf.float32)
        self.train_epoch = tf.function(self._train_epoch, input_signature=[
            spec, spec, tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.bool)])
        self.test = tf.function(self._test, input_signature=[spec, spec])

    # -- a run's weights in and out -----------------------------------------------------------

    def first_block(self, p: MlpPlan) -> int:
        """The program's block that runs the plan's first: the ones before are switched off."""
        return self.capacity - len(p.blocks)

    def load(self, p: MlpPlan) -> None:
        empty = tf.zeros([0])
        features = int(p.blocks[0].dense.kernel.shape[0])
        s, first = self.block_settings, self.first_block(p)
        for i in range(self.capacity):
            block = p.blocks[i - first] if i >= first else None
            norm, drop = (block.norm, block.dropout) if block else (None, None)
            self.kernels[i].assign(block.dense.kernel.value if block else tf.eye(features))
            self.biases[i].assign(block.dense.bias.value if block else tf.zeros([features]))
            for var, name in ((self.gammas, "gamma"), (self.betas, "beta"),
                              (self.moving_means, "moving_mean"),
                              (self.moving_variances, "moving_variance")):
                var[i].assign(getattr(norm, name).value if norm else empty)
            s["active"][i].assign(block is not None)
            s["train"][i].assign(float(block is not None))
            s["norm"][i].assign(norm is not None)
            s["momentum"][i].assign(norm.momentum if norm else 0.0)
            s["epsilon"][i].assign(norm.epsilon if norm else 0.0)
            s["rate"][i].assign(drop.rate if drop else 0.0)
            self.seeds[i].assign(drop.seed_generator.state.value if drop
                                 else tf.zeros([2], tf.int64))
        self.kernels[-1].assign(p.head.kernel.value)
        self.biases[-1].assign(p.head.bias.value)
        for trained, moment, velocity in zip(self.trainable, self.momentums, self.velocities):
            moment.assign(tf.zeros_like(trained))
            velocity.assign(tf.zeros_like(trained))
        rate, opt = p.rate, p.optimizer
        cosine = rate.schedule.value == "cosine"
        values = {"lr": rate.initial, "alpha": rate.final_fraction if cosine else 1.0,
                  "decay_steps": rate.decay_steps if cosine else 1.0, "cosine": float(cosine),
                  "weight_decay": p.weight_decay, "beta_1": opt.beta_1, "beta_2": opt.beta_2,
                  "epsilon": opt.epsilon}
        for key, value in values.items():
            self.settings[key].assign(float(value))
        self.iterations.assign(int(opt.iterations.numpy()))

    def pairs(self, p: MlpPlan) -> list[tuple]:
        """(the Keras model's variable, the program's) for every variable the model has."""
        first = self.first_block(p)
        dense = [b.dense for b in p.blocks] + [p.head]
        index = [*range(first, self.capacity), self.capacity]
        found = [(layer.kernel, self.kernels[i]) for layer, i in zip(dense, index)]
        found += [(layer.bias, self.biases[i]) for layer, i in zip(dense, index)]
        for i, block in enumerate(p.blocks, start=first):
            if block.norm:
                found += [(block.norm.gamma, self.gammas[i]), (block.norm.beta, self.betas[i]),
                          (block.norm.moving_mean, self.moving_means[i]),
                          (block.norm.moving_variance, self.moving_variances[i])]
            if block.dropout:
                found.append((block.dropout.seed_generator.state, self.seeds[i]))
        return found

    def _source(self, var, from_snapshot: bool):
        return self._kept_of[id(var)] if from_snapshot else var

    def store(self, p: MlpPlan, from_snapshot: bool = False) -> None:
        """The trained weights, statistics and seed states back into the Keras model: those of
        the last epoch, or `from_snapshot` those of the epoch the snapshot holds."""
        for keras_var, var in self.pairs(p):
            keras_var.assign(self._source(var, from_snapshot))
        p.optimizer.iterations.assign(self._source(self.iterations, from_snapshot))
        p.trained_by, p.from_snapshot = self, from_snapshot

    def store_optimizer(self, p: MlpPlan) -> None:
        """Adam's moments into the model's optimizer, so that a saved model resumes training
        where the run's kept epoch ended; only for models that are saved (building the optimizer
        costs a trial ~0.05 s)."""
        opt, trainable = p.optimizer, p.model.trainable_variables
        if not opt.built:
            opt.build(trainable)
        ours = {id(keras_var): var for keras_var, var in self.pairs(p)}
        for var, (m, v) in zip(trainable, moment_slots(opt, trainable)):
            j = self._position[id(ours[id(var)])]
            opt.variables[m].assign(self._source(self.momentums[j], p.from_snapshot))
            opt.variables[v].assign(self._source(self.velocities[j], p.from_snapshot))

    # -- the compiled functions -----------------------------------------------------------------

    def _forward(self, x, training: bool):
        s = self.block_settings
        for i in range(self.capacity):
            z = ops.add(ops.matmul(x, self.kernels[i]), self.biases[i])
            x = tf.where(s["active"][i], self.activations[i](z), z)  # switched off: identity
            # Read outside the branch: a gradient through a variable captured in a cond
            # needs its static shape, which these variables do not have.
            gamma, beta = self.gammas[i].read_value(), self.betas[i].read_value()
            x = tf.cond(s["norm"][i].read_value(),
                        lambda i=i, x=x, g=gamma, b=beta: self._normalise(i, x, g, b, training),
                        lambda x=x: x)
            if training:
                x = tf.cond(s["rate"][i] > 0, lambda i=i, x=x: self._dropout(i, x),
                            lambda x=x: x)
        return ops.add(ops.matmul(x, self.kernels[-1]), self.biases[-1])

    def _normalise(self, i: int, x, gamma, beta, training: bool):
        momentum, epsilon = self.block_settings["momentum"][i], \
            self.block_settings["epsilon"][i]
        if training:
            mean, variance = ops.moments(x, axes=[0])
            self.moving_means[i].assign(self.moving_means[i] * momentum
                                        + mean * (1.0 - momentum))
            self.moving_variances[i].assign(self.moving_variances[i] * momentum
                                            + variance * (1.0 - momentum))
        else:
            mean, variance = self.moving_means[i], self.moving_variances[i]
        return ops.batch_normalization(x, mean, variance, axis=-1, offset=beta, scale=gamma,
                                       epsilon=epsilon)

    def _dropout(self, i: int, x):
        # As keras.layers.Dropout under TensorFlow: the state as a seed, then one step on.
        seed = tf.cast(tf.math.floormod(self.seeds[i], tf.int32.max - 1), tf.int32)
        self.seeds[i].assign_add(tf.constant([0, 1], tf.int64))
        return tf.nn.experimental.stateless_dropout(x, rate=self.block_settings["rate"][i],
                                                    seed=seed)

    def _learning_rate(self):
        s = self.settings
        step = tf.minimum(tf.cast(self.iterations, tf.float32), s["decay_steps"])
        cosine = 0.5 * (1.0 + ops.cos(np.pi * (step / s["decay_steps"])))
        decayed = (1 - s["alpha"]) * cosine + s["alpha"]
        return tf.where(s["cosine"] > 0, s["lr"] * decayed, s["lr"])

    def _step(self, x, y):
        s = self.settings
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.trainable)
            predicted = self._forward(x, training=True)
            loss = ops.mean(ops.mean(ops.square(y - predicted), axis=-1))
        grads = tape.gradient(loss, self.trainable)
        lr = self._learning_rate()
        local_step = tf.cast(self.iterations + 1, tf.float32)
        alpha = (lr * ops.sqrt(1 - ops.power(s["beta_2"], local_step))
                 / (1 - ops.power(s["beta_1"], local_step)))
        # A block switched off trains at rate zero: it stays the identity.
        trains = [*self.block_settings["train"], tf.constant(1.0)]
        for group, train in zip(self.groups, trains):
            group_lr, group_alpha = lr * train, alpha * train  # exact for 1.0
            for var in group:
                j = self._position[id(var)]
                grad, m, v = grads[j], self.momentums[j], self.velocities[j]
                grad = tf.zeros_like(var) if grad is None else grad
                var.assign_sub(var * s["weight_decay"] * group_lr)
                m.assign_add((grad - m) * (1 - s["beta_1"]))
                v.assign_add((ops.square(grad) - v) * (1 - s["beta_2"]))
                var.assign_sub((m * group_alpha) / (ops.sqrt(v) + s["epsilon"]))
        self.iterations.assign_add(1)
        return loss, predicted

    def _snapshot(self):
        for var, kept in zip(self.state, self.kept):
            kept.assign(var)
        return tf.constant(True)

    def _train_epoch(self, x, y, order, batch_size, snapshot):
        """One epoch; with `snapshot`, first a copy of the state as the previous epoch left it
        (the epoch the run keeps so far)."""
        tf.cond(snapshot, self._snapshot, lambda: tf.constant(False))
        rows = tf.shape(order)[0]
        steps = (rows + batch_size - 1) // batch_size
        loss_sum, squares, absolutes = tf.zeros([]), tf.zeros([]), tf.zeros([])
        for step in tf.range(steps):
            index = order[step * batch_size:tf.minimum((step + 1) * batch_size, rows)]
            y_batch = tf.gather(y, index)
            loss, predicted = self._step(tf.gather(x, index), y_batch)
            count = tf.cast(tf.shape(index)[0], tf.float32)
            loss_sum += loss * count
            squares += ops.sum(ops.square(predicted - y_batch))
            absolutes += ops.sum(ops.abs(y_batch - predicted))
        count = tf.cast(tf.size(y), tf.float32)
        return loss_sum / tf.cast(rows, tf.float32), ops.sqrt(squares / count), absolutes / count

    def _test(self, x, y):
        predicted = self._forward(x, training=False)
        error = y - predicted
        return (ops.mean(ops.mean(ops.square(error), axis=-1)), ops.sqrt(ops.mean(
            ops.square(predicted - y))), ops.mean(ops.abs(error)))
