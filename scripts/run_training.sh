#!/usr/bin/env bash
# Train inside the AWS Deep Learning Container on this machine (an EC2 instance, or any host with
# Docker or Podman), as the AWS sample's script does:
#
#   scripts/run_training.sh [hydra overrides]
#   scripts/run_training.sh tracking=sagemaker tracking.arn=arn:aws:sagemaker:...
#   scripts/run_training.sh -m sweep=search tracking=sagemaker tracking.arn=arn:aws:sagemaker:...
#
# It fetches the data into ./data if absent (checked by sha256), builds our image on the DLC
# (pulling the base first if it is not here), then runs it with ./data as the training channel
# and ./output as the model folder. Every argument goes to `python -m abalone.train`.
#
# Settings (environment):
#   ENGINE        docker or podman (default: docker if installed, else podman)
#   BASE_IMAGE    the base image (default: the Dockerfile's ARG BASE_IMAGE, from the public ECR
#                 gallery, which needs no login); a -gpu- tag for GPU instances
#   DLC_REGISTRY  public (default) or private: the same tag from this region's private DLC
#                 registry, after `aws ecr get-login-password` (the account differs by region)
#   AWS_REGION    the region (default us-east-1), for DLC_REGISTRY=private and the container
#   IMAGE         our image's tag (default abalone-dlc:latest)
#   DATA_DIR, OUTPUT_DIR (default ./data, ./output), GPUS (e.g. all), NETWORK (default host)
#   BUILD         0: run IMAGE as it is, without building it (or pulling the base)
#   RUN           0: stop after the data and the build (a fleet prepares once, then starts many)
#   NAME          the container's name
#   ENV_NAMES     more variables to pass to the container by name (space-separated)
#   DRY_RUN       1: print the build and run commands instead of running them
#   BUILD_ONLY    1: build the image and stop, without the data (scripts/push_image.sh)
#
# AWS credentials reach the container as variables passed by name (their values never appear on a
# command line or in the image), or as ~/.aws mounted read-only at the container's $HOME/.aws; on
# EC2 the instance role works with neither. The container runs as the calling user, so the
# outputs are the caller's (Podman without root: --userns=keep-id maps the caller to itself).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
if [ -z "${ENGINE:-}" ]; then
    ENGINE=docker
    command -v docker >/dev/null || ENGINE=podman
fi
BASE_IMAGE="${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' "$ROOT/Dockerfile")}"
IMAGE="${IMAGE:-abalone-dlc:latest}"
DATA_DIR="${DATA_DIR:-$ROOT/data}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/output}"
NETWORK="${NETWORK:-host}"
DATA_URL="https://archive.ics.uci.edu/ml/machine-learning-databases/abalone/abalone.data"
DATA_SHA256="de37cdcdcaaa50c309d514f248f7c2302a5f1f88c168905eba23fe2fbc78449f"

# The private DLC registry's account by region (aws/deep-learning-containers,
# docs/reference/region_availability.md, retrieved 2026-11-26).
dlc_account() {
    case "$1" in
        af-south-1) echo 626614931356 ;;      ap-east-1) echo 871362719292 ;;
        ap-south-2) echo 772153158452 ;;      ap-southeast-3) echo 907027046896 ;;
        ap-southeast-5) echo 550225433462 ;;  ap-southeast-4) echo 457447274322 ;;
        ap-southeast-6) echo 633930458069 ;;  ap-northeast-3) echo 364406365360 ;;
        ap-east-2) echo 975050140332 ;;       ap-southeast-7) echo 590183813437 ;;
        ca-west-1) echo 204538143572 ;;       eu-south-1) echo 692866216735 ;;
        eu-south-2) echo 503227376785 ;;      eu-central-2) echo 380420809688 ;;
        il-central-1) echo 780543022126 ;;    mx-central-1) echo 637423239942 ;;
        me-south-1) echo 217643126080 ;;      me-central-1) echo 914824155844 ;;
        cn-north-1 | cn-northwest-1) echo 727897471807 ;;
        us-east-1 | us-east-2 | us-west-1 | us-west-2 | ap-south-1 | ap-northeast-1 | \
        ap-northeast-2 | ap-southeast-1 | ap-southeast-2 | ca-central-1 | eu-central-1 | \
        eu-west-1 | eu-west-2 | eu-west-3 | eu-north-1 | sa-east-1) echo 763104351884 ;;
        *) echo "error: no Deep Learning Container registry is known for region $1" >&2
           return 1 ;;
    esac
}

