"""The registered model: raw rows of the table in, values or class labels out (class
probabilities with the pyfunc param `probabilities=True`), bad rows refused by name.

MLflow logs this file as the model's code ("models from code") beside the saved Keras model and
`table.json` (the spec of abalone/dataset.py: columns, vocabularies, bounds, fill values,
classes), so a registered version loads with `mlflow.pyfunc.load_model` wherever Keras, pandas
and MLflow are installed, without this package. It therefore imports nothing from `abalone`;
training maps rows to the model's inputs with `encode` from here, so both sides map them alike.
Categorical values become vocabulary indices here, not inside the Keras model, because string
tensors do not exist under the JAX backend.
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
log = logging.getLogger("abalone.serving")


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


def plain(value) -> str:
    """`value` as a user wrote it: -0.5 or 'X', not NumPy 2's np.float64(-0.5)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def allowed_number(bounds: dict | None) -> str:
    """What a numeric column takes, in words: "a finite number >= 0", "a whole number >= 1"."""
    bounds = bounds or {}
    words = "a whole number" if bounds.get("integer") else "a finite number"
    if bounds.get("min") is not None:
        words += f" >= {bounds['min']:g}"
    if bounds.get("max") is not None:
        words += f" <= {bounds['max']:g}"
    return words


def within(values: np.ndarray, bounds: dict | None) -> np.ndarray:
    """Which of the float `values` are finite and within `bounds` (min, max, integer)."""
    bounds = bounds or {}
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        if bounds.get("min") is not None:
            ok &= values >= bounds["min"]
        if bounds.get("max") is not None:
            ok &= values <= bounds["max"]
        if bounds.get("integer"):
            ok &= np.mod(values, 1) == 0
    return ok


def allowed_values(vocabulary: list[str]) -> str:
    return "one of " + ", ".join(repr(v) for v in vocabulary)


def _numeric(raw: pd.Series, absent: np.ndarray, column: str, spec: dict, refuse: bool):
    """(float32 input, bad values, what is allowed) of a numeric column."""
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        values = raw.astype("float64").to_numpy()  # integers too; a nullable one's NA: NaN
    else:  # text, or a column of mixed values (JSON)
        values = pd.to_numeric(raw.astype(object), errors="coerce").astype("float64").to_numpy()
    bounds = spec["bounds"].get(column)
    bad = ~within(values, bounds) & (~absent | refuse)
    allowed = allowed_number(bounds) + ("" if refuse else ", or null (imputed)")
    filled = np.where(absent, spec["fill"][column], values)
    return filled.astype("float32").reshape(-1, 1), bad, allowed


def _categorical(raw: pd.Series, absent: np.ndarray, column: str, spec: dict, refuse: bool):
    """(int32 input, bad values, what is allowed, values never seen) of a categorical column.
    Declared values (data.categories) index from 0 and refuse any other value; learned ones
    index from 1, 0 being the out-of-vocabulary slot."""
    vocabulary = spec["vocabulary"][column]
    declared = column in spec["declared"]
    positions = {v: i for i, v in enumerate(vocabulary, start=0 if declared else 1)}
    tokens = [spec["fill"][column] if gone else token(v) for v, gone in zip(raw, absent)]
    index = np.array([positions.get(t, -1 if declared else 0) for t in tokens], "int32")
    if declared:
        bad = (index < 0) | (absent & refuse)
        allowed = allowed_values(vocabulary) + ("" if refuse else ", or null (imputed)")
        unseen = 0
    else:
        bad = absent & refuse
        allowed = "a value (data.missing=refuse: never null)" if refuse else "any"
        unseen = int(((index == 0) & ~absent).sum())
    return np.maximum(index, 0).reshape(-1, 1), bad, allowed, unseen


def encode(frame: pd.DataFrame, spec: dict) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The Keras model's inputs for raw rows, and per learned categorical column how many values
    the training rows never had (they go to the out-of-vocabulary slot). A bad value (not a
    number, out of its bounds, not a declared category, missing when data.missing=refuse)
    refuses the whole batch with MLflow's invalid-input error (HTTP 400 when served), naming
    each bad value's row, column and what is allowed: a batch is never predicted in part."""
    columns = spec["features"]
    absent_columns = [c for c in columns if c not in frame.columns]
    if absent_columns:
        raise MlflowException.invalid_parameter_value(
            f"input is missing the columns {absent_columns}; expected {columns}")
    refuse = spec["missing"] == "refuse"
    inputs, bad, allowed, oov = {}, {}, {}, {}
    for c in columns:
        raw = frame[c]
        absent = raw.isna().to_numpy()
        if c in spec["categorical"]:
            inputs[input_name(c)], bad[c], allowed[c], unseen = _categorical(
                raw, absent, c, spec, refuse)
            if c not in spec["declared"]:
                oov[c] = unseen
        else:
            inputs[input_name(c)], bad[c], allowed[c] = _numeric(raw, absent, c, spec, refuse)
        if c in spec["flagged"]:
            inputs[flag_name(c)] = absent.astype("float32").reshape(-1, 1)
    if any(mask.any() for mask in bad.values()):
        raise MlflowException.invalid_parameter_value(refusal(frame, bad, allowed))
    return inputs, oov


def refusal(frame: pd.DataFrame, bad: dict[str, np.ndarray], allowed: dict[str, str]) -> str:
    """One message for a refused batch: each bad value (row index, column, value, what is
    allowed) in row order, the first LISTED_PROBLEMS of them, and how many there were."""
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
        # A direct call: `model.predict` costs ~0.1 s per request in set-up alone.
        output = self.keras.ops.convert_to_numpy(self.model(inputs, training=False))
        return answer(output, self.spec, bool((params or {}).get("probabilities", False)))


mlflow.models.set_model(TableModel())
