"""scripts/test.sh as a developer runs it: the quick tier installs no system package, the full
suite installs what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO, scrubbed_environ

FAKE_APT = """#!/bin/sh
echo "$@" >> "{record}"
"""


@pytest.mark.slow
@pytest.mark.parametrize("args, installs", [
    (["-m", "not slow"], False), (["-m", "not slow and not jax"], False), (["-mnot slow"], False),
    ([], True), (["-m", "slow"], True), (["-m", "not container"], True),
    (["tests/test_data.py", "-q"], True)])
def test_only_the_full_suite_installs_system_packages(tmp_path, args, installs):
    # A PATH on which no system tool of the slow tests is found (Podman, SLURM, MariaDB, ...),
    # `id` says root and apt-get records what it was asked; pytest then only prints its version.
    bin_dir, record = tmp_path / "bin", tmp_path / "apt-get.calls"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT.format(record=record))
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")
    for fake in ("apt-get", "id"):
        (bin_dir / fake).chmod(0o755)
    for tool in ("dirname", "touch"):  # touch: venv.sh's stamp, after a change of pyproject.toml
        os.symlink(shutil.which(tool), bin_dir / tool)
    done = subprocess.run(["/bin/bash", str(REPO / "scripts" / "test.sh"), *args, "--version"],
                          capture_output=True, text=True, timeout=600,
                          env=scrubbed_environ(PATH=str(bin_dir)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pytest" in done.stdout + done.stderr  # it went on to pytest
    if not installs:
        assert not record.exists(), record.read_text()
        assert "installing Debian's" not in done.stderr
        return
    update, install = record.read_text().splitlines()
    assert update == "update -qq"
    assert install.startswith("install -y -qq ")
    assert {"podman", "mmdebstrap", "runc", "uidmap", "docker-compose", "podman-docker",
            "slurm-wlm", "munge", "slurmdbd", "mariadb-server"} <= set(install.split())
    assert "installing Debian's" in done.stderr
