"""abalone: Hydra-composed, Optuna-swept, MLflow-tracked Keras regressors for the UCI Abalone data.

Modules: config (schemas), data (loading, validation, splits), model (Keras builders), callbacks
(MLflow logger, terminal lines), tracking (MLflow connection, params, tags), evaluate (metrics,
plots), serving (the registered pyfunc model), train (the `python -m abalone.train` entry point),
container (how the Docker image starts, on EC2 and as a SageMaker training job), storage_proxy
(Optuna's gRPC storage proxy in front of a study database, for large fleets).
"""
