"""Training MLP regressors with one compiled TensorFlow program per activation pattern, kept
across the runs of a process (`trainer.fit_path: shared`): a sweep's trials stop paying a fresh
trace each.

Keras's `fit` traces its train and test functions for every new model (1-2 s here, more than the
arithmetic of a trial's epochs). The program instead holds the network's weights, batch-norm
statistics, Adam's moments and the dropout seeds in variables of any shape, and takes what a
trial varies as values: widths, batch size, batch norm and dropout on or off, the dropout rate,
the learning rate and its cosine decay, weight decay. A run loads its freshly built Keras model's
initial weights and seeds into it, trains, and copies the result back: the Keras model of the
run's own architecture is what is evaluated, logged and registered.

It does what `fit` does with the same Keras ops in the same order (Dense, activation, batch
norm, stateless dropout with the layer's seeds, MSE, Adam(W) with Keras's decoupled weight decay
and cosine schedule, tf.data's shuffle with the trainer's seed), so per-epoch metrics agree with
`model.fit` to float rounding (tests/test_mlp_program.py). Models it cannot run exactly (another
shape, layer options, task, loss or optimizer) are left to `fit` (`plan` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops


@dataclass
class Block:
    """One hidden layer of the Keras model: Dense, then optional BatchNormalization, Dropout."""

    dense: layers.Dense
    norm: layers.BatchNormalization | None
    dropout: layers.Dropout | None


@dataclass
class MlpPlan:
    """A Keras model read as features → hidden blocks → linear head, with what trains it."""

    model: keras.Model
    features: keras.Model  # the model up to its feature vector
    blocks: list[Block]
    head: layers.Dense
    optimizer: keras.optimizers.Optimizer
    # The program that trained the model; it holds Adam's moments until its next run.
    trained_by: MlpProgram | None = None


# What of Keras's internals the program reads (an optimizer's schedule and moments, compile's
# metric list); checked up front, so another Keras version falls back to model.fit, not fails.
_KERAS_INTERNALS = ((keras.optimizers.Adam, ("_learning_rate", "_get_variable_index")),)


def plan(model: keras.Model) -> tuple[MlpPlan | None, str]:
    """The model as a program can train it, or (None, why not)."""
    missing = [f"{cls.__name__}.{name}" for cls, names in _KERAS_INTERNALS for name in names
               if not hasattr(cls, name) and not hasattr(model.optimizer, name)]
    if not hasattr(model, "_compile_metrics") or missing:
        return None, f"Keras {keras.__version__} lacks {missing or '_compile_metrics'}"
    if keras.backend.backend() != "tensorflow":
        return None, f"the {keras.backend.backend()} backend"
    if model.loss != "mse":
        return None, f"loss {model.loss!r}"
    opt = model.optimizer
    if type(opt) not in (keras.optimizers.Adam, keras.optimizers.AdamW) or opt.amsgrad or any(
            (opt.clipnorm, opt.clipvalue, opt.global_clipnorm, opt.use_ema,
             opt.gradient_accumulation_steps)):
        return None, f"optimizer {type(opt).__name__} with these settings"
    schedule = opt._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) and not (
            isinstance(schedule, keras.optimizers.schedules.CosineDecay)
            and schedule.warmup_target is None):
        return None, f"learning-rate schedule {type(schedule).__name__}"
    compiled = getattr(model, "_compile_metrics", None)
    metrics = getattr(compiled, "_user_metrics", None) or []
    names = sorted(getattr(m, "name", m) for m in metrics)
    if names != ["mae", "rmse"] or getattr(compiled, "_user_weighted_metrics", None):
        return None, f"metrics {names}"
    if model.dtype_policy.name != "float32":
        return None, f"dtype policy {model.dtype_policy.name}"
    # Exactly these classes (a subclass may compute otherwise), without options the program
    # leaves out: regularizers, constraints, LoRA, quantization.
    chain = [layer for layer in model.layers
             if type(layer) in (layers.Dense, layers.BatchNormalization, layers.Dropout)]
    if not chain or type(chain[0]) is not layers.Dense:
        return None, "no Dense layers"
    for layer in chain:
        options = [name for name in ("kernel_regularizer", "bias_regularizer",
                                     "activity_regularizer", "kernel_constraint",
                                     "bias_constraint", "gamma_regularizer", "beta_regularizer",
                                     "gamma_constraint", "beta_constraint", "quantization_mode")
                   if getattr(layer, name, None) is not None]
        if options or getattr(layer, "lora_enabled", False) or not layer.trainable:
            return None, f"layer {layer.name}'s {options or 'LoRA or frozen weights'}"
    # The chain must end the model and feed itself: each layer's input is the previous output.
    if model.layers[-len(chain):] != chain or any(
            b.input is not a.output for a, b in zip(chain, chain[1:])) or \
            chain[-1].output is not model.outputs[0]:
        return None, "layers other than Dense, BatchNormalization, Dropout after the features"
    head = chain[-1]
    if type(head) is not layers.Dense or head.units != 1 or \
            head.activation is not keras.activations.linear:
        return None, "a head other than one linear unit"
    blocks: list[Block] = []
    for layer in chain[:-1]:
        if type(layer) is layers.Dense:
            if not layer.use_bias:
                return None, f"layer {layer.name} without a bias"
            blocks.append(Block(layer, None, None))
        elif not blocks:
            return None, f"{layer.name} before the first Dense layer"
        elif type(layer) is layers.BatchNormalization and blocks[-1].norm is None \
                and blocks[-1].dropout is None and layer.scale and layer.center \
                and not layer.renorm and layer.axis in (-1, [-1], 1, [1]):
            blocks[-1].norm = layer
        elif type(layer) is layers.Dropout and blocks[-1].dropout is None \
                and layer.noise_shape is None:
            blocks[-1].dropout = layer
        else:
            return None, f"layer {layer.name} where a program has none"
    features = keras.Model(model.inputs, chain[0].input)
    if features.trainable_weights:  # the program trains the chain alone
        return None, "trainable layers before the Dense layers"
    return MlpPlan(model, features, blocks, head, opt), ""


def _variable(shape=(), dtype=tf.float32):
    """A variable whose dimensions (rank `len(shape)`) take each run's sizes."""
    return tf.Variable(tf.zeros([0] * len(shape), dtype), shape=[None] * len(shape),
                       trainable=False)


