"""The one reach into MLflow's private code (abalone/tracking/mlflow_retries.py) still fits the
installed MLflow, and pyproject.toml keeps MLflow below the releases it was checked against."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from abalone.tracking import mlflow_retries
from conftest import REPO


def mlflow_requirement() -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (line,) = [r for r in project["dependencies"] if Requirement(r).name == "mlflow"]
    return Requirement(line)


def test_mlflow_s_private_sender_has_the_signature_we_replace():
    assert mlflow_retries.signature_mismatch() is None


def test_pyproject_bounds_mlflow_to_the_checked_releases():
    requirement = mlflow_requirement()
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirement.specifier), \
        "mlflow needs an upper bound: a new release may change the private function"
    assert requirement.specifier.contains(importlib.metadata.version("mlflow"))


CONNECT = """
import sys
from mlflow.utils import rest_utils
from omegaconf import OmegaConf
from abalone.config import TrackingConfig
from abalone.tracking import OUTAGE, connect

connect(OmegaConf.structured(TrackingConfig(uri=sys.argv[1])))
print(rest_utils._get_http_response_with_retries == OUTAGE.request, OUTAGE.send is not None)
"""


@pytest.mark.slow
def test_requests_go_through_our_sender_once_connected(tmp_path):
    # In a process of its own: connecting sets MLflow's tracking URI for the whole process.
    done = subprocess.run([sys.executable, "-c", CONNECT, f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True"]
