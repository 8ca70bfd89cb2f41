"""The one place that reaches into MLflow's private code: every request MLflow's REST client sends
goes through `mlflow.utils.rest_utils._get_http_response_with_retries`, and our outage handling
(`connection.ServerOutage`) takes its place. MLflow offers no supported hook for this (request
header providers see no responses; its own retries count attempts of one request), so the
function's signature is pinned here, tests/test_mlflow_retries.py fails on any MLflow whose
function differs, and pyproject.toml bounds `mlflow` below the next untested minor release.
"""

from __future__ import annotations

import inspect
from typing import Callable

from mlflow.utils import rest_utils

# The parameters of the function we replace, as of the versions pyproject.toml admits.
SIGNATURE = ("method", "url", "max_retries", "backoff_factor", "backoff_jitter", "retry_codes",
             "raise_on_status", "allow_redirects", "respect_retry_after_header", "kwargs")


def signature_mismatch() -> str | None:
    """Why MLflow's private function no longer fits ours, or None."""
    function = getattr(rest_utils, "_get_http_response_with_retries", None)
    if function is None:
        return "mlflow.utils.rest_utils._get_http_response_with_retries is gone"
    found = tuple(inspect.signature(function).parameters)
    if found != SIGNATURE:
        return f"_get_http_response_with_retries takes {found}, not {SIGNATURE}"
    return None


def replace_sender(sender: Callable) -> Callable:
    """Route MLflow's requests through `sender`; return MLflow's own function, which `sender`
    calls to send each attempt."""
    original = rest_utils._get_http_response_with_retries
    rest_utils._get_http_response_with_retries = sender
    return original
