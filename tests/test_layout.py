"""The house's one rule: imports flow one way, entry points down to the ground, with no circle.
The floors are listed once, as import-linter's contracts in pyproject.toml ([tool.importlinter]);
this file runs them (the quick tier) and shows that each kind of break makes them fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def lint(root: Path, capsys) -> tuple[bool, str]:
    """(whether every contract of `root`'s pyproject.toml holds, import-linter's report)."""
    import importlinter.api  # noqa: F401 - configures import-linter, as its CLI does
    from importlinter.application.use_cases import lint_imports

    kept = lint_imports(str(root / "pyproject.toml"), cache_dir=None, no_logo=True)
    return kept, capsys.readouterr().out


def test_the_import_contracts_hold(capsys):
    kept, report = lint(REPO, capsys)
    assert kept, report


# Each break as a newcomer might make it: (file, line appended, the contract that must fail).
BREAKS = {
    "a relative import upwards": ("abalone/trial.py", "from .sweep import loop",
                                  "abalone.trial is not allowed to import abalone.sweep"),
    "a module on no floor": ("abalone/helpers.py", "HELP = 1",
                             "- abalone.helpers"),
    "the library importing the benchmark": ("abalone/redact.py", "import bench.report",
                                            "abalone is not allowed to import bench"),
    "the library importing the plugin": (
        "abalone/config.py", "from hydra_plugins.abalone_optuna_sweeper import sweeper",
        "abalone is not allowed to import hydra_plugins.abalone_optuna_sweeper.sweeper"),
    "a circle within a floor": ("abalone/table.py", "import abalone.dataset",
                                "no import circle among a package's modules BROKEN"),
    "a benchmark section importing its own front": ("scripts/bench/measure.py",
                                                    "import bench.report",
                                                    "no import circle among a package's modules BROKEN"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_each_kind_of_break_fails_the_contracts(kind, tmp_path):
    """On a copy of the code with one break, `lint-imports` fails naming it (a fresh process:
    the copy's packages have the names of those this one has imported)."""
    for part in ("abalone", "hydra_plugins", "scripts/bench", "scripts/hydra_plugins"):
        shutil.copytree(REPO / part, tmp_path / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "conf"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path, line, named = BREAKS[kind]
    with open(tmp_path / path, "a") as f:
        f.write(f"\n{line}\n")
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache",
                           "--no-logo"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{tmp_path}/scripts"},
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert named in done.stdout, done.stdout
