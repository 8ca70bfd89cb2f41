"""The registered model of data=abalone as users call it: rows checked by `encode` with the
Abalone table's spec (Sex one of M, F, I; measurements >= 0), and a registered version served by
the real `mlflow models serve` over HTTP."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from abalone import dataset
from abalone.serving import LISTED_PROBLEMS, encode, input_name
from conftest import TINY, free_port, run_cli, wait_for_http
from test_data import abalone_cfg

FEATURE_COLUMNS = ("Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight",
                   "Viscera_weight", "Shell_weight")

MODEL = "abalone-tensorflow-model"
GOOD = {"Sex": "F", "Length": 0.53, "Diameter": 0.42, "Height": 0.135, "Whole_weight": 0.677,
        "Shucked_weight": 0.2565, "Viscera_weight": 0.1415, "Shell_weight": 0.21}
SEX_ALLOWED = "(allowed: one of 'M', 'F', 'I')"
MEASUREMENT_ALLOWED = "(allowed: a finite number >= 0)"
# A bad value put in row 1 of three, and what the refusal says of it.
BAD_VALUES = [
    ({"Sex": "X"}, f"row 1, column Sex: 'X' {SEX_ALLOWED}"),
    ({"Sex": None}, f"row 1, column Sex: null/NaN {SEX_ALLOWED}"),
    ({"Length": None}, f"row 1, column Length: null/NaN {MEASUREMENT_ALLOWED}"),
    ({"Height": math.nan}, f"row 1, column Height: null/NaN {MEASUREMENT_ALLOWED}"),
    ({"Whole_weight": math.inf}, f"row 1, column Whole_weight: inf {MEASUREMENT_ALLOWED}"),
    ({"Shell_weight": -math.inf}, f"row 1, column Shell_weight: -inf {MEASUREMENT_ALLOWED}"),
    ({"Diameter": -0.1}, f"row 1, column Diameter: -0.1 {MEASUREMENT_ALLOWED}"),
]


def rows_with(**bad) -> list[dict]:
    """Three good rows, the middle one (index 1) changed by `bad`; a value "drop" drops the key."""
    changed = {k: v for k, v in {**GOOD, **bad}.items() if v != "drop"}
    return [GOOD, changed, GOOD]


# -- encode on DataFrames ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def spec(data_file):
    """The spec data=abalone's runs save as table.json beside the model."""
    return dataset.load(abalone_cfg(f"data.path={data_file}")).spec


def model_inputs(frame: pd.DataFrame, spec: dict) -> dict:
    return encode(frame, spec)[0]


def test_good_rows_map_to_the_keras_inputs(spec):
    inputs = model_inputs(pd.DataFrame([GOOD, {**GOOD, "Sex": " M "}, {**GOOD, "Height": 0.0,
                                                                       "Sex": "I"}]), spec)
    assert inputs[input_name("Sex")].tolist() == [[1], [0], [2]]
    height = inputs[input_name("Height")]
    assert height.dtype == np.float32 and height.ravel()[2] == 0.0
    assert set(inputs) == {input_name(c) for c in FEATURE_COLUMNS}


@pytest.mark.parametrize("bad, words", [
    *BAD_VALUES,
    ({"Shell_weight": "heavy"}, f"row 1, column Shell_weight: 'heavy' {MEASUREMENT_ALLOWED}"),
], ids=lambda value: str(value) if isinstance(value, dict) else None)
def test_a_bad_value_refuses_the_batch_naming_row_column_value_and_what_is_allowed(bad, words,
                                                                                  spec):
    with pytest.raises(MlflowException) as caught:
        model_inputs(pd.DataFrame(rows_with(**bad)), spec)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.get_http_status_code() == 400
    assert words in caught.value.message
    assert "1 of 3 rows" in caught.value.message


