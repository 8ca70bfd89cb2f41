"""data=table with Keras: the task's head and metrics, the builder check, and (slow) the real CLI
on scikit-learn's tables, the abalone file as a table, and a model builder of the user's own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from abalone.config import ConfigError
from conftest import TINY, run_cli
from test_table import ABALONE_COLUMNS, frames



def inputs_for(task: str, n_classes: int | None):
    from abalone.model import TableInputs

    return TableInputs(["c_a", "c_b"], np.zeros(2), np.ones(2), {"c_k": 4}, ["c_a__missing"],
                       task, n_classes)


@pytest.mark.parametrize("task, n_classes, units, activation", [
    ("regression", None, 1, "linear"), ("classification", 2, 1, "sigmoid"),
    ("classification", 3, 3, "softmax")])
def test_the_head_fits_the_task(task, n_classes, units, activation):
    from abalone.model import build_mlp, check_built

    table = inputs_for(task, n_classes)
    model = build_mlp(8, 1, 1.0, "relu", 0.0, False, table=table)
    check_built(model, "abalone.model.build_mlp", table)
    head = model.layers[-1]
    assert head.units == units and head.activation.__name__ == activation
    assert {t.name for t in model.inputs} == {"c_a", "c_b", "c_k", "c_a__missing"}


def test_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    from abalone.model import MacroF1

    rng = np.random.default_rng(0)
    truth, output = rng.integers(0, 3, 200), rng.random((200, 3))
    metric = MacroF1(3)
    metric.update_state(truth[:120].reshape(-1, 1), output[:120])
    metric.update_state(truth[120:].reshape(-1, 1), output[120:])
    expected = f1_score(truth, output.argmax(axis=1), average="macro")
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_a_builder_breaking_the_contract_is_named_with_what_it_returned():
    import keras

    from abalone.model import check_built

    table = inputs_for("classification", 3)
    with pytest.raises(ConfigError, match=r"model builder my.build returned a builtins.str: "
                                          r"'oops'"):
        check_built("oops", "my.build", table)
    inputs = table.inputs()
    two = keras.Model(inputs, keras.layers.Dense(2)(table.features(inputs)))
    with pytest.raises(ConfigError, match=r"my.build returned a model with output shape\(s\) "
                                          r"\[\(None, 2\)\]; it must return .* 3 output"):
        check_built(two, "my.build", table)
    other = keras.Input(shape=(1,), name="height")
    stranger = keras.Model(other, keras.layers.Dense(3)(other))
    with pytest.raises(ConfigError, match=r"inputs \['height'\] the table has no column for"):
        check_built(stranger, "my.build", table)


# -- the real CLI ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    for name, frame in frames().items():
        frame.to_csv(root / f"{name}.csv", index=False)
        frame.to_parquet(root / f"{name}.parquet")
    return root


def only_run(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("abalone-tensorflow-experiment")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


@pytest.mark.slow
@pytest.mark.parametrize("name, metrics, plots", [
    ("wine.csv", {"test_log_loss", "test_accuracy", "test_f1"}, {"confusion_matrix.png"}),
    ("cancer.parquet", {"test_log_loss", "test_accuracy", "test_f1", "test_auc"},
     {"confusion_matrix.png", "roc_curve.png"}),
    ("diabetes.csv", {"test_rmse", "test_mae", "test_r2"},
     {"predicted_vs_actual.png", "residuals.png"}),
])
def test_a_table_run_is_tracked_registered_and_served_by_its_columns(
        tmp_path, table_dir, monkeypatch, name, metrics, plots):
    done = run_cli([*TINY, "data=table", f"data.path={table_dir / name}", "data.target=target"],
                   cwd=tmp_path, data=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data.task: " in done.stdout + done.stderr
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert metrics <= set(run.data.metrics)
    assert all(np.isfinite(run.data.metrics[k]) for k in metrics)
    per_epoch = {f"val_{k[5:]}" for k in metrics} - {"val_r2"}  # r2: held-out rows only
    assert per_epoch <= set(run.data.metrics)  # per epoch: a sweep's metric
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        f"plots/{p}" for p in {"learning_curves.png", *plots}}
    logged = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(logged) == {"training", "validation", "test"}
    assert all(d.source and d.digest and "target" in d.schema for d in logged.values())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    # A table's models register under its own name: the file's stem and the target.
    (registered,) = client.search_registered_models()
    assert registered.name == f"{name.split('.')[0]}-target"
    model = mlflow.pyfunc.load_model(f"models:/{registered.name}/1")
    assert [c.name for c in model.metadata.signature.inputs] == [
        c for c in frames()[name.split(".")[0]].columns if c != "target"]
    rows = frames()[name.split(".")[0]].drop(columns="target").head(6)
    predicted = model.predict(rows)
    if "test_rmse" in metrics:
        assert np.asarray(predicted).shape == (6,) and np.isfinite(predicted).all()
    else:
        classes = sorted(set(frames()[name.split(".")[0]]["target"]))
        assert set(predicted) <= set(classes)
        p = model.predict(rows, params={"probabilities": True})
        assert list(p.columns) == [str(c) for c in classes]
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        assert list(np.asarray(classes, dtype=object)[p.to_numpy().argmax(axis=1)]) == list(
            predicted)
    column = rows.columns[1]
    bad = rows.astype({column: "float64"})
    bad.iloc[2, 1] = np.nan  # data.missing=refuse
    with pytest.raises(mlflow.exceptions.MlflowException,
                       match=rf"1 of 6 rows .* row 2, column {column}: null/NaN"):
        model.predict(bad)
    # A value of the wrong type: MLflow's schema enforcement refuses it first, by column.
    bad = rows.astype(object)
    bad.iloc[2, 1] = "lots"
    with pytest.raises(mlflow.exceptions.MlflowException, match=rf"column {column}"):
        model.predict(bad)


@pytest.mark.slow
def test_the_abalone_file_as_a_table_gives_the_abalone_test_rmse(tmp_path, data_file):
    args = ["trainer.epochs=20", "trainer.patience=0", "tracking.register=false"]
    ours = run_cli(args, cwd=tmp_path, data=data_file)
    # data=abalone logs its rows with MLflow's dataset tracking too.
    _, run = only_run(tmp_path)
    counts = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]:
              __import__("json").loads(d.dataset.profile)["num_rows"]
              for d in run.inputs.dataset_inputs}
    assert counts == {"training": 2672, "validation": 669, "test": 836}
    as_table = run_cli([*args, "tracking.enabled=false", "data=table", f"data.path={data_file}", "data.format=csv",
                        "data.header=false", f"data.columns=[{','.join(ABALONE_COLUMNS)}]",
                        "data.target=Rings"], cwd=tmp_path, data=None)
    rmse = []
    for done in (ours, as_table):
        assert done.returncode == 0, done.stderr[-3000:]
        line = [x for x in (done.stdout + done.stderr).splitlines() if "done:" in x][-1]
        rmse.append(float(line.split("test rmse ")[1].split()[0]))
    assert rmse[1] == pytest.approx(rmse[0], abs=0.02)
    assert "data.task: regression (the target holds 28 distinct whole numbers" in (
        as_table.stdout + as_table.stderr)


BUILDER = '''
import keras


def build(width, *, table):
    """A user's model: one hidden layer of `width` on the table's ready features."""
    inputs = table.inputs()
    hidden = keras.layers.Dense(width, activation="relu")(table.features(inputs))
    return keras.Model(inputs, table.head(hidden))


def broken(width, *, table):
    return "a model, honestly"
'''


@pytest.mark.slow
def test_a_model_builder_of_the_users_own(tmp_path, table_dir):
    """As a new user would: a builder module and a config folder outside the package."""
    (tmp_path / "mymodels.py").write_text(textwrap.dedent(BUILDER))
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "tiny.yaml").write_text("_target_: mymodels.build\n"
                                                              "width: 16\n")
    (tmp_path / "my_conf" / "model" / "broken.yaml").write_text("_target_: mymodels.broken\n"
                                                                "width: 16\n")
    env = {"PYTHONPATH": f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    table = ["data=table", f"data.path={table_dir / 'wine.csv'}", "data.target=target"]
    done = run_cli(["--config-dir", "my_conf", *TINY, "model=tiny", "model.width=12", *table],
                   cwd=tmp_path, data=None, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(tmp_path)
    assert run.data.params["model.width"] == "12" and run.data.params["model"] == "tiny"
    assert np.isfinite(run.data.metrics["test_accuracy"])

    broken = run_cli(["--config-dir", "my_conf", *TINY, "model=broken", *table,
                      "tracking.experiment=broken"], cwd=tmp_path, data=None, env=env)
    assert broken.returncode == 1
    assert ("error: model builder mymodels.broken returned a builtins.str: 'a model, honestly'"
            in broken.stderr)
    assert client.get_experiment_by_name("broken") is None or not client.search_runs(
        [client.get_experiment_by_name("broken").experiment_id])

    # A sweep searches the builder's own key; the champion gate uses test_log_loss.
    sweep = run_cli(["--config-dir", "my_conf", "-m", "sweep=quick", "model=tiny",
                     "model.width=choice(4,32)", *table, "hydra.sweeper.metric=val_accuracy",
                     "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=2",
                     "trainer.epochs=2", "tracking.experiment=swept"], cwd=tmp_path, data=None,
                    env=env)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    experiment = client.get_experiment_by_name("swept").experiment_id
    trials = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2 and all(r.data.params["model.width"] in ("4", "32") for r in trials)
    assert "as champion: there was no champion" in sweep.stdout + sweep.stderr

    # The built-in options keep their schema: a misspelt key still fails while composing.
    typo = run_cli(["--config-dir", "my_conf", "model=mlp", "model.widht=3"], cwd=tmp_path,
                   data=None, env=env)
    assert typo.returncode == 1 and "widht" in typo.stderr


@pytest.mark.slow
def test_a_classifier_trains_under_the_jax_backend():
    """The table's inputs, heads and MacroF1 are Keras 3 only (a subprocess: one backend each)."""
    import os
    import subprocess
    import sys

    script = textwrap.dedent("""
        import keras, numpy as np
        assert keras.backend.backend() == "jax"
        from abalone.model import TableInputs, build_mlp, compile_arguments
        for n in (2, 3):
            table = TableInputs(["c_a"], np.zeros(1), np.ones(1), {"c_k": 3}, [],
                                "classification", n)
            m = build_mlp(8, 1, 1.0, "relu", 0.0, False, table=table)
            m.compile("adam", **compile_arguments(table))
            rng = np.random.default_rng(0)
            x = {"c_a": rng.random((32, 1), "float32"),
                 "c_k": rng.integers(0, 3, (32, 1)).astype("int32")}
            y = rng.integers(0, n, (32, 1)).astype("float32" if n == 2 else "int32")
            h = m.fit(x, y, epochs=2, verbose=0, validation_data=(x, y))
            assert all(np.isfinite(h.history["val_f1"])), h.history
        print("jax ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "jax ok" in done.stdout


def wine_with_regions(missing: bool) -> pd.DataFrame:
    """The wine table with a categorical column (alcohol band) and, if asked, missing values."""
    frame = frames()["wine"].copy()
    frame.insert(0, "region", pd.qcut(frame["alcohol"], 3, labels=["low", "mid", "high"])
                 .astype(str))
    if missing:
        frame.loc[frame.index[::17], "magnesium"] = np.nan
        frame.loc[frame.index[5::23], "region"] = None
    return frame


@contextlib.contextmanager
def served(root, model_uri: str):
    """`mlflow models serve` of `model_uri` from the SQLite store in `root`, on 127.0.0.1 (its
    own process group: the command starts uvicorn as a child); yields the invocations URL."""
    from conftest import free_port, wait_for_http

    port, tracking_uri = free_port(), f"sqlite:///{root}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with open(root / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=root,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**env, "MLFLOW_TRACKING_URI": tracking_uri})
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=240)
        except RuntimeError as err:
            pytest.fail(f"{err}\n" + (root / "serve.log").read_text()[-3000:])
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_table_model_served_over_http(tmp_path):
    """`mlflow models serve` of a table's model: labels, probabilities by param, an unknown
    category in its out-of-vocabulary slot, a refused value named by row and column (HTTP 400)."""
    import json

    from test_serving import post

    wine_with_regions(False).to_csv(tmp_path / "wine.csv", index=False)
    done = run_cli([*TINY, "data=table", "data.path=wine.csv", "data.target=target"],
                   cwd=tmp_path, data=None)
    assert done.returncode == 0, done.stderr[-3000:]
    with served(tmp_path, "models:/wine-target/1") as url:
        rows = wine_with_regions(False).drop(columns="target").head(3)
        rows.loc[rows.index[1], "region"] = "coastal"  # never seen in training
        body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
        status, text = post(url, body)
        assert status == 200, text
        assert set(json.loads(text)["predictions"]) <= {0, 1, 2}
        status, text = post(url, {**body, "params": {"probabilities": True}})
        assert status == 200, text
        p = pd.DataFrame(json.loads(text)["predictions"])
        assert list(p.columns) == ["0", "1", "2"]
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        body["dataframe_split"]["data"][2][2] = None  # malic_acid, with data.missing=refuse
        status, text = post(url, body)
        assert status == 400, text
        assert f"row 2, column {rows.columns[2]}: null/NaN" in json.loads(text)["message"]


def vintages() -> pd.DataFrame:
    """The wine table with two whole-number columns (int64 in pandas): a year, and a region's
    code listed in data.categorical."""
    frame = frames()["wine"].copy()
    rng = np.random.default_rng(0)
    frame.insert(0, "year", rng.integers(2007, 2011, len(frame)))
    frame.insert(1, "region", rng.integers(1, 4, len(frame)))
    return frame


@pytest.mark.slow
def test_a_model_takes_its_own_files_rows_whole_numbers_included(tmp_path, monkeypatch):
    """What pandas reads of the training file (CSV or Parquet: year and region int64) goes
    through pyfunc and `mlflow models serve` JSON (2007 an integer); a null is imputed
    (data.missing=impute), text in a number's column refused by row and column (HTTP 400)."""
    import json

    from test_serving import post

    vintages().to_csv(tmp_path / "vintages.csv", index=False)
    vintages().to_parquet(tmp_path / "vintages.parquet")
    done = run_cli([*TINY, "data=table", "data.path=vintages.csv", "data.target=target",
                    "data.categorical=[region]", "data.missing=impute"], cwd=tmp_path, data=None)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    model = mlflow.pyfunc.load_model("models:/vintages-target/1")
    types = {c.name: c.to_dict()["type"] for c in model.metadata.signature.inputs.inputs}
    assert types["year"] == types["region"] == "any" and types["alcohol"] == "double"
    for rows in (pd.read_csv(tmp_path / "vintages.csv").head(5),
                 pd.read_parquet(tmp_path / "vintages.parquet").head(5)):
        assert str(rows["year"].dtype) == "int64"  # the target column too: it is ignored
        assert len(model.predict(rows)) == 5
    rows = pd.read_csv(tmp_path / "vintages.csv").head(5).drop(columns="target")
    gap = rows.copy()
    gap.loc[1, "year"] = None  # float64 with NaN, as pandas gives a gap: imputed
    assert set(model.predict(gap)) <= {0, 1, 2}
    typo = rows.astype({"year": object})
    typo.loc[2, "year"] = "MMVII"
    with pytest.raises(mlflow.exceptions.MlflowException,
                       match=r"row 2, column year: 'MMVII' \(allowed: a finite number"):
        model.predict(typo)

    with served(tmp_path, "models:/vintages-target/1") as url:
        body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
        assert body["dataframe_split"]["data"][0][0] in range(2007, 2011)  # an int in the JSON
        status, text = post(url, body)
        assert status == 200, text
        assert json.loads(text)["predictions"] == list(model.predict(rows))
        body["dataframe_split"]["data"][1][0] = None
        status, text = post(url, body)
        assert status == 200, text
        body["dataframe_split"]["data"][2][0] = "MMVII"
        status, text = post(url, body)
        assert status == 400, text
        assert "row 2, column year: 'MMVII'" in json.loads(text)["message"]


@pytest.mark.slow
def test_missing_values_imputed_in_training_and_serving(tmp_path, monkeypatch):
    wine_with_regions(True).to_parquet(tmp_path / "wine.parquet")
    refused = run_cli([*TINY, "data=table", "data.path=wine.parquet", "data.target=target",
                       "tracking.enabled=false"], cwd=tmp_path, data=None)
    assert refused.returncode == 1
    assert "wine.parquet, column region, row 5: a missing value (8 in the column" in refused.stderr
    done = run_cli([*TINY, "data=table", "data.path=wine.parquet", "data.target=target",
                    "data.missing=impute"], cwd=tmp_path, data=None)
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(tmp_path)
    assert np.isfinite(run.data.metrics["test_log_loss"])
    monkeypatch.chdir(tmp_path)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    spec = model.unwrap_python_model().spec  # table.json, as the served model reads it
    assert set(spec["flagged"]) == {"magnesium", "region"}
    rows = wine_with_regions(True).drop(columns="target").head(18)  # row 0 and 17: no magnesium
    predicted = model.predict(rows)
    assert len(predicted) == 18 and set(predicted) <= {0, 1, 2}



class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [0] * len(model_input)


@pytest.mark.slow  # logging a pyfunc model starts a Python process (its environment)
def test_the_champion_gate_of_a_classifier_is_its_test_log_loss(tmp_path, monkeypatch):
    from abalone.tracking.sweep_runs import register_champion

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        client, said = MlflowClient(uri), []
        for loss, accuracy in ((0.5, 0.8), (0.7, 0.9), (0.3, 0.7)):
            with mlflow.start_run() as run:
                info = mlflow.pyfunc.log_model(name="model", python_model=Constant())
            said.append(register_champion(client, "clf", run.info.run_id, info.model_uri,
                                          {"test_log_loss": loss, "test_accuracy": accuracy}, {}))
    finally:
        mlflow.set_tracking_uri(None)
    assert said[0].endswith("as champion: there was no champion")
    assert "its test_log_loss 0.7000 does not beat champion version 1 (0.5000)" in said[1]
    assert "its test_log_loss 0.3000 beats version 1 (0.5000)" in said[2]
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "3"


def logged_version(table: str, task: str, loss: float, tags: bool = True):
    """A run of `table` (a frame of frames(), its target `target`) with a stand-in model logged
    with the table's signature, as the training run logs it; (run id, model URI, metrics, the
    version tags a sweep's champion is registered with)."""
    from abalone.tracking import registry

    rows = frames()[table].drop(columns="target").head(5)
    schema = registry.input_schema(rows)
    with mlflow.start_run() as run:
        mlflow.log_param("data.target", "target")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=Constant(), input_example=rows,
            signature=mlflow.models.ModelSignature(schema))
    metric = "test_log_loss" if task == "classification" else "test_rmse"
    identity = registry.identity("target", task, schema) if tags else {}
    return run.info.run_id, info.model_uri, {metric: loss}, identity


