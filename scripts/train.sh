#!/usr/bin/env bash
# The main job: set up .venv if needed, then one tracked training run on the local default
# (MLflow in ./mlflow.db). Arguments are Hydra overrides: scripts/train.sh model=wide optimizer.lr=0.01
# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
ensure_venv ""
exec "$VENV/bin/python" -m abalone.train "$@"
