"""The real conf/ composes, rejects bad keys and values by name, and every model/optimizer builds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from abalone.config import ConfigError, check_ranges
from conftest import REPO

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))


MEASUREMENTS = ["Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
                "Viscera_weight", "Shell_weight"]


def abalone_table(mean: float = 0.5, variance: float = 0.1):
    """data=abalone's model inputs: seven measurements and Sex as its index in M, F, I."""
    from abalone.model import TableInputs
    from abalone.serving import input_name

    return TableInputs([input_name(c) for c in MEASUREMENTS], np.full(7, mean),
                       np.full(7, variance), {input_name("Sex"): 3})


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_are_the_documented_ones():
    cfg = compose_config()
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
    assert cfg.tracking.experiment == "abalone-tensorflow-experiment"
    # null: the data's own name; data=abalone's is the AWS sample's
    assert cfg.tracking.registered_model is None
    assert cfg.data.model_name == "abalone-tensorflow-model"
    assert cfg.tracking.register is True
    assert (cfg.model.units, cfg.model.depth, cfg.model.batch_norm) == (128, 3, False)  # mlp
    assert (cfg.trainer.batch_size, cfg.optimizer.schedule.value) == (256, "cosine")
    baseline = compose_config("model=baseline").model
    assert (baseline.units, baseline.depth, baseline.taper) == (64, 3, 0.5)  # 64-32-16
    assert baseline.dropout == 0.2 and baseline.batch_norm
    assert {"baseline", "wide", "deep", "mlp"} <= set(MODELS)
    assert {"adam", "adamw", "sgd"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("override, key", [
    ("trainer.epoch=3", "trainer.epoch"),
    ("model.unitz=3", "model.unitz"),
    ("trainer.epochs=many", "trainer.epochs"),
    ("model.batch_norm=maybe", "model.batch_norm"),
    ("optimizer.schedule=linear", "optimizer.schedule"),
    ("optimizer.name=rmsprop", "optimizer.name"),
    ("model=huge", "model"),
])
def test_unknown_keys_and_wrong_types_fail_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(override)
    text = str(info.value) + str(info.value.__cause__)
    assert key.split(".")[-1] in text


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.units=0", "model.units"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("trainer.verbose=3", "trainer.verbose"),
    ("tracking.outage_grace=-1", "tracking.outage_grace"),
])
def test_out_of_range_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key {key} must be"):
        check_ranges(compose_config(override))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_every_model_and_optimizer_builds_and_trains_a_step(model_name, optimizer_name):
    import keras

    from abalone.model import hidden_widths

    cfg = compose_config(f"model={model_name}", f"optimizer={optimizer_name}")
    table = abalone_table()
    model = instantiate(cfg.model, _partial_=True)(table=table)  # a dataclass, kept as one
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    m = cfg.model
    assert [d.units for d in dense] == hidden_widths(m.units, m.depth, m.taper) + [1]
    model.compile(optimizer=instantiate(cfg.optimizer, steps_per_epoch=4, epochs=2), loss="mse")
    rng = np.random.default_rng(0)
    inputs = {name: rng.integers(0, 3, (16, 1)).astype("int32") for name in table.categorical}
    inputs.update({c: rng.random((16, 1), dtype="float32") for c in table.numeric})
    loss = model.train_on_batch(inputs, rng.random((16, 1), dtype="float32"))
    assert np.isfinite(loss)


def test_baseline_is_the_sample_network():
    from hydra.utils import instantiate as build

    cfg = compose_config("model=baseline")
    model = build(cfg.model, _partial_=True)(table=abalone_table(0.0, 1.0))
    kinds = [type(layer).__name__ for layer in model.layers
             if type(layer).__name__ in ("Dense", "BatchNormalization", "Dropout")]
    assert kinds == ["Dense", "BatchNormalization", "Dropout"] * 3 + ["Dense"]
    assert [layer.units for layer in model.layers if hasattr(layer, "units")] == [64, 32, 16, 1]


def test_schedules_change_the_learning_rate():
    import keras

    from abalone.callbacks import current_learning_rate

    for name in ("adamw", "sgd"):  # cosine and exponential
        cfg = compose_config(f"optimizer={name}")
        optimizer = instantiate(cfg.optimizer, steps_per_epoch=10, epochs=5)
        first = current_learning_rate(optimizer)
        optimizer.iterations.assign(40)
        assert current_learning_rate(optimizer) < first == pytest.approx(cfg.optimizer.lr)
        assert isinstance(optimizer, keras.optimizers.Optimizer)


@pytest.mark.slow
def test_model_code_runs_under_the_jax_backend(tmp_path):
    """The same builders train under KERAS_BACKEND=jax (a subprocess: the backend is per process)."""
    script = (
        "import keras, numpy as np\n"
        "assert keras.backend.backend() == 'jax'\n"
        "from abalone.model import TableInputs, build_regressor, build_optimizer\n"
        "table = TableInputs([f'c_{i}' for i in range(7)], np.zeros(7), np.ones(7), {'c_Sex': 3})\n"
        "m = build_regressor(32, 2, 0.5, 'relu', 0.1, True, table=table)\n"
        "m.compile(build_optimizer('adam', 1e-3, 0.0, 0.0, 'cosine', 0.9, 0.0,"
        " steps_per_epoch=2, epochs=2), loss='mse')\n"
        "x = {'c_Sex': np.array([[0], [1], [2], [1]], 'int32')}\n"
        "x.update({c: np.ones((4, 1), 'float32') for c in table.numeric})\n"
        "h = m.fit(x, np.ones((4, 1), 'float32'), epochs=2, verbose=0)\n"
        "assert np.isfinite(h.history['loss']).all()\n"
        "print('jax ok')\n")
    import os

    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "jax ok" in done.stdout