class MlpProgram:
    """The compiled train and test functions for networks whose hidden blocks have these
    activations; its variables take each run's shapes. Batch norm and dropout are switches: a
    switch between activations would cost more to trace (0.4 s a branch) than a program."""

    def __init__(self, activations: tuple):
        self.activations = activations  # the layers' own functions
        depth = self.depth = len(activations)
        n = depth + 1  # Dense layers with the head
        self.kernels = [_variable((None, None)) for _ in range(n)]
        self.biases = [_variable((None,)) for _ in range(n)]
        self.gammas = [_variable((None,)) for _ in range(depth)]
        self.betas = [_variable((None,)) for _ in range(depth)]
        self.moving_means = [_variable((None,)) for _ in range(depth)]
        self.moving_variances = [_variable((None,)) for _ in range(depth)]
        self.trainable = [*self.kernels, *self.biases, *self.gammas, *self.betas]
        self.momentums = [_variable(v.shape) for v in self.trainable]
        self.velocities = [_variable(v.shape) for v in self.trainable]
        self.seeds = [_variable((None,), tf.int64) for _ in range(depth)]  # the dropout layers' states
        per_block = {"norm": tf.bool, "rate": tf.float32,
                     "momentum": tf.float32, "epsilon": tf.float32}
        self.block_settings = {k: [_variable((), dtype) for _ in range(depth)]
                               for k, dtype in per_block.items()}
        self.settings = {k: _variable() for k in (
            "lr", "alpha", "decay_steps", "cosine", "weight_decay", "beta_1", "beta_2",
            "epsilon")}
        self.iterations = tf.Variable(0, dtype=tf.int64)
        spec = tf.TensorSpec([None, None], tf.float32)
        self.train_epoch = tf.function(self._train_epoch, input_signature=[
            spec, spec, tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)])
        self.test = tf.function(self._test, input_signature=[spec, spec])

    # -- a run's weights in and out -----------------------------------------------------------

    def load(self, p: MlpPlan) -> None:
        dense = [b.dense for b in p.blocks] + [p.head]
        for var, layer in zip(self.kernels, dense):
            var.assign(layer.kernel.value)
        for var, layer in zip(self.biases, dense):
            var.assign(layer.bias.value)
        s = self.block_settings
        for i, block in enumerate(p.blocks):
            norm, drop = block.norm, block.dropout
            self.gammas[i].assign(norm.gamma.value if norm else tf.zeros([0]))
            self.betas[i].assign(norm.beta.value if norm else tf.zeros([0]))
            self.moving_means[i].assign(norm.moving_mean.value if norm else tf.zeros([0]))
            self.moving_variances[i].assign(norm.moving_variance.value if norm
                                            else tf.zeros([0]))
            s["norm"][i].assign(norm is not None)
            s["momentum"][i].assign(norm.momentum if norm else 0.0)
            s["epsilon"][i].assign(norm.epsilon if norm else 0.0)
            s["rate"][i].assign(drop.rate if drop else 0.0)
            self.seeds[i].assign(drop.seed_generator.state.value if drop
                                 else tf.zeros([2], tf.int64))
        for trained, moment, velocity in zip(self.trainable, self.momentums, self.velocities):
            moment.assign(tf.zeros_like(trained))
            velocity.assign(tf.zeros_like(trained))
        opt, schedule = p.optimizer, p.optimizer._learning_rate
        cosine = isinstance(schedule, keras.optimizers.schedules.CosineDecay)
        values = {"lr": schedule.initial_learning_rate if cosine else float(schedule.numpy()),
                  "alpha": schedule.alpha if cosine else 1.0,
                  "decay_steps": schedule.decay_steps if cosine else 1.0,
                  "cosine": float(cosine), "weight_decay": opt.weight_decay or 0.0,
                  "beta_1": opt.beta_1, "beta_2": opt.beta_2, "epsilon": opt.epsilon}
        for key, value in values.items():
            self.settings[key].assign(float(value))
        self.iterations.assign(int(opt.iterations.numpy()))

    def pairs(self, p: MlpPlan) -> list[tuple]:
        """(the Keras model's variable, the program's) for every variable the model has."""
        dense = [b.dense for b in p.blocks] + [p.head]
        found = [(layer.kernel, var) for layer, var in zip(dense, self.kernels)]
        found += [(layer.bias, var) for layer, var in zip(dense, self.biases)]
        for i, block in enumerate(p.blocks):
            if block.norm:
                found += [(block.norm.gamma, self.gammas[i]), (block.norm.beta, self.betas[i]),
                          (block.norm.moving_mean, self.moving_means[i]),
                          (block.norm.moving_variance, self.moving_variances[i])]
            if block.dropout:
                found.append((block.dropout.seed_generator.state, self.seeds[i]))
        return found

    def store(self, p: MlpPlan) -> None:
        """The trained weights, statistics and seed states back into the Keras model."""
        for keras_var, var in self.pairs(p):
            keras_var.assign(var)
        p.optimizer.iterations.assign(self.iterations)
        p.trained_by = self

    def store_optimizer(self, p: MlpPlan) -> None:
        """Adam's moments into the model's optimizer, so that a saved model resumes training
        where the run ended; only for models that are saved (building the optimizer costs a
        trial ~0.05 s)."""
        opt = p.optimizer
        if not opt.built:
            opt.build(p.model.trainable_variables)
        moments = dict(zip(map(id, self.trainable), zip(self.momentums, self.velocities)))
        for keras_var, var in self.pairs(p) if hasattr(opt, "_momentums") else ():
            if id(var) in moments and keras_var.trainable:
                index = opt._get_variable_index(keras_var)
                opt._momentums[index].assign(moments[id(var)][0])
                opt._velocities[index].assign(moments[id(var)][1])

    # -- the compiled functions -----------------------------------------------------------------

    def _forward(self, x, training: bool):
        s = self.block_settings
        for i in range(self.depth):
            x = ops.add(ops.matmul(x, self.kernels[i]), self.biases[i])
            x = self.activations[i](x)
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
        for var, grad, m, v in zip(self.trainable, grads, self.momentums, self.velocities):
            grad = tf.zeros_like(var) if grad is None else grad
            var.assign_sub(var * s["weight_decay"] * lr)
            m.assign_add((grad - m) * (1 - s["beta_1"]))
            v.assign_add((ops.square(grad) - v) * (1 - s["beta_2"]))
            var.assign_sub((m * alpha) / (ops.sqrt(v) + s["epsilon"]))
        self.iterations.assign_add(1)
        return loss, predicted

    def _train_epoch(self, x, y, order, batch_size):
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


