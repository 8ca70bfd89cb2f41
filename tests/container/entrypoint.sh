#!/bin/bash
# The stand-in's copy of the DLC's entry point (scripts/docker/tensorflow/entrypoint.sh there):
# the real one also sources AWS telemetry and starts CUDA forward compatibility, then runs its
# arguments the same way.
set -e
exec "$@"
