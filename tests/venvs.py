"""Virtual environments of their own for programs the tests run beside the project (an old MLflow
server, the SageMaker Python SDK, optuna-dashboard), whose requirements clash with the project's,
and for what the everyday `.venv` leaves out (PyTorch, for the `gp` sampler and the terminator).
Each is kept under ~/.cache/abalone-test-venvs/NAME (or $ABALONE_TEST_VENVS/NAME) and made again
only when its requirements change, so runs on one machine share them."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

CACHE = Path(os.environ.get("ABALONE_TEST_VENVS", Path.home() / ".cache" / "abalone-test-venvs"))

# A venv made with `sees_project=True` runs the project: at start-up its Python puts the
# site-packages named by this variable (the project's venv, its .pth files processed, so the
# editable install too) ahead of its own. The project keeps its own versions of what both hold
# (typing_extensions, jinja2, ...); the side venv adds only what the project's lacks. The path
# comes from the environment, not the venv, so checkouts on one machine share the venv.
PROJECT_SITE = "ABALONE_PROJECT_SITE"
_HOOK = "_abalone_project_site"
_HOOK_CODE = f'''"""Written by tests/venvs.py: ${PROJECT_SITE} ahead of this venv's own packages."""
import os
import site
import sys


def _add_project_site():
    project = os.environ.get("{PROJECT_SITE}")
    if not project or project in sys.path:
        return
    before = list(sys.path)
    site.addsitedir(project)
    added = [p for p in sys.path if p not in before]
    # sys.prefix is this venv already; site.PREFIXES not yet while .pth files are read.
    own = min((before.index(p) for p in site.getsitepackages([sys.prefix]) if p in before),
              default=len(before))
    sys.path[:] = before[:own] + added + before[own:]


_add_project_site()
'''


def side_venv(name: str, *requirements: str, sees_project: bool = False) -> Path:
    """The `bin` folder of the venv NAME with exactly `requirements` installed by pip; with
    `sees_project`, its Python also imports the project's packages when run with
    `project_site_env()` in its environment."""
    folder = CACHE / name
    stamp = folder / ".abalone-requirements"
    wanted = "\n".join(requirements) + "\n" + (_HOOK_CODE if sees_project else "")
    CACHE.mkdir(parents=True, exist_ok=True)
    # Tests in parallel (or two checkouts) may want the same venv: one makes it, the others wait.
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.is_file() and stamp.read_text() == wanted):
            shutil.rmtree(folder, ignore_errors=True)
            base = getattr(sys, "_base_executable", sys.executable)  # not the project's venv
            subprocess.run([base, "-m", "venv", str(folder)], check=True, timeout=300)
            python = folder / "bin" / "python"
            done = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                                   *requirements], capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(requirements)} into {folder} failed:\n"
                                   f"{done.stderr[-3000:]}")
            if sees_project:
                site_packages = Path(subprocess.run(
                    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    check=True, capture_output=True, text=True).stdout.strip())
                (site_packages / f"{_HOOK}.py").write_text(_HOOK_CODE)
                (site_packages / f"{_HOOK}.pth").write_text(f"import {_HOOK}\n")
            stamp.write_text(wanted)
    return folder / "bin"


def project_site_env() -> dict[str, str]:
    """The environment variable with which a `sees_project` venv's Python imports the project
    from the venv running these tests."""
    return {PROJECT_SITE: sysconfig.get_paths()["purelib"]}
