"""MLflow tracking: the connection to the server (`connection`), the store (`store`), how a
failure reads (`failures`), one run's life and records (`runs`), a sweep's parent run and champion
(`sweep_runs`); `mlflow_retries` holds the one reach into MLflow's private code."""

from abalone.tracking.connection import (OUTAGE, TRANSIENT_MLFLOW_CODES, TrackingError,
                                         connect)
from abalone.tracking.failures import failure_reason
from abalone.tracking.runs import (TrackedRun, flat_params, log_datasets, log_model, register,
                                   run_tags, where_to_look)

__all__ = ["OUTAGE", "TRANSIENT_MLFLOW_CODES", "TrackedRun", "TrackingError", "connect",
           "failure_reason", "flat_params", "log_datasets", "log_model", "register", "run_tags",
           "where_to_look"]
