#!/usr/bin/env bash
# Push our image to this account's ECR, where SageMaker training jobs (workers=sagemaker) pull it:
#
#   scripts/push_image.sh                               # build it (as run_training.sh does), push
#   BUILD=0 IMAGE=abalone-dlc:dev scripts/push_image.sh # push an image built before
#   DRY_RUN=1 ACCOUNT_ID=123456789012 scripts/push_image.sh   # print the commands
#
# It creates the ECR repository if it is missing (scan on push), logs the engine in to the
# registry with `aws ecr get-login-password` (the password goes through a pipe, never a command
# line), tags and pushes, and prints the URI for workers.image_uri.
#
# Settings (environment):
#   ENGINE       docker or podman (default: docker if installed, else podman)
#   IMAGE        the local image (default abalone-dlc:latest)
#   BUILD        1 (default): build IMAGE first with scripts/run_training.sh (BASE_IMAGE,
#                DLC_REGISTRY, NETWORK as there); 0: take IMAGE as it is
#   REPOSITORY   the ECR repository (default abalone-dlc; iam/sagemaker-worker-policy.json's
#                ECR_REPOSITORY)
#   TAG          the pushed tag (default: IMAGE's tag)
#   AWS_REGION   the registry's region (default us-east-1)
#   ACCOUNT_ID   the registry's account (default: the caller's, from aws sts get-caller-identity)
#   DRY_RUN      1: print the commands instead of running them
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-abalone-dlc:latest}"
ENGINE="${ENGINE:-$(if command -v docker >/dev/null; then echo docker; else echo podman; fi)}"
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
REPOSITORY="${REPOSITORY:-abalone-dlc}"
TAG="${TAG:-${IMAGE##*:}}"
[ "$TAG" = "$IMAGE" ] && TAG=latest  # IMAGE without a tag
DRY_RUN="${DRY_RUN:-0}"
ACCOUNT_ID="${ACCOUNT_ID:-$(aws sts get-caller-identity --query Account --output text)}"
domain=amazonaws.com
[[ "$REGION" == cn-* ]] && domain=amazonaws.com.cn
REGISTRY="$ACCOUNT_ID.dkr.ecr.$REGION.$domain"
URI="$REGISTRY/$REPOSITORY:$TAG"

if [ "${BUILD:-1}" = 1 ]; then
    BUILD_ONLY=1 ENGINE="$ENGINE" IMAGE="$IMAGE" DRY_RUN="$DRY_RUN" "$ROOT/scripts/run_training.sh"
fi
describe=(aws ecr describe-repositories --region "$REGION" --repository-names "$REPOSITORY")
create=(aws ecr create-repository --region "$REGION" --repository-name "$REPOSITORY"
        --image-scanning-configuration scanOnPush=true)
login=("$ENGINE" login --username AWS --password-stdin "$REGISTRY")
if [ "$DRY_RUN" = 1 ]; then
    echo "${describe[*]} || ${create[*]}"
    echo "aws ecr get-login-password --region $REGION | ${login[*]}"
    echo "$ENGINE tag $IMAGE $URI"
    echo "$ENGINE push $URI"
else
    "${describe[@]}" >/dev/null 2>&1 || "${create[@]}" >/dev/null
    aws ecr get-login-password --region "$REGION" | "${login[@]}"
    "$ENGINE" tag "$IMAGE" "$URI"
    "$ENGINE" push "$URI"
fi
echo "workers.image_uri=$URI"
