#!/usr/bin/env bash
# The tests: set up .venv with the dev extra and the Debian packages they need, then
# pytest (arguments go to pytest). The tests read the UCI file from $ABALONE_DATA and start their
# own MLflow servers and PostgreSQL cluster on 127.0.0.1.
# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
# Debian packages the tests use: PostgreSQL's server binaries (sweeps on a shared storage) and
# chromium (the MLflow UI test drives it headless).
missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing Debian's ${missing[*]} for the tests ..." >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "the tests need Debian's ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
ensure_venv "dev"
cd "$ROOT" || exit 1
exec "$VENV/bin/python" -m pytest "$@"
