"""What a registered model is: the input signature it is logged with (`input_schema`), which
takes exactly the rows `pandas.read_csv` / `read_parquet` give of the training file.
"""

from __future__ import annotations

import pandas as pd


def input_schema(rows: pd.DataFrame):
    """The signature's inputs for raw rows of the table: MLflow's types for text (string),
    true/false (boolean) and fractional (double) columns, Any for whole-number ones. MLflow's
    long refuses a null (a value data.missing=impute fills in) and its double refuses int64
    (the rows `pandas.read_csv` gives of the training file), so whole-number columns are left
    to `serving.encode`, which refuses text by row and column as it does a bad number."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inferred = infer_signature(rows.head(5).reset_index(drop=True)).inputs
    return Schema([ColSpec(AnyType(), spec.name, required=spec.required)
                   if pd.api.types.is_integer_dtype(rows[spec.name]) else spec
                   for spec in inferred.inputs])