@pytest.mark.slow  # logging a pyfunc model starts a Python process (its environment)
def test_each_table_keeps_its_own_champion(tmp_path, monkeypatch, table_dir):
    """Two tables in one store: each name's champion is only ever compared with models of its
    own table; a version of another table is refused before anything is registered, by a sweep's
    gate, by a single run (before it trains: exit 1, one error line, no run), and by a name whose
    @champion was set before this rule (with how to move the alias)."""
    from abalone.tracking.registry import RegistryError
    from abalone.tracking.sweep_runs import register_champion

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        said = [register_champion(client, name, *logged_version(table, task, loss))
                for name, table, task, loss in (
                    ("wine-target", "wine", "classification", 0.5),
                    ("diabetes-target", "diabetes", "regression", 60.0),
                    ("wine-target", "wine", "classification", 0.4),
                    ("diabetes-target", "diabetes", "regression", 70.0))]
        assert all("there was no champion" in m for m in said[:2])
        assert "its test_log_loss 0.4000 beats version 1 (0.5000)" in said[2]
        assert "its test_rmse 70.0000 does not beat champion version 1 (60.0000)" in said[3]
        # The diabetes regressor's 0.1 would "beat" the classifier's log loss: never compared.
        with pytest.raises(RegistryError, match=r"wine-target' holds models of another table: "
                                                r"its @champion version 2 has task "
                                                r"'classification' \(this run: 'regression'\); "
                                                r"inputs 'alcohol:double"):
            register_champion(client, "wine-target", *logged_version("diabetes", "regression",
                                                                     0.1))
        assert len(client.search_model_versions("name = 'wine-target'")) == 2
        assert str(client.get_model_version_by_alias("wine-target", "champion").version) == "2"

        # A store made before the rule: versions without the tags, @champion on another table.
        run_id, model_uri, metrics, _ = logged_version("cancer", "classification", 0.2, tags=False)
        client.create_registered_model("old-name")
        old = client.create_model_version("old-name", model_uri, run_id,
                                          tags={"test_log_loss": "0.2000"})
        client.set_registered_model_alias("old-name", "champion", old.version)
        with pytest.raises(RegistryError) as refused:
            register_champion(client, "old-name", *logged_version("wine", "classification", 0.1))
        assert "its @champion version 1 has inputs 'mean radius:double" in str(refused.value)
        assert ("move it to a version of this table with MlflowClient().set_registered_model_"
                "alias('old-name', 'champion', VERSION)") in str(refused.value)
        assert len(client.search_model_versions("name = 'old-name'")) == 1
    finally:
        mlflow.set_tracking_uri(None)

    for args in ([*TINY], ["-m", "sweep=quick", "hydra.sweeper.n_trials=1", "trainer.epochs=1"]):
        done = run_cli([*args, "data=table", f"data.path={table_dir / 'diabetes.csv'}",
                        "data.target=target", "tracking.registered_model=wine-target"],
                       cwd=tmp_path, data=None)
        assert done.returncode == 1, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "wine-target' holds models of another table" in errors[0]
        assert "Traceback" not in done.stderr
    experiment = client.get_experiment_by_name("abalone-tensorflow-experiment")
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # no run
    assert len(client.search_model_versions("name = 'wine-target'")) == 2