def test_every_row_is_checked_and_the_message_stays_short(spec):
    frame = pd.DataFrame([GOOD] * 30, index=range(100, 130))
    frame.loc[105, "Sex"] = "X"
    frame.loc[[110, 120, 129], "Length"] = -1.0
    frame.loc[129, "Height"] = math.inf
    frame.loc[111:125, "Diameter"] = math.nan  # 15 rows, 120 among them: 20 values, 18 rows
    with pytest.raises(MlflowException) as caught:
        model_inputs(frame, spec)
    message = caught.value.message
    assert "18 of 30 rows have invalid values" in message
    # Row order, then column order; the index labels, not positions.
    assert message.index("row 105, column Sex") < message.index("row 110, column Length")
    assert message.index("row 110, column Length") < message.index("row 111, column Diameter")
    assert message.count("row ") == LISTED_PROBLEMS
    assert message.endswith(f"; and {20 - LISTED_PROBLEMS} more")


def test_missing_columns_are_named(spec):
    with pytest.raises(MlflowException, match=r"missing the columns \['Height', 'Shell_weight'\]"):
        model_inputs(pd.DataFrame([GOOD]).drop(columns=["Height", "Shell_weight"]), spec)


# -- a registered version behind `mlflow models serve` ------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory, data_file):
    """Version 1 of the model, registered by a tiny real run in a SQLite store and served by
    `mlflow models serve` on 127.0.0.1; yields (invocations URL, the same version loaded here)."""
    root = tmp_path_factory.mktemp("served")
    done = run_cli(TINY, cwd=root, data=data_file)
    assert done.returncode == 0, done.stderr[-3000:]
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    local = mlflow.pyfunc.load_model(client.get_model_version_download_uri(MODEL, "1"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # As with the venv active: the command runs `uvicorn` from PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = open(root / "serve.log", "w")
    # Its own process group: the command starts uvicorn as a child, stopped with it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/1",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**env, "MLFLOW_TRACKING_URI": tracking_uri})
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=240)
        except RuntimeError as err:
            pytest.fail(f"{err}\n" + (root / "serve.log").read_text()[-3000:])
        yield f"http://127.0.0.1:{port}/invocations", local
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def post(url: str, body: dict) -> tuple[int, str]:
    """POST `body` as JSON (NaN and Infinity as Python's json writes them); status and body."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def split_json(rows: list[dict]) -> dict:
    """`dataframe_split` JSON of `rows`, the columns of the middle row (None stays null)."""
    columns = list(rows[1])
    return {"dataframe_split": {"columns": columns,
                                "data": [[row[c] for c in columns] for row in rows]}}


def file_rows(data_file, n: int) -> pd.DataFrame:
    return pd.read_csv(data_file, header=None, nrows=n, names=[*FEATURE_COLUMNS, "Rings"]
                       ).drop(columns="Rings")


@pytest.mark.slow
def test_served_predictions_equal_the_loaded_model_exactly(served, data_file):
    url, local = served
    rows = file_rows(data_file, 50)
    status, body = post(url, split_json(rows.to_dict("records")))
    assert status == 200, body
    served_predictions = np.asarray(json.loads(body)["predictions"], dtype=np.float32)
    local_predictions = np.asarray(local.predict(rows), dtype=np.float32)
    assert served_predictions.shape == (50,) and np.isfinite(served_predictions).all()
    np.testing.assert_array_equal(served_predictions, local_predictions)


@pytest.mark.slow
@pytest.mark.parametrize("bad, words", [
    *BAD_VALUES,
    # MLflow's schema check refuses these before the model sees the rows.
    ({"Length": "abc"}, "Failed to convert column Length to type 'float64'"),
    ({"Shell_weight": "drop"}, "missing inputs ['Shell_weight']"),
], ids=lambda value: str(value) if isinstance(value, dict) else None)
def test_served_bad_rows_get_400_naming_them(served, bad, words):
    url, _ = served
    status, body = post(url, split_json(rows_with(**bad)))
    assert status == 400, body
    error = json.loads(body)
    assert error["error_code"] in {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
    assert words in error["message"]
    assert "predictions" not in error  # the good rows 0 and 2 are refused with the bad one
    assert "stack_trace" not in error and "Traceback" not in body


@pytest.mark.slow
def test_server_answers_good_rows_after_bad_ones(served, data_file):
    url, _ = served
    assert post(url, split_json(rows_with(Sex="X")))[0] == 400
    assert post(url, split_json(rows_with(Length=math.nan)))[0] == 400
    status, body = post(url, split_json(file_rows(data_file, 3).to_dict("records")))
    assert status == 200, body
    assert len(json.loads(body)["predictions"]) == 3
