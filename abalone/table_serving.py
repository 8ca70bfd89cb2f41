"""The registered model of a table (data=table): raw rows of the table in, values or class labels
out (class probabilities with the pyfunc param `probabilities=True`), bad rows refused by name.

Like abalone/serving.py, MLflow logs this file as the model's code beside the saved Keras model
and `table.json` (abalone/table.py's `spec`: columns, vocabularies, fill values, classes), so it
imports nothing from `abalone`; training maps rows to the model's inputs with `encode` from here.
Categorical values become vocabulary indices here, not inside the Keras model, because string
tensors do not exist under the JAX backend; index 0 is the out-of-vocabulary slot.
"""

from __future__ import annotations

import json
import logging
import re

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

REGRESSION, CLASSIFICATION = "regression", "classification"
KERAS_MODEL_ARTIFACT = "keras_model"
SPEC_ARTIFACT = "table_spec"
LISTED_PROBLEMS = 10  # a refusal names at most this many bad values, then counts the rest
log = logging.getLogger("abalone.table_serving")


def token(value) -> str:
    """A categorical value as the vocabulary holds it: 3, 3.0 and "3" are one category."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def input_name(column: str) -> str:
    """The Keras input of a column: Keras names allow letters, digits and underscores."""
    return "c_" + re.sub(r"\W", "_", str(column))


def flag_name(column: str) -> str:
    return input_name(column) + "__missing"


def encode(frame: pd.DataFrame, spec: dict) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The Keras model's inputs for raw rows, and per categorical column how many values the
    training rows never had (they go to the out-of-vocabulary slot). A bad value (not a number,
    missing when data.missing=refuse) refuses the whole batch with MLflow's invalid-input error
    (HTTP 400 when served), naming each bad value's row, column and what is allowed."""
    columns = [*spec["numeric"], *spec["categorical"]]
    absent_columns = [c for c in columns if c not in frame.columns]
    if absent_columns:
        raise MlflowException.invalid_parameter_value(
            f"input is missing the columns {absent_columns}; expected {columns}")
    refuse = spec["missing"] == "refuse"
    inputs, bad, allowed, oov = {}, {}, {}, {}
    for c in columns:
        raw = frame[c]
        absent = raw.isna().to_numpy()
        if c in spec["numeric"]:
            values = pd.to_numeric(raw, errors="coerce").to_numpy("float64")
            bad[c] = ~np.isfinite(values) & (~absent | refuse)
            allowed[c] = "a finite number" + ("" if refuse else ", or null (imputed)")
            inputs[input_name(c)] = np.where(absent, spec["fill"][c], values).astype(
                "float32").reshape(-1, 1)
        else:
            bad[c] = absent & refuse
            allowed[c] = "a value (data.missing=refuse: never null)" if refuse else "any"
            positions = {v: i for i, v in enumerate(spec["vocabulary"][c], start=1)}
            tokens = [spec["fill"][c] if gone else token(v) for v, gone in zip(raw, absent)]
            index = np.array([positions.get(t, 0) for t in tokens], "int32")
            oov[c] = int(((index == 0) & ~absent).sum())
            inputs[input_name(c)] = index.reshape(-1, 1)
        if c in spec["flagged"]:
            inputs[flag_name(c)] = absent.astype("float32").reshape(-1, 1)
    if any(mask.any() for mask in bad.values()):
        raise MlflowException.invalid_parameter_value(refusal(frame, bad, allowed))
    return inputs, oov


def refusal(frame: pd.DataFrame, bad: dict[str, np.ndarray], allowed: dict[str, str]) -> str:
    problems = sorted((position, number, column) for number, (column, mask)
                      in enumerate(bad.items()) for position in np.flatnonzero(mask))
    listed = []
    for position, _, column in problems[:LISTED_PROBLEMS]:
        value = frame[column].iloc[position]
        shown = "null/NaN" if pd.api.types.is_scalar(value) and pd.isna(value) else plain(value)
        listed.append(f"row {plain(frame.index[position])}, column {column}: {shown} "
                      f"(allowed: {allowed[column]})")
    more = len(problems) - len(listed)
    return (f"batch refused, nothing predicted: {len({p for p, _, _ in problems})} of "
            f"{len(frame)} rows have invalid values: " + "; ".join(listed)
            + (f"; and {more} more" if more else ""))


def plain(value) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)


def probabilities(output: np.ndarray, spec: dict) -> np.ndarray:
    """(rows, classes) from the model's output: a sigmoid column for two classes."""
    output = np.asarray(output, "float64")
    if len(spec["classes"]) == 2:
        p = output.reshape(-1)
        return np.stack([1 - p, p], axis=1)
    return output / output.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 +- 1e-7


def answer(output: np.ndarray, spec: dict, with_probabilities: bool):
    """Values (regression), class labels, or a frame of class probabilities (a column each)."""
    if spec["task"] == REGRESSION:
        return np.asarray(output).reshape(-1)
    p = probabilities(output, spec)
    if with_probabilities:
        return pd.DataFrame(p, columns=[token(c) for c in spec["classes"]])
    return np.asarray(spec["classes"], dtype=object)[p.argmax(axis=1)]


class TableModel(mlflow.pyfunc.PythonModel):
    """params: {"probabilities": true} returns a column of probabilities per class."""

    def load_context(self, context):
        import keras

        self.keras = keras
        # Uncompiled: predictions need no loss or metrics (nor abalone's MacroF1 class).
        self.model = keras.saving.load_model(context.artifacts[KERAS_MODEL_ARTIFACT],
                                             compile=False)
        with open(context.artifacts[SPEC_ARTIFACT]) as f:
            self.spec = json.load(f)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        inputs, oov = encode(pd.DataFrame(model_input), self.spec)
        unknown = {c: n for c, n in oov.items() if n}
        if unknown:
            log.warning("values the training rows never had, predicted as unknown: %s", unknown)
        output = self.keras.ops.convert_to_numpy(self.model(inputs, training=False))
        return answer(output, self.spec, bool((params or {}).get("probabilities", False)))


mlflow.models.set_model(TableModel())
