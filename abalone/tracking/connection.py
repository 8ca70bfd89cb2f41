"""The connection to the MLflow tracking server: connecting without minutes of retries, and once
connected, riding out the server's outages (`ServerOutage`, one deadline per outage for every
request of every thread)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
import time
from typing import Iterator
from urllib.parse import urlsplit


class _SageMakerHeadersOffArn(logging.Filter):
    """Drops MLflow's warning about the sagemaker-mlflow plugin's request-header provider when
    the tracking URI is not an ARN: the plugin parses every URI as an ARN and fails ("list index
    out of range") on each request. Other providers' errors, and the plugin's on an ARN, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.args[0] if isinstance(record.args, tuple) and record.args else None
        traceback = getattr(error, "__traceback__", None)
        while traceback is not None:
            if traceback.tb_frame.f_globals.get("__name__", "").startswith("sagemaker_mlflow."):
                import mlflow

                return mlflow.get_tracking_uri().startswith("arn:")
            traceback = traceback.tb_next
        return True


# Before MLflow loads the plugin and sends the first request.
logging.getLogger("mlflow.tracking.request_header.registry").addFilter(_SageMakerHeadersOffArn())

import mlflow  # noqa: E402

from abalone.config import AbaloneError  # noqa: E402
from abalone.redact import redact, redact_text  # noqa: E402
from abalone.tracking import mlflow_retries, store  # noqa: E402
from abalone.tracking.server_version import check_server_version  # noqa: E402

class TrackingError(AbaloneError):
    """The tracking server cannot be used; the message names the URI and the cause."""


class ReplyLost(TrackingError):
    """A request that must not be sent twice reached the server, perhaps, and its reply did not
    come back: the caller looks up whether it acted (abalone/tracking/once.py) before sending
    it again."""


log = logging.getLogger(__name__)

# Answers of a server that is restarting, overloaded or throttling: worth waiting for. Others
# (400, 403, 404, and 500: the server ran the request and failed) are final.
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})
# Of those, the answers a gateway gives after it may have forwarded the request.
MAYBE_ACTED_STATUSES = frozenset({408, 502, 504})
# Requests that create something each time they are sent: after an attempt the server may have
# acted on, they are never sent again blindly (`ReplyLost`). The rest are idempotent: reads,
# updates, tags and params (same value), deletes, artifacts (same path), a registered model's
# creation (a second one is refused and MLflow's register_model takes that as done), a logged
# model's (at worst an unreferenced LoggedModel record), and metric batches: the SQL store's
# primary key (run, key, timestamp, step, value) drops a point it already holds, and our logger
# sends each epoch's points with the time the epoch ended, so a resent batch is the same batch.
NOT_REPEATABLE = ("/runs/create", "/model-versions/create")
# Requests that link a run once to its datasets or its logged model: MLflow's SQL store refuses
# a second identical link (a UNIQUE constraint on its `inputs` table, HTTP 400), so when one is
# sent again after an attempt the server may have acted on, that refusal means the first landed.
LINKS_ONCE = ("/runs/log-inputs", "/runs/outputs")
DUPLICATE = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")


# MLflow's names for the answers of a server that is unavailable or throttling (HTTP 503, 429).
TRANSIENT_MLFLOW_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
# Tries of connect's first request to a server that answered it busy or dropped the connection
# (unlike one that is not there, which fails at once): several workers starting together may be
# throttled, and one lost connection should not stop a sweep before it starts.
CONNECT_ATTEMPTS = 3


def _answered_busy(error: BaseException) -> bool:
    """Whether `error` (of connect's first request) came from a server that is there: an answer
    of 429/503 (or a gateway's 408/502/504), or a connection reset or closed after it was made."""
    import requests
    import urllib3

    for _ in range(8):  # MLflow re-raises the requests error it caught: the chain is short
        if error is None:
            return False
        if getattr(error, "error_code", None) in TRANSIENT_MLFLOW_CODES:
            return True
        if isinstance(error, requests.exceptions.RetryError):  # urllib3's, with no retries left
            status = re.search(urllib3.exceptions.ResponseError.SPECIFIC_ERROR.format(
                status_code=r"(\d+)"), str(error))
            return status is not None and int(status.group(1)) in TRANSIENT_STATUSES
        if isinstance(error, requests.ConnectionError):
            return not _never_sent(error)
        error = error.__cause__ or error.__context__
    return False


