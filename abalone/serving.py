"""The registered model: raw Abalone rows in, predicted Rings out.

MLflow logs this file as the model's code ("models from code") next to the saved Keras model, so
a registered version loads with `mlflow.pyfunc.load_model` wherever Keras, pandas and MLflow are
installed, without this package. It therefore imports nothing from `abalone`; the training code
imports the column names and `model_inputs` from here so both sides map rows the same way.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

SEX_VALUES = ("M", "F", "I")
NUMERIC_COLUMNS = (
    "Length", "Diameter", "Height", "Whole_weight",
    "Shucked_weight", "Viscera_weight", "Shell_weight",
)
FEATURE_COLUMNS = ("Sex", *NUMERIC_COLUMNS)
KERAS_MODEL_ARTIFACT = "keras_model"


def model_inputs(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The Keras model's inputs: the seven measurements as float32, Sex as its index in M, F, I.

    Sex is an index, not a string, because string tensors do not exist under the JAX backend;
    the one-hot encoding of that index happens inside the Keras model.
    """
    missing = [c for c in FEATURE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"input is missing the columns {missing}; expected {list(FEATURE_COLUMNS)}")
    sex = frame["Sex"].astype(str).str.strip().map({s: i for i, s in enumerate(SEX_VALUES)})
    if sex.isna().any():
        bad = sorted(set(frame.loc[sex.isna(), "Sex"].astype(str)))
        raise ValueError(f"column Sex has values {bad}; expected one of M, F, I")
    inputs = {"Sex": sex.to_numpy("int32").reshape(-1, 1)}
    for name in NUMERIC_COLUMNS:
        inputs[name] = pd.to_numeric(frame[name]).to_numpy("float32").reshape(-1, 1)
    return inputs


class AbaloneRegressor(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        self.model = keras.saving.load_model(context.artifacts[KERAS_MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        inputs = model_inputs(pd.DataFrame(model_input))
        return np.asarray(self.model.predict(inputs, verbose=0)).reshape(-1)


mlflow.models.set_model(AbaloneRegressor())
