#!/usr/bin/env bash
# Train inside the AWS Deep Learning Container on this machine (e.g. an EC2 instance whose IAM
# role is iam/mlflow-training-policy.json), as the AWS sample's script does:
#
#   scripts/run_training.sh [hydra overrides]
#   scripts/run_training.sh tracking=sagemaker tracking.arn=arn:aws:sagemaker:...
#   scripts/run_training.sh -m sweep=search tracking=sagemaker tracking.arn=arn:aws:sagemaker:...
#
# It fetches the data into ./data if absent (checked by sha256), logs in to the DLC registry,
# pulls the base image and builds ours on it, then runs it with ./data and ./output mounted.
# Every argument goes to `python -m abalone.train`. AWS credentials and settings reach the
# container as environment variables passed by name (their values never appear on a command
# line or in the image); on EC2 the instance role works with no variables at all.
#
# Settings (environment): AWS_REGION (default us-east-1), BASE_IMAGE (the DLC base; set a -gpu-
# tag for GPUs), IMAGE (default abalone-dlc:latest), DATA_DIR, OUTPUT_DIR, GPUS (e.g. all).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
DLC_REGISTRY="763104351884.dkr.ecr.${REGION}.amazonaws.com"
BASE_IMAGE="${BASE_IMAGE:-${DLC_REGISTRY}/tensorflow-training:2.19.0-cpu-py312-ubuntu22.04-ec2}"
IMAGE="${IMAGE:-abalone-dlc:latest}"
DATA_DIR="${DATA_DIR:-$ROOT/data}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/output}"
DATA_URL="https://archive.ics.uci.edu/ml/machine-learning-databases/abalone/abalone.data"
DATA_SHA256="de37cdcdcaaa50c309d514f248f7c2302a5f1f88c168905eba23fe2fbc78449f"

mkdir -p "$DATA_DIR" "$OUTPUT_DIR"
if [ ! -f "$DATA_DIR/abalone.data" ]; then
    echo "fetching the Abalone data into $DATA_DIR ..."
    curl --fail --silent --show-error --location "$DATA_URL" -o "$DATA_DIR/abalone.data.part"
    echo "$DATA_SHA256  $DATA_DIR/abalone.data.part" | sha256sum --check --quiet -
    mv "$DATA_DIR/abalone.data.part" "$DATA_DIR/abalone.data"
fi

echo "logging in to $DLC_REGISTRY and building $IMAGE on $BASE_IMAGE ..."
aws ecr get-login-password --region "$REGION" \
    | docker login --username AWS --password-stdin "$DLC_REGISTRY"
docker pull "$BASE_IMAGE"
docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --tag "$IMAGE" "$ROOT"

run_args=(--rm --volume "$DATA_DIR:/opt/ml/data:ro" --volume "$OUTPUT_DIR:/opt/ml/model"
          --env "AWS_REGION=$REGION")
for name in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE \
            AWS_DEFAULT_REGION AWS_ENDPOINT_URL MLFLOW_TRACKING_URI MLFLOW_S3_ENDPOINT_URL \
            SAGEMAKER_MLFLOW_ASSUME_ROLE_ARN; do
    if [ -n "${!name:-}" ]; then
        run_args+=(--env "$name")  # by name: docker copies the value from this environment
    fi
done
if [ -d "$HOME/.aws" ]; then
    run_args+=(--volume "$HOME/.aws:/home/abalone/.aws:ro")
fi
if [ -n "${GPUS:-}" ]; then
    run_args+=(--gpus "$GPUS")
fi
if [ "$(id -u)" != 0 ]; then
    # Write the outputs as the calling user; HOME must then be somewhere writable.
    run_args+=(--user "$(id -u):$(id -g)" --env HOME=/tmp)
fi
docker run "${run_args[@]}" "$IMAGE" "$@"