def _never_sent(error: BaseException) -> bool:
    """Whether a failed attempt never reached the server (no connection was made)."""
    import urllib3

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, urllib3.exceptions.ConnectTimeoutError):  # NewConnectionError too
            return True
        error = getattr(error, "reason", None) or next(
            (a for a in getattr(error, "args", ()) if isinstance(a, BaseException)), None)
        seen += 1
    return False


class ServerOutage:
    """Waits out the tracking server's outages, for every request MLflow sends it.

    MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, urllib3's) count attempts of one
    request, log a line per retry and retry HTTP 500 too; here the whole outage has one deadline,
    `grace` seconds from its first failure, shared by all threads (the MLflow logger's sender and
    the main thread): one line when the server becomes unreachable, one when it is back. Once an
    outage has outlasted the grace, requests fail after one attempt until one gets through.
    Requests to hosts that `connect` did not reach (MLflow's telemetry) pass untouched, and so do
    all requests before `connect` has reached the server: a dead server at start-up fails fast.
    """

    MAX_DELAY = 4.0  # seconds between attempts, at most: a restarted server is seen quickly

    def __init__(self):
        self.lock = threading.Lock()
        self.send = None  # MLflow's request function, which this wraps
        self.hosts: set[str] = set()  # host:port of the tracking server (and its artifacts)
        self.learning: int | None = None  # the thread of connect's first request: note its host
        self.server = ""  # the tracking URI, for messages
        self.grace = 0.0
        self.since: float | None = None  # monotonic time of the current outage's first failure
        self.waited = 0  # requests that met the current outage
        self.given_up: str | None = None  # why, once an outage has outlasted the grace

    def install(self) -> None:
        with self.lock:
            if self.send is None:
                self.send = mlflow_retries.replace_sender(self.request)

    def request(self, method, url, max_retries, backoff_factor, backoff_jitter, retry_codes,
                raise_on_status=True, **kwargs):
        """MLflow's `_get_http_response_with_retries`, with its retries replaced by ours."""
        import requests

        host = urlsplit(url).netloc
        if self.learning == threading.get_ident():  # not MLflow's telemetry thread
            self.hosts.add(host)
        if host not in self.hosts or self.grace <= 0:
            return self.send(method, url, max_retries, backoff_factor, backoff_jitter,
                             retry_codes, raise_on_status, **kwargs)
        repeatable = not (method.upper() == "POST"
                          and urlsplit(url).path.endswith(NOT_REPEATABLE))
        body = kwargs.get("data")
        body_start = body.tell() if hasattr(body, "seek") else None  # an artifact's file
        links_once = method.upper() == "POST" and urlsplit(url).path.endswith(LINKS_ONCE)
        attempt, met_outage, maybe_acted = 0, False, False
        while True:
            if attempt and body_start is not None:
                body.seek(body_start)
            retry_after = None
            try:
                response = self.send(method, url, 0, backoff_factor, backoff_jitter,
                                     retry_codes, False, **kwargs)
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as err:
                # urllib3's innermost reason, e.g. "[Errno 111] Connection refused"
                reason = getattr(err.args[0] if err.args else None, "reason", err)
                failure = f"{type(err).__name__}: {str(reason).rsplit(': ', 1)[-1][:200]}"
                if not repeatable and not _never_sent(err):
                    raise ReplyLost(f"{method} {urlsplit(url).path}: {failure}") from err
                maybe_acted = maybe_acted or not _never_sent(err)
            else:
                if response.status_code not in TRANSIENT_STATUSES:
                    if self.since is not None or self.given_up:
                        self.back()
                    if links_once and maybe_acted and response.status_code == 400 and any(
                            d in response.text for d in DUPLICATE):
                        log.info("%s %s was refused as a duplicate after a lost reply: the "
                                 "first attempt landed", method, urlsplit(url).path)
                        response.status_code, response._content = 200, b"{}"
                    return response
                failure = f"HTTP {response.status_code} {response.reason}"
                if not repeatable and response.status_code in MAYBE_ACTED_STATUSES:
                    raise ReplyLost(f"{method} {urlsplit(url).path}: {failure}")
                maybe_acted = maybe_acted or response.status_code in MAYBE_ACTED_STATUSES
                retry_after = response.headers.get("Retry-After")
            remaining = self.failed(failure, first=not met_outage)
            met_outage = True
            delay = min(self.MAX_DELAY, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0)
            if retry_after and retry_after.strip().isdigit():
                delay = max(delay, float(retry_after))
            try:
                time.sleep(max(0.0, min(delay, remaining)))
            except KeyboardInterrupt:
                self.interrupt()
                raise
            attempt += 1

    def failed(self, failure: str, first: bool) -> float:
        """Note a failed attempt; return the seconds of grace left, or raise TrackingError
        once the outage has outlasted the grace."""
        with self.lock:
            now = time.monotonic()
            if self.since is None:
                self.since, self.waited = now, 0
                if not self.given_up:
                    log.warning("MLflow tracking server %s unreachable (%s); requests wait for "
                                "it up to %gs (tracking.outage_grace)", self.server, failure,
                                self.grace)
            self.waited += first
            elapsed = now - self.since
            if self.given_up or elapsed >= self.grace:
                self.given_up = self.given_up or (
                    f"the MLflow tracking server at {self.server} was unreachable for "
                    f"{elapsed:.0f}s, longer than tracking.outage_grace={self.grace:g}s "
                    f"(last: {failure}); run the same command again once it is back (a "
                    "sweep resumes its study)")
                raise TrackingError(self.given_up)
            return self.grace - elapsed

    def interrupt(self) -> None:
        """A signal during an outage: no thread waits for the server any longer."""
        from abalone import interrupts

        with self.lock:
            if self.since is not None and not self.given_up:
                self.given_up = (f"interrupted ({interrupts.cause()}) while the MLflow tracking server at "
                                 f"{self.server} was unreachable")

    def back(self) -> None:
        with self.lock:
            if self.since is not None:
                log.info("MLflow tracking server %s back after %.1fs; %d request%s waited",
                         self.server, time.monotonic() - self.since, self.waited,
                         "s" * (self.waited != 1))
            self.since, self.given_up = None, None