_PROGRAMS: dict[tuple, MlpProgram] = {}


def fit(p: MlpPlan, train: tuple[dict, np.ndarray], val: tuple[dict, np.ndarray],
        batch_size: int, seed: int, epochs: int, callbacks: list) -> None:
    """`model.fit` of the plan's model on the program of its activations, with the callbacks."""
    key = tuple(b.dense.activation for b in p.blocks)
    program = _PROGRAMS.get(key)
    if program is None:
        program = _PROGRAMS[key] = MlpProgram(key)
    x_train = tf.convert_to_tensor(ops.convert_to_numpy(p.features(train[0])))
    x_val = tf.convert_to_tensor(ops.convert_to_numpy(p.features(val[0])))
    y_train, y_val = tf.constant(train[1], tf.float32), tf.constant(val[1], tf.float32)
    # The order fit's tf.data pipeline (abalone.data.fit_arguments) draws, epoch by epoch: Keras
    # iterates the pipeline twice per epoch (an iterator it opens and does not read), so epoch k
    # gets the pipeline's permutation 2k.
    rows = len(train[1])
    orders = iter(tf.data.Dataset.range(rows).shuffle(rows, seed=seed,
                                                      reshuffle_each_iteration=True)
                  .batch(rows).repeat())
    keras_model = p.model
    callback_list = keras.callbacks.CallbackList(callbacks, model=keras_model)
    program.load(p)
    keras_model.stop_training = False
    restores = any(getattr(c, "restore_best_weights", False) for c in callbacks)
    callback_list.on_train_begin()
    logs: dict = {}
    try:  # whatever stops training (a pruner, Ctrl-C), the model holds what was trained
        for epoch in range(epochs):
            callback_list.on_epoch_begin(epoch)
            if epoch:
                next(orders)
            order = tf.cast(next(orders), tf.int32)
            loss, rmse, mae = program.train_epoch(x_train, y_train, order,
                                                  tf.constant(batch_size, tf.int32))
            val_loss, val_rmse, val_mae = program.test(x_val, y_val)
            logs = {"loss": float(loss), "mae": float(mae), "rmse": float(rmse),
                    "val_loss": float(val_loss), "val_mae": float(val_mae),
                    "val_rmse": float(val_rmse)}
            if restores:
                program.store(p)  # early stopping keeps the best epoch's weights from the model
            else:  # the logger reads the learning rate's step
                p.optimizer.iterations.assign(program.iterations)
            callback_list.on_epoch_end(epoch, logs)
            if keras_model.stop_training:
                break
    finally:
        program.store(p)
    callback_list.on_train_end(logs)
