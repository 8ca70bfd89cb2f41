"""What a registered model is: the input signature it is logged with (`input_schema`), which
takes exactly the rows `pandas.read_csv` / `read_parquet` give of the training file; and the
registry's rule: one registered model holds models of one table — one target, task and input
signature — so a champion gate never compares a penguins classifier with a diamonds regressor. Every version registered is tagged with the three (`identity`); a run about to
register under a name whose latest version or `@champion` is of another table is refused,
before it trains and again before it registers, with what differs and (for the champion of a
store made before this rule) how to move the alias.
"""

from __future__ import annotations

import hashlib
import logging

import mlflow
import pandas as pd

from abalone.config import AbaloneError

log = logging.getLogger(__name__)
IDENTITY = ("abalone.target", "abalone.task", "abalone.inputs")
# MLflow takes tag values of 5000 characters at least; longer signatures are kept as a digest.
INPUTS_SHOWN = 4000


class RegistryError(AbaloneError):
    """A registered model name holds models of another table; the message says what differs."""


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


def inputs_text(schema) -> str:
    """The input signature as one short line: `Sex:string, Length:double, year:any`."""
    text = ", ".join(f"{spec.name}:{spec.to_dict()['type']}" for spec in schema.inputs)
    if len(text) > INPUTS_SHOWN:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def identity(target: str, task: str, schema) -> dict[str, str]:
    """The tags that say which table a version's model is of."""
    return {"abalone.target": target, "abalone.task": task, "abalone.inputs": inputs_text(schema)}


def version_identity(client, version) -> dict[str, str | None]:
    """A registered version's identity: its tags, or for a version registered before they
    were written, its logged signature, its task by its metrics and its run's data.target
    (what cannot be found stays None, and is not compared)."""
    tags = version.tags or {}
    if IDENTITY[2] in tags:
        return {key: tags.get(key) for key in IDENTITY}
    found = dict.fromkeys(IDENTITY)
    found["abalone.task"] = ("classification" if "test_log_loss" in tags else
                             "regression" if "test_rmse" in tags else None)
    try:
        info = mlflow.models.get_model_info(f"models:/{version.name}/{version.version}")
        if info.signature is not None:
            found["abalone.inputs"] = inputs_text(info.signature.inputs)
        found["abalone.target"] = client.get_run(version.run_id).data.params.get("data.target")
    except Exception as err:  # noqa: BLE001 - a deleted run or artifact: not comparable
        log.debug("version %s of %s: %s", version.version, version.name, err)
    return found


def differences(have: dict, want: dict) -> list[str]:
    words = {"abalone.target": "target", "abalone.task": "task", "abalone.inputs": "inputs"}
    return [f"{words[k]} {have[k]!r} (this run: {want[k]!r})" for k in IDENTITY
            if have.get(k) is not None and want.get(k) is not None and have[k] != want[k]]


def check(client, name: str, wanted: dict[str, str]) -> None:
    """Refuse (RegistryError) registering a model of the table `wanted` under `name` when its
    latest version or its @champion is a model of another table."""
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    latest = client.search_model_versions(f"name = '{name}'", max_results=1,
                                          order_by=["version_number DESC"])
    for version, role in ((champion, "@champion"), (latest[0] if latest else None, "latest")):
        if version is None:
            continue
        differ = differences(version_identity(client, version), wanted)
        if not differ:
            continue
        message = (f"tracking.registered_model={name!r} holds models of another table: its "
                   f"{role} version {version.version} has " + "; ".join(differ) + ". A champion "
                   "is only compared with models of the same target, task and inputs: set "
                   "tracking.registered_model to another name (null: the data's own name)")
        if role == "@champion":
            message += (f". The alias was set before champions were kept apart by table: "
                        f"move it to a version of this table with MlflowClient()."
                        f"set_registered_model_alias({name!r}, 'champion', VERSION) (or remove "
                        f"it: delete_registered_model_alias({name!r}, 'champion')), or in the "
                        f"MLflow UI (Models > {name} > the version > Aliases)")
        raise RegistryError(message)


def table_identity(ds) -> dict[str, str]:
    """The identity of the models trained on `ds` (an abalone.dataset.Dataset)."""
    return identity(ds.target, ds.task, input_schema(ds.splits.train[ds.columns]))


def check_name(name: str, ds) -> None:
    """Before a run trains: refuse a registered model name holding models of another table."""
    check(mlflow.MlflowClient(), name, table_identity(ds))