OUTAGE = ServerOutage()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _first_request(uri: str, experiment: str, timeout: str):
    """The experiment, selected with no retries and a short timeout: a server that is not there
    fails at once; one that answered busy or dropped the connection is asked again."""
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            with _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=timeout):
                return mlflow.set_experiment(experiment)
        except Exception as err:  # MLflow raises many types (MlflowException, OSError, ...)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            reason = redact_text(reason)
            if attempt < CONNECT_ATTEMPTS and _answered_busy(err):
                log.info("MLflow tracking server %s busy at the first request (%s); trying "
                         "again", redact(uri), reason[:200])
                time.sleep(attempt * random.uniform(0.5, 1.5))
                continue
            raise TrackingError(store.cannot_use(
                uri, reason + (f" (after {attempt} tries)" if attempt > 1 else ""))) from err


_connected: dict[tuple[str, str], str] = {}  # (uri, experiment) -> id, for a sweep's trials


def connect(tracking_cfg) -> str:
    """Point MLflow at tracking.uri (or the SageMaker server of tracking.arn/server_name) and
    select the experiment; return its id.

    The first request goes out with no retries and a short timeout, so an unreachable server is
    reported in seconds; later requests wait out an outage for tracking.outage_grace seconds
    (`ServerOutage`).
    """
    uri = store.tracking_uri(tracking_cfg)
    mlflow.set_tracking_uri(uri)
    if (uri, tracking_cfg.experiment) in _connected:
        return _connected[uri, tracking_cfg.experiment]
    timeout = str(max(1, int(tracking_cfg.connect_timeout)))
    OUTAGE.install()
    OUTAGE.learning = threading.get_ident()
    try:
        with store.creating(uri):  # a SQLite store: one process creates it
            experiment = _first_request(uri, tracking_cfg.experiment, timeout)
    finally:
        OUTAGE.learning = None
    check_server_version(uri, redact(uri), float(timeout))  # before anything trains
    OUTAGE.server, OUTAGE.grace = redact(uri), tracking_cfg.outage_grace
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    _connected[uri, tracking_cfg.experiment] = experiment.experiment_id
    return experiment.experiment_id


