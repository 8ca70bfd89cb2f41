#!/usr/bin/env bash
# Builds the local stand-in of the TensorFlow 2.21 training DLC that the container tests put the
# project's Dockerfile on (see standin.Containerfile for what it imitates and what it leaves out):
# a Debian 13 root filesystem made with mmdebstrap, imported into Podman, plus PyPI packages.
# Test set-up, not for users: on AWS the Dockerfile builds on the real image.
#
#   tests/container/build_standin.sh IMAGE_TAG
#
# The root filesystem image is kept between runs (localhost/abalone-standin-rootfs:trixie), and
# pip's downloads in ~/.cache/abalone-standin-pip.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TAG="${1:?usage: build_standin.sh IMAGE_TAG}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"
ROOTFS=localhost/abalone-standin-rootfs:trixie

if ! podman image exists "$ROOTFS"; then
    echo "making a Debian 13 root filesystem with Python for $ROOTFS ..." >&2
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,procps \
        trixie - | podman import --quiet - "$ROOTFS" >/dev/null
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$HERE/standin.Containerfile" "$HERE/standin-requirements.txt" "$HERE/entrypoint.sh" "$context/"
cp "${PIP_CERT:-${REQUESTS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}}" "$context/host-ca.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndefault-timeout = 180\ndisable-pip-version-check = true\n' \
    > "$context/pip.conf"
cache="$HOME/.cache/abalone-standin-pip"
mkdir -p "$cache"
echo "building the DLC stand-in $TAG ..." >&2
podman build --quiet --network=host --volume "$cache:/root/.cache/pip" \
    --build-arg ROOTFS="$ROOTFS" --file "$context/standin.Containerfile" --tag "$TAG" "$context"
