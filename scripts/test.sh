#!/usr/bin/env bash
# The tests: set up .venv with the dev extra and Debian's PostgreSQL server if needed, then
# pytest (arguments go to pytest). The tests read the UCI file from $ABALONE_DATA and start their
# own MLflow servers and PostgreSQL cluster on 127.0.0.1.
# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing Debian's postgresql for the sweep tests ..." >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "the tests need PostgreSQL's server binaries: sudo apt-get install postgresql" >&2
        exit 1
    fi
fi
ensure_venv "dev"
cd "$ROOT" || exit 1
exec "$VENV/bin/python" -m pytest "$@"
