"""abalone: Hydra-composed, Optuna-swept, MLflow-tracked Keras models for the UCI Abalone data.

Floors, imports only downward (their one list: [tool.importlinter] in pyproject.toml):
- entry points: `train` (`python -m abalone.train`), `container` (how the image starts),
  `storage_proxy` (Optuna's gRPC storage proxy); the Hydra sweeper plugin in hydra_plugins/;
- `sweep`: Optuna studies behind `-m` sweeps (plan, loop, coordinator, report, ...);
- the training run: `run` (four phases), `callbacks`, `outputs`, `evaluate`;
- `tracking` (MLflow) and `workers` (where a sweep's trials run);
- backends: `aws`, `data`, `model`, `serving` (the registered pyfunc model);
- ground: `config` (schemas), `trial` (the sweep-to-run contract), `redact`.
"""
