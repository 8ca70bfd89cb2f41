#!/usr/bin/env bash
# The image's entry point: `docker run IMAGE [hydra overrides]` is `python -m abalone.train`.
# SageMaker training jobs start a container as `IMAGE train`, so a leading `train` is dropped.
# Runs in the output folder, so a local MLflow store and sweep journal land in the output mount.
set -euo pipefail
if [ "${1:-}" = "train" ]; then
    shift
fi
cd "${SM_MODEL_DIR:-/opt/ml/model}"
exec python -m abalone.train "$@"
