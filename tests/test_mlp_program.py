"""trainer.fit_path=shared (abalone/mlp_program.py) trains exactly what model.fit trains: the same
per-epoch metrics for the same config and seed, one compiled program for every width, and the
Keras model of the run's own architecture holding the result. Quick: in-process, no servers."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from abalone import data, mlp_program, run
from conftest import REPO

# The widths, batch norm, dropout, optimizers and batch sizes sweeps/search.yaml varies.
CONFIGS = {
    "mlp": [],
    "bn-dropout-gelu-adamw": ["model.units=256", "model.depth=4", "model.taper=1.0",
                              "model.activation=gelu", "model.batch_norm=true",
                              "model.dropout=0.15", "optimizer=adamw", "trainer.batch_size=128"],
    "narrow-adam-decay": ["model.units=64", "model.depth=4", "model.dropout=0.05",
                          "optimizer.weight_decay=0.001", "optimizer.lr=0.02",
                          "trainer.batch_size=512"],
}
EPOCHS = 4


def prepared(data_file, monkeypatch, *overrides: str):
    monkeypatch.setenv("ABALONE_DATA", str(data_file))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "tracking.enabled=false", "trainer.verbose=0", f"trainer.epochs={EPOCHS}",
            *overrides])
    return cfg, run.prepare(cfg)


def train(cfg, ready, path: str) -> dict[str, list[float]]:
    history = ready.keras.callbacks.History()
    train_rows = (ready.x["train"], ready.y["train"])
    val_rows = (ready.x["val"], ready.y["val"])
    t = cfg.trainer
    if path == "keras":
        ready.model.fit(**data.fit_arguments(train_rows, val_rows, t.batch_size, t.seed,
                                             "tensorflow"),
                        epochs=t.epochs, verbose=0, callbacks=[history])
    else:
        mlp_program.fit(ready.mlp_plan, train_rows, val_rows, t.batch_size, t.seed, t.epochs,
                        [history])
    return history.history


@pytest.mark.parametrize("name", CONFIGS)
def test_shared_program_matches_model_fit_epoch_by_epoch(name, data_file, monkeypatch):
    cfg, ready = prepared(data_file, monkeypatch, *CONFIGS[name])
    assert ready.mlp_plan is not None, "the default fit_path should take this model"
    shared = train(cfg, ready, "shared")
    keras_cfg, keras_ready = prepared(data_file, monkeypatch, *CONFIGS[name],
                                      "trainer.fit_path=keras")
    assert keras_ready.mlp_plan is None
    plain = train(keras_cfg, keras_ready, "keras")

    assert sorted(shared) == sorted(plain)  # loss, rmse, mae and their val_ twins
    for key in plain:
        np.testing.assert_allclose(shared[key], plain[key], rtol=2e-4, err_msg=key)
    # The Keras model holds what the program trained: its own prediction gives the last
    # epoch's val_rmse, and its optimizer the steps taken.
    predicted = ready.keras.ops.convert_to_numpy(ready.model(ready.x["val"], training=False))
    rmse = float(np.sqrt(np.mean((predicted - ready.y["val"]) ** 2)))
    assert rmse == pytest.approx(shared["val_rmse"][-1], rel=1e-5)
    ready.mlp_plan.trained_by.store_optimizer(ready.mlp_plan)  # as a run does before saving
    for ours, theirs in zip(ready.model.optimizer.variables,
                            keras_ready.model.optimizer.variables):
        # Moments are noisy averages of gradients: compare as vectors (a moment of another
        # variable, or none, would be off by its whole size).
        a, b = ours.numpy().astype(float), theirs.numpy().astype(float)
        assert a.shape == b.shape, ours.path
        assert np.linalg.norm(a - b) <= 0.02 * np.linalg.norm(b) + 1e-6, ours.path
    steps = -(-len(ready.y["train"]) // cfg.trainer.batch_size)
    assert int(ready.model.optimizer.iterations) == EPOCHS * steps
    assert int(keras_ready.model.optimizer.iterations) == EPOCHS * steps


def test_one_trace_serves_every_width_and_batch_size(data_file, monkeypatch):
    runs = [["model.units=64", "trainer.batch_size=512"],
            ["model.units=256", "model.batch_norm=true", "model.dropout=0.1"],
            ["model.units=32", "model.taper=1.0", "trainer.batch_size=128"]]
    programs = set()
    for overrides in runs:
        cfg, ready = prepared(data_file, monkeypatch, *overrides)
        history = train(cfg, ready, "shared")
        assert np.all(np.isfinite(history["val_rmse"]))
        programs.add(mlp_program.program_for(ready.mlp_plan))
    (program,) = programs
    assert program.train_epoch.experimental_get_tracing_count() == 1
    assert program.test.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("overrides, reason", [
    (["optimizer=sgd"], "optimizer SGD"),
    (["optimizer.schedule=exponential"], "learning-rate schedule exponential"),
    (["data=table", "data.target=label", "data.cache_dir=TMP"], "loss"),
    (["trainer.steps_per_execution=4"], None),
])
def test_models_it_cannot_train_exactly_go_to_model_fit(overrides, reason, data_file,
                                                        monkeypatch, tmp_path):
    table = tmp_path / "table.csv"
    rng = np.random.default_rng(0)
    rows = [f"{a:.3f},{b:.3f},{'yes' if a + b > 0 else 'no'}"
            for a, b in rng.normal(size=(300, 2))]
    table.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    if "data=table" in overrides:
        overrides.append(f"data.path={table}")
    cfg, ready = prepared(data_file, monkeypatch, *overrides)
    assert ready.mlp_plan is None
    if reason:  # else: the model is fine, the setting asks for Keras's own loop
        plan, why = mlp_program.plan(ready.model, ready.learning_rate,
                                     cfg.optimizer.weight_decay, ready.data.task)
        assert plan is None and why.startswith(reason)


def test_a_layer_option_the_program_leaves_out_sends_the_model_to_model_fit():
    import keras

    from abalone.config import Schedule
    from abalone.model import LearningRate

    rate = LearningRate(0.01, Schedule.constant, steps_per_epoch=1, epochs=1)

    def compiled(hidden):
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(1)(hidden(inputs)))
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                      metrics=[keras.metrics.RootMeanSquaredError(name="rmse"),
                               keras.metrics.MeanAbsoluteError(name="mae")])
        return model

    plan, why = mlp_program.plan(compiled(keras.layers.Dense(4, activation="relu")), rate, 0.0)
    assert plan is not None and why == ""
    plan, why = mlp_program.plan(compiled(keras.layers.Dense(
        4, kernel_regularizer=keras.regularizers.L2(0.01))), rate, 0.0)
    assert plan is None and "kernel_regularizer" in why

    class Scaled(keras.layers.Dense):  # a subclass may compute otherwise
        def call(self, x):
            return 2 * super().call(x)

    plan, why = mlp_program.plan(compiled(Scaled(4)), rate, 0.0)
    assert plan is None


def fitted(data_file, monkeypatch, *overrides: str):
    """A run's prepare, fit and evaluation (no tracking): its config, the prepared run, the
    History's epochs, the BestEpoch that chose the kept epoch, and the result's metrics."""
    cfg, ready = prepared(data_file, monkeypatch, *overrides)
    history = ready.keras.callbacks.History()
    untracked = run.tracking.TrackedRun(None)
    chooser, seconds = run.fit(cfg, ready, untracked, history, None)
    result, _ = run.evaluate_run(ready, history.history, chooser, seconds, untracked, None)
    return cfg, ready, history.history, chooser, result.metrics


# A constant, high learning rate in small batches: val_loss is lowest at epoch 5 of 6 on both
# paths (the seed is fixed), so the last epoch is worse than the best.
NOISY = ["trainer.epochs=6", "optimizer.schedule=constant", "optimizer.lr=0.05",
         "trainer.batch_size=64"]


@pytest.mark.parametrize("path", ["shared", "keras"])
def test_the_weights_kept_are_the_best_epochs_unless_keep_is_last(path, data_file, monkeypatch):
    cfg, ready, history, chooser, metrics = fitted(data_file, monkeypatch, *NOISY,
                                                   f"trainer.fit_path={path}")
    assert (ready.mlp_plan is not None) == (path == "shared")
    best = int(np.argmin(history["val_loss"]))
    assert best < len(history["val_loss"]) - 1, "the last epoch must be worse for this test"
    assert chooser.kept_epoch == best and metrics["kept_epoch"] == metrics["best_epoch"] == best + 1
    # The model's own prediction on the validation rows is the best epoch's, not the last's.
    assert metrics["best_val_rmse"] == pytest.approx(history["val_rmse"][best], rel=1e-5)
    assert metrics["best_val_rmse"] != pytest.approx(history["val_rmse"][-1], rel=1e-3)
    steps = -(-len(ready.y["train"]) // cfg.trainer.batch_size)
    assert int(ready.model.optimizer.iterations) == (best + 1) * steps  # the kept epoch's state
    if path == "shared":  # the saved optimizer gets the kept epoch's moments
        ready.mlp_plan.trained_by.store_optimizer(ready.mlp_plan)
        assert any(np.abs(v.numpy()).sum() > 0 for v in ready.model.optimizer.variables[2:])

    *_, last_history, last_chooser, last = fitted(data_file, monkeypatch, *NOISY,
                                                  f"trainer.fit_path={path}", "trainer.keep=last")
    assert last_chooser.kept_epoch == len(last_history["val_loss"]) - 1
    assert last["kept_epoch"] == 6 and last["best_epoch"] == best + 1
    assert last["best_val_rmse"] == pytest.approx(last_history["val_rmse"][-1], rel=1e-5)


def test_early_stopping_watches_the_value_the_kept_epoch_is_chosen_on(data_file, monkeypatch):
    *_, history, chooser, metrics = fitted(data_file, monkeypatch, *NOISY, "trainer.patience=2")
    losses = history["val_loss"]
    best = int(np.argmin(losses))
    # Stopped two epochs after the best, which it kept.
    assert len(losses) == best + 3 < 6 and chooser.kept_epoch == best
    assert metrics["best_val_rmse"] == pytest.approx(history["val_rmse"][best], rel=1e-5)


def optimizer_classes_defining(name: str) -> list:
    import keras

    return [c for c in type(keras.optimizers.Adam()).__mro__ if name in vars(c)]


def test_a_keras_lacking_what_the_program_reads_trains_with_model_fit_saying_why(
        data_file, monkeypatch, caplog):
    for owner in optimizer_classes_defining("from_config"):  # as if Keras had no from_config
        monkeypatch.delattr(owner, "from_config")
    monkeypatch.setattr(run, "_FIT_PATH_REFUSALS", set())
    caplog.set_level("INFO", logger="abalone")
    *_, history, chooser, metrics = fitted(data_file, monkeypatch, "trainer.epochs=2")
    assert "trainer.fit_path=shared cannot train this model (Keras " in caplog.text
    assert "lacks Adam.from_config): using model.fit" in caplog.text
    assert len(history["loss"]) == 2 and np.isfinite(metrics["test_rmse"])


def test_moments_kept_otherwise_than_the_program_writes_them_fail_loudly(data_file, monkeypatch):
    import keras

    cfg, ready = prepared(data_file, monkeypatch)
    train(cfg, ready, "shared")

    def update_step(self, gradient, variable, learning_rate):  # an Adam without moments
        variable.assign(variable - learning_rate * gradient)

    monkeypatch.setattr(keras.optimizers.Adam, "update_step", update_step)
    with pytest.raises(RuntimeError, match="does not keep Adam's moments as the shared program"):
        ready.mlp_plan.trained_by.store_optimizer(ready.mlp_plan)


def test_training_pipelines_run_no_autotuning_thread():
    # An iterator kept alive by a pruned trial's traceback is freed later by Python's cyclic
    # collector, and then waits for tf.data's autotuning thread, whose wake-up period has grown
    # towards 60 s: the sweep's stalls (issue #33). Neither training path starts that thread.
    import numpy as np

    rows = (({"x": np.zeros((8, 1), "float32")}), np.zeros(8, "float32"))
    fitted = data.fit_arguments(rows, rows, 4, 0, "tensorflow")
    for dataset in (fitted["x"], fitted["validation_data"]):
        assert dataset.options().autotune.enabled is False
