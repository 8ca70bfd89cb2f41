"""The registered model: raw Abalone rows in, predicted Rings out, bad rows refused by name.

MLflow logs this file as the model's code ("models from code") next to the saved Keras model, so
a registered version loads with `mlflow.pyfunc.load_model` wherever Keras, pandas and MLflow are
installed, without this package. It therefore imports nothing from `abalone`; the training code
imports the column names and `model_inputs` from here so both sides map rows the same way.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

SEX_VALUES = ("M", "F", "I")
NUMERIC_COLUMNS = (
    "Length", "Diameter", "Height", "Whole_weight",
    "Shucked_weight", "Viscera_weight", "Shell_weight",
)
FEATURE_COLUMNS = ("Sex", *NUMERIC_COLUMNS)
KERAS_MODEL_ARTIFACT = "keras_model"
SEX_ALLOWED = "one of 'M', 'F', 'I'"
# Zero is allowed: the UCI file itself has two rows with Height 0.
MEASUREMENT_ALLOWED = "a finite number >= 0"
LISTED_PROBLEMS = 10  # a refusal names at most this many bad values, then counts the rest


def model_inputs(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The Keras model's inputs: the seven measurements as float32, Sex as its index in M, F, I.

    Every row is checked first; if any is bad the whole batch is refused with MLflow's
    invalid-input error (HTTP 400 from `mlflow models serve`), whose one message names each bad
    value's row index, column and value and what is allowed. A missing or non-finite measurement
    must never become a prediction, and a batch is never predicted in part.

    Sex is an index, not a string, because string tensors do not exist under the JAX backend;
    the one-hot encoding of that index happens inside the Keras model.
    """
    missing = [c for c in FEATURE_COLUMNS if c not in frame.columns]
    if missing:
        raise MlflowException.invalid_parameter_value(
            f"input is missing the columns {missing}; expected {list(FEATURE_COLUMNS)}")
    sex = frame["Sex"].astype(str).str.strip().map({s: i for i, s in enumerate(SEX_VALUES)})
    measurements = {name: pd.to_numeric(frame[name], errors="coerce").to_numpy("float64")
                    for name in NUMERIC_COLUMNS}
    bad = {"Sex": sex.isna().to_numpy()}
    bad.update({name: ~(np.isfinite(values) & (values >= 0))
                for name, values in measurements.items()})
    if any(mask.any() for mask in bad.values()):
        raise MlflowException.invalid_parameter_value(refusal(frame, bad))
    inputs = {"Sex": sex.to_numpy("int32").reshape(-1, 1)}
    inputs.update({name: values.astype("float32").reshape(-1, 1)
                   for name, values in measurements.items()})
    return inputs


def refusal(frame: pd.DataFrame, bad: dict[str, np.ndarray]) -> str:
    """One message for a refused batch: each bad value (row index, column, value, what is
    allowed) in row order, the first LISTED_PROBLEMS of them, and how many there were."""
    problems = sorted((position, column_number, column)
                      for column_number, (column, mask) in enumerate(bad.items())
                      for position in np.flatnonzero(mask))
    bad_rows = len({position for position, _, _ in problems})
    listed = []
    for position, _, column in problems[:LISTED_PROBLEMS]:
        value = frame[column].iloc[position]
        shown = "null/NaN" if pd.api.types.is_scalar(value) and pd.isna(value) else plain(value)
        allowed = SEX_ALLOWED if column == "Sex" else MEASUREMENT_ALLOWED
        listed.append(f"row {plain(frame.index[position])}, column {column}: {shown} "
                      f"(allowed: {allowed})")
    more = len(problems) - len(listed)
    return (f"batch refused, nothing predicted: {bad_rows} of {len(frame)} rows have invalid "
            f"values: " + "; ".join(listed) + (f"; and {more} more" if more else ""))


def plain(value) -> str:
    """`value` as a user wrote it: -0.5 or 'X', not NumPy 2's np.float64(-0.5)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


class AbaloneRegressor(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        self.keras = keras
        self.model = keras.saving.load_model(context.artifacts[KERAS_MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        inputs = model_inputs(pd.DataFrame(model_input))
        # A direct call: `model.predict` costs ~0.1 s per request in set-up alone.
        predicted = self.model(inputs, training=False)
        return np.asarray(self.keras.ops.convert_to_numpy(predicted)).reshape(-1)


mlflow.models.set_model(AbaloneRegressor())
