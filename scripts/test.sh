#!/usr/bin/env bash
# The tests: set up .venv with the dev extra if needed, then pytest. Arguments go to pytest.
# The tests read the UCI file from $ABALONE_DATA and start their own MLflow servers on 127.0.0.1.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
ensure_venv "dev"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