case "${DLC_REGISTRY:-public}" in
    public) ;;
    private)
        account="$(dlc_account "$REGION")"
        domain=amazonaws.com
        [[ "$REGION" == cn-* ]] && domain=amazonaws.com.cn
        BASE_IMAGE="$account.dkr.ecr.$REGION.$domain/${BASE_IMAGE#public.ecr.aws/deep-learning-containers/}"
        ;;
    *) echo "error: DLC_REGISTRY must be public or private, not ${DLC_REGISTRY}" >&2; exit 2 ;;
esac

BUILD_ONLY="${BUILD_ONLY:-0}"
if [ "$BUILD_ONLY" != 1 ]; then
    mkdir -p "$DATA_DIR" "$OUTPUT_DIR"
fi
if [ "$BUILD_ONLY" != 1 ] && [ ! -f "$DATA_DIR/abalone.data" ]; then
    echo "fetching the Abalone data into $DATA_DIR ..."
    curl --fail --silent --show-error --location "$DATA_URL" -o "$DATA_DIR/abalone.data.part"
    echo "$DATA_SHA256  $DATA_DIR/abalone.data.part" | sha256sum --check --quiet -
    mv "$DATA_DIR/abalone.data.part" "$DATA_DIR/abalone.data"
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
    ENGINE="echo $ENGINE"  # word-split on purpose: prints each command instead of running it
fi
if [ "${BUILD:-1}" != 0 ]; then
    if ! $ENGINE image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        if [[ "$BASE_IMAGE" =~ ^[0-9]{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?/ ]]; then
            echo "logging in to ${BASE_IMAGE%%/*} ..."
            aws ecr get-login-password --region "${BASH_REMATCH[1]}" \
                | $ENGINE login --username AWS --password-stdin "${BASE_IMAGE%%/*}"
        fi
        $ENGINE pull "$BASE_IMAGE"
    fi
    echo "building $IMAGE on $BASE_IMAGE with $ENGINE ..." >&2
    $ENGINE build --network "$NETWORK" --build-arg BASE_IMAGE="$BASE_IMAGE" --tag "$IMAGE" "$ROOT"
fi
if [ "${RUN:-1}" = 0 ] || [ "$BUILD_ONLY" = 1 ]; then
    exit 0
fi

run_args=(--rm --network "$NETWORK"
          --volume "$DATA_DIR:/opt/ml/input/data/training:ro" --volume "$OUTPUT_DIR:/opt/ml/model"
          --env "AWS_REGION=$REGION" --env HOME=/home/abalone)
if [ -n "${NAME:-}" ]; then
    run_args+=(--name "$NAME")
fi
for name in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE \
            AWS_DEFAULT_REGION AWS_ENDPOINT_URL AWS_CA_BUNDLE MLFLOW_TRACKING_URI \
            MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_S3_ENDPOINT_URL PGPASSWORD \
            SAGEMAKER_MLFLOW_ASSUME_ROLE_ARN SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT ${ENV_NAMES:-}; do
    if [ -n "${!name:-}" ]; then
        run_args+=(--env "$name")  # by name: the engine copies the value from this environment
    fi
done
if [ -d "$HOME/.aws" ]; then
    run_args+=(--volume "$HOME/.aws:/home/abalone/.aws:ro")
fi
if [ "$(id -u)" != 0 ]; then
    run_args+=(--user "$(id -u):$(id -g)")
    if [[ "$ENGINE" == *podman ]]; then
        run_args+=(--userns=keep-id)
    fi
fi
if [ -n "${GPUS:-}" ]; then
    if [[ "$ENGINE" == *podman ]]; then
        run_args+=(--device "nvidia.com/gpu=$GPUS")
    else
        run_args+=(--gpus "$GPUS")
    fi
fi
exec $ENGINE run "${run_args[@]}" "$IMAGE" "$@"
