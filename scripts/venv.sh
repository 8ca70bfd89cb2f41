#!/usr/bin/env bash
# Sourced by train.sh and test.sh: make .venv (once) and install the project into it.
# Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ABALONE_VENV:-$ROOT/.venv}"
ensure_venv() {  # $1: the extras to install, e.g. "dev" or ""
    local extras="${1:-}" spec="$ROOT" stamp
    if [ -n "$extras" ]; then
        spec="${ROOT}[${extras}]"
    fi
    stamp="$VENV/.abalone-installed${extras:+-$extras}"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "installing abalone${extras:+[$extras]} into $VENV ..." >&2
        "$VENV/bin/python" -m pip install --quiet -e "$spec"
        touch "$stamp"
    fi
}
