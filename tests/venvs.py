"""Virtual environments of their own for programs the tests run beside the project (an old MLflow
server, the SageMaker Python SDK), whose requirements clash with the project's. Each is kept under
~/.cache/abalone-test-venvs/NAME (or $ABALONE_TEST_VENVS/NAME) and made again only when its
requirements change, so runs on one machine share them."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("ABALONE_TEST_VENVS", Path.home() / ".cache" / "abalone-test-venvs"))


def side_venv(name: str, *requirements: str) -> Path:
    """The `bin` folder of the venv NAME with exactly `requirements` installed by pip."""
    folder = CACHE / name
    stamp = folder / ".abalone-requirements"
    wanted = "\n".join(requirements) + "\n"
    CACHE.mkdir(parents=True, exist_ok=True)
    # Tests in parallel (or two checkouts) may want the same venv: one makes it, the others wait.
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.is_file() and stamp.read_text() == wanted):
            shutil.rmtree(folder, ignore_errors=True)
            base = getattr(sys, "_base_executable", sys.executable)  # not the project's venv
            subprocess.run([base, "-m", "venv", str(folder)], check=True, timeout=300)
            done = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install",
                                   "--quiet", *requirements], capture_output=True, text=True,
                                  timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(requirements)} into {folder} failed:\n"
                                   f"{done.stderr[-3000:]}")
            stamp.write_text(wanted)
    return folder / "bin"
