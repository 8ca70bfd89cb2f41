"""MLflow tracking: the connection to the server (`connection`), the store (`store`), how a failure
reads (`failures`), one run's life and model (`runs`), what a started run records (`records`), a
registered model's signature and the rule that it holds models of one table (`registry`), a
sweep's parent run and champion (`sweep_runs`); `mlflow_retries` holds the one reach into
MLflow's private code."""

from abalone.tracking.connection import (OUTAGE, TRANSIENT_MLFLOW_CODES, TrackingError,
                                         connect)
from abalone.tracking.failures import failure_reason
from abalone.tracking.registry import RegistryError, check_name, table_identity
from abalone.tracking.runs import (TrackedRun, end_runs_of_gone_processes, flat_params,
                                   log_datasets, log_model, register, register_checked, run_tags,
                                   where_to_look)

__all__ = ["OUTAGE", "TRANSIENT_MLFLOW_CODES", "RegistryError", "TrackedRun", "TrackingError",
           "check_name", "connect", "end_runs_of_gone_processes", "failure_reason", "flat_params",
           "log_datasets", "log_model", "register", "register_checked", "run_tags",
           "table_identity", "where_to_look"]
