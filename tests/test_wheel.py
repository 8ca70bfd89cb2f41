"""A wheel carries its configs: `pip install <wheel>` (not editable) into a fresh venv, then a
tracked run and a sweep from an unrelated folder, with the package, its conf/ (sweeps/ as the
`sweep` group) and the sweeper plugin all read from that venv's site-packages."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import CLI_TIMEOUT, REPO, TINY, sweep_runs

# What the Dockerfile copies into the image: the files a build needs, no .venv, no tests.
SOURCES = ("pyproject.toml", "README.md", "abalone", "hydra_plugins", "conf", "sweeps")


def config_files() -> set[str]:
    """Every YAML under conf/, the symlinked sweep group followed, relative to conf/."""
    found = set()
    for root, _, files in os.walk(REPO / "conf", followlinks=True):
        found |= {str((Path(root) / f).relative_to(REPO / "conf")) for f in files
                  if f.endswith(".yaml")}
    return found


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    # No build isolation: the dev extra's setuptools builds it, without fetching one from PyPI.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("abalone-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed, its dependencies borrowed from this interpreter's
    site-packages; returns the venv's python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Installed before the dependencies are visible, so pip cannot meet the editable abalone
    # of this interpreter's environment (and offer to replace it).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "--disable-pip-version-check", "-q", str(wheel)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    # Plain path lines: site adds these folders to sys.path after the venv's own site-packages,
    # and runs no .pth file inside them, so the editable install's import finder stays out.
    Path(purelib, "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def run(python: Path, args: list[str], cwd: Path, data_file: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLFLOW_") and k not in ("PYTHONPATH", "ABALONE_DATA")}
    env["ABALONE_DATA"] = str(data_file)
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)


@pytest.mark.slow
def test_installed_wheel_trains_and_sweeps_from_anywhere(tmp_path, data_file):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"abalone/conf/{name}" for name in config_files()} <= names
    assert {"abalone/conf/sweep/quick.yaml", "abalone/conf/sweep/search.yaml",
            "hydra_plugins/abalone_optuna_sweeper/sweeper.py"} <= names

    python = fresh_venv(tmp_path, wheel)
    venv = python.parents[1]
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = run(python, ["-c", "import json, abalone, abalone.train, "
                         "hydra_plugins.abalone_optuna_sweeper as plugin; print(json.dumps("
                         "[abalone.__file__, abalone.train.CONF_DIR, plugin.__file__]))"],
                work, data_file)
    assert where.returncode == 0, where.stderr[-3000:]
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(venv), path

    # One tracked run: the default tracking is ./mlflow.db, in the unrelated folder.
    done = run(python, ["-m", "abalone.train", *TINY], work, data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (hydra_yaml,) = work.glob("outputs/*/*/.hydra/hydra.yaml")
    sources = yaml.safe_load(hydra_yaml.read_text())["hydra"]["runtime"]["config_sources"]
    (main,) = [s for s in sources if s["provider"] == "main"]
    assert Path(main["path"]).is_relative_to(venv), main
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db",
                          registry_uri=f"sqlite:///{work}/mlflow.db")
    (single,) = client.search_runs(
        [client.get_experiment_by_name("abalone-tensorflow-experiment").experiment_id])
    assert single.info.status == "FINISHED" and single.data.params["trainer.epochs"] == "2"
    (version,) = client.search_model_versions("name='abalone-tensorflow-model'")
    assert version.run_id == single.info.run_id

    # A sweep: the `sweep` group (sweeps/ in the source tree) and the plugin, from the wheel.
    done = run(python, ["-m", "abalone.train", "-m", "sweep=quick", "hydra.sweeper.n_trials=2",
                        "trainer.epochs=2"], work, data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (parent,), trials = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"].startswith("quick-")
    assert parent.data.params["sweep.n_trials"] == "2"
    assert len(trials) == 2
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert (work / "optuna-studies.journal").is_file()
