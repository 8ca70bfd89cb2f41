"""Reading a compiled Keras model as the shared program trains it (`plan`): features, hidden
blocks of Dense, BatchNormalization and Dropout, a linear head, Adam(W) on MSE; or why not.

Everything is read from the run's configuration (the learning rate and its schedule, the weight
decay, the task's loss and metrics: abalone/model.py builds them from it) or from Keras's public
API (layers' attributes, the optimizer's `beta_1`, `beta_2`, `epsilon`, `iterations`,
`variables`, `get_config`, `from_config`, `apply`); a Keras without one of them sends the model to `model.fit`,
naming what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from abalone.model import LearningRate
from abalone.serving import REGRESSION

# The optimizer's public API the program reads (get_config, from_config, apply and variables:
# to write Adam's moments back into the Keras optimizer of a model that is saved).
OPTIMIZER_API = ("beta_1", "beta_2", "epsilon", "iterations", "built", "build", "variables",
                 "apply", "get_config", "from_config")
LAYER_API = {layers.Dense: ("kernel", "bias", "units", "activation", "use_bias"),
             layers.BatchNormalization: ("gamma", "beta", "moving_mean", "moving_variance",
                                         "momentum", "epsilon", "center", "scale", "axis"),
             layers.Dropout: ("rate", "noise_shape", "seed_generator")}
# Layer options the program leaves out: a layer with any of them set trains with model.fit.
OPTIONS = ("kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint",
           "bias_constraint", "gamma_regularizer", "beta_regularizer", "gamma_constraint",
           "beta_constraint", "quantization_mode")


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
    rate: LearningRate  # from the configuration
    weight_decay: float  # from the configuration
    # The program that trained the model; it holds Adam's moments until its next run.
    trained_by: object = None
    from_snapshot: bool = False  # the kept epoch is the program's snapshot, not its last


def _lacks(obj, names) -> list[str]:
    return [f"{type(obj).__name__}.{name}" for name in names if not hasattr(obj, name)]


def _optimizer_refusal(opt, rate: LearningRate | None) -> str:
    if type(opt) not in (keras.optimizers.Adam, keras.optimizers.AdamW) or any(
            getattr(opt, name, True) for name in ("amsgrad", "clipnorm", "clipvalue",
                                                  "global_clipnorm", "use_ema",
                                                  "gradient_accumulation_steps")):
        return f"optimizer {type(opt).__name__} with these settings"
    if rate is None:
        return "an optimizer built by a builder of its own (the program reads the learning " \
               "rate from abalone.model.build_optimizer's settings)"
    if rate.schedule.value not in ("constant", "cosine"):
        return f"learning-rate schedule {rate.schedule.value}"
    return ""


def _chain(model: keras.Model) -> tuple[list | None, str]:
    """The Dense, BatchNormalization and Dropout layers that end the model, each of exactly
    those classes (a subclass may compute otherwise) and without options the program leaves
    out, each fed by the one before; or (None, why not)."""
    chain = [layer for layer in model.layers if type(layer) in LAYER_API]
    if not chain or type(chain[0]) is not layers.Dense:
        return None, "no Dense layers"
    for layer in chain:
        missing = _lacks(layer, LAYER_API[type(layer)])
        if missing:
            return None, f"Keras {keras.__version__} lacks {', '.join(missing)}"
        options = [name for name in OPTIONS if getattr(layer, name, None) is not None]
        if options or getattr(layer, "lora_enabled", False) or not layer.trainable:
            return None, f"layer {layer.name}'s {options or 'LoRA or frozen weights'}"
    if model.layers[-len(chain):] != chain or any(
            b.input is not a.output for a, b in zip(chain, chain[1:])) or \
            chain[-1].output is not model.outputs[0]:
        return None, "layers other than Dense, BatchNormalization, Dropout after the features"
    return chain, ""


def _blocks(chain: list) -> tuple[list[Block] | None, str]:
    blocks: list[Block] = []
    for layer in chain:
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
                and layer.noise_shape is None and hasattr(layer.seed_generator, "state"):
            blocks[-1].dropout = layer
        else:
            return None, f"layer {layer.name} where a program has none"
    return blocks, ""


def plan(model: keras.Model, rate: LearningRate | None, weight_decay: float,
         task: str = REGRESSION) -> tuple[MlpPlan | None, str]:
    """The model as a program can train it, or (None, why not). `rate` and `weight_decay` are
    the configuration's (None: an optimizer the configuration does not describe), `task` the
    data's (regression: MSE with rmse and mae, as abalone.model.compile_arguments compiles)."""
    opt = model.optimizer
    if keras.backend.backend() != "tensorflow":
        return None, f"the {keras.backend.backend()} backend"
    if task != REGRESSION or model.loss != "mse":
        return None, f"loss {model.loss!r}"
    why = _optimizer_refusal(opt, rate)
    if why:
        return None, why
    missing = _lacks(opt, OPTIMIZER_API)
    if missing:
        return None, f"Keras {keras.__version__} lacks {', '.join(missing)}"
    if model.dtype_policy.name != "float32":
        return None, f"dtype policy {model.dtype_policy.name}"
    chain, why = _chain(model)
    if chain is None:
        return None, why
    head = chain[-1]
    if type(head) is not layers.Dense or head.units != 1 or \
            head.activation is not keras.activations.linear:
        return None, "a head other than one linear unit"
    blocks, why = _blocks(chain[:-1])
    if blocks is None:
        return None, why
    features = keras.Model(model.inputs, chain[0].input)
    if features.trainable_weights:  # the program trains the chain alone
        return None, "trainable layers before the Dense layers"
    return MlpPlan(model, features, blocks, head, opt, rate, weight_decay), ""
