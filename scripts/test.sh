#!/usr/bin/env bash
# The tests: set up .venv with the dev extra, then pytest (arguments go to pytest). The full suite
# also needs Debian packages, installed when missing (as root; otherwise named, and the script
# stops): PostgreSQL's server binaries for sweeps on a shared storage, Podman with what it needs
# here to build and run the container image, docker-compose for the SageMaker SDK's local mode,
# chromium for the MLflow UI test, SLURM and MariaDB for the launcher tests. The quick tier
# (-m "not slow") needs none and installs none. The tests read the UCI file from $ABALONE_DATA
# and start their own MLflow servers, PostgreSQL cluster and containers on 127.0.0.1.
# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"

quick_tier() {  # whether the arguments select only the quick tier: -m "not slow" [and ...]
    local previous="" arg
    for arg in "$@"; do
        case "$previous $arg" in
            "-m not slow" | "-m not slow and "* | *" -mnot slow" | *" -mnot slow and "*)
                return 0 ;;
        esac
        previous="$arg"
    done
    return 1
}

system_packages() {
    local needed=() packages=() tool
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || needed+=(postgresql)
    [ -x /usr/bin/chromium ] || needed+=(chromium)
    # docker-compose and a `docker` command (Podman's) for the SageMaker SDK's local mode, which
    # the tests run over Podman's Docker API socket.
    # slurmctld, slurmd and munged for the SLURM cluster tests/test_launchers.py starts on
    # 127.0.0.1, with slurmdbd on MariaDB for its accounting (sacct, which submitit asks how a job
    # ended).
    for tool in podman mmdebstrap runc newuidmap docker-compose docker slurmctld munged slurmdbd \
        mariadbd; do
        command -v "$tool" >/dev/null || needed+=("$tool")
    done
    [ ${#needed[@]} -gt 0 ] || return 0
    for tool in "${needed[@]}"; do
        case "$tool" in
            newuidmap) packages+=(uidmap) ;;
            docker) packages+=(podman-docker) ;;  # Podman's `docker` command
            slurmctld) packages+=(slurm-wlm) ;;
            munged) packages+=(munge) ;;
            mariadbd) packages+=(mariadb-server) ;;
            *) packages+=("$tool") ;;
        esac
    done
    if [ "$(id -u)" = 0 ]; then
        echo "installing Debian's ${packages[*]} for the slow tests ..." >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${packages[@]}" >/dev/null
    else
        echo "the slow tests need: sudo apt-get install ${packages[*]}" \
            "(the quick tier, -m \"not slow\", needs none)" >&2
        exit 1
    fi
}

quick_tier "$@" || system_packages
ensure_venv "dev"
cd "$ROOT" || exit 1
exec "$VENV/bin/python" -m pytest "$@"
