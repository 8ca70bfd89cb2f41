"""The `n_trials` total of a study shared by every process and host that runs it, who runs each
trial, and trials whose process is gone.

A trial holds a slot when it is COMPLETE, PRUNED, RUNNING, WAITING, or FAIL because its training
raised; a trial interrupted (Ctrl-C) or left RUNNING by a dead process is failed and its
parameters queued again by Optuna's `RetryHeartbeatStaleTrialCallback`, and the retry takes its
slot. A trial may start only while fewer than `n_trials` trials numbered before it hold slots;
numbers come from the storage, so no two processes can both take the last slot.

A trial failed by a transport fault (`transport_fault`: a connection to the tracking server,
the study's database or S3 lost, reset or refused; their 503/429 after retries; an outage past
the grace) is failed and queued again too: its parameters were not judged, so it neither counts
towards `n_trials` nor stands in the study as a bad point. Each still counts towards the
process's `max_failures`, so a server that stays broken stops the sweep.

Staleness: a RUNNING trial of this host whose process is gone fails at once, whatever the
storage (Optuna has no such check). A trial silent for `stale_after` seconds fails by Optuna's
heartbeat where the storage has one (`RDBStorage`: `heartbeat_interval`, `grace_period`,
`optuna.storages.fail_stale_trials`); the journal file and the gRPC proxy have none
(`optuna.storages.JournalStorage` and `GrpcStorageProxy` are no `BaseHeartbeat`), so there the
heartbeat is a trial attribute this module writes and reads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from abalone.accidents import HOST, PID_NAMESPACE, process_alive
from abalone.study.storage import RETRY
from abalone.study.trials import WARM_START_OF

log = logging.getLogger(__name__)
OCCUPYING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def retried_number(trial: FrozenTrial) -> int | None:
    """The number of the failed trial this one runs again, if it is a retry."""
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return history[-1] if history else None


def slot_holders(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count towards n_trials: all but FAIL trials that were queued again or were
    surplus, and copies from another study (`warm_start_from`)."""
    retried = {retried_number(t) for t in trials}
    return [t for t in trials if WARM_START_OF not in t.user_attrs and (
        t.state in OCCUPYING or (t.state == TrialState.FAIL and t.number not in retried
                                 and not t.user_attrs.get("surplus")))]


def work_left(study: optuna.Study, n_trials: int) -> bool:
    """Whether this process should ask for another trial."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return len(slot_holders(trials)) < n_trials


def within_total(study: optuna.Study, number: int, n_trials: int) -> bool:
    holders = slot_holders(study.get_trials(deepcopy=False))
    return sum(1 for t in holders if t.number < number) < n_trials


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def fail_and_retry(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Mark the trial FAIL and queue its parameters again; it gives its slot to the retry.
    Raises if another process finished the trial first."""
    study.tell(trial.number, state=TrialState.FAIL)
    RETRY(study, study._storage.get_trial(trial._trial_id))


def transport_fault(error: BaseException | None) -> str | None:
    """What in `error`'s chain says the trial was failed by its transport rather than by its
    own training (None if nothing does): the exception's type and first line."""
    import botocore.exceptions
    import requests
    import sqlalchemy.exc
    import urllib3

    from abalone.tracking import TRANSIENT_MLFLOW_CODES, TrackingError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        status = (getattr(error, "response", None) or {}).get("ResponseMetadata", {}).get(
            "HTTPStatusCode") if isinstance(error, botocore.exceptions.ClientError) else None
        if isinstance(error, (ConnectionError, TimeoutError, TrackingError,
                              requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              urllib3.exceptions.HTTPError, botocore.exceptions.ConnectionError,
                              botocore.exceptions.HTTPClientError,
                              sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) \
                or getattr(error, "error_code", None) in TRANSIENT_MLFLOW_CODES \
                or (status is not None and (status >= 500 or status == 429)):
            return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}" \
                if str(error).strip() else type(error).__name__
        error = error.__cause__ or error.__context__
    return None


def has_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage keeps Optuna's own heartbeat."""
    storage = study._storage
    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def mark_owner(trial: optuna.Trial) -> None:
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid_namespace", PID_NAMESPACE)
    trial.set_user_attr("heartbeat", time.time())
    # Last: a trial with a pid has the rest (a crash or a full disk may cut the writes short).
    trial.set_user_attr("pid", os.getpid())


class Heartbeat:
    """Beats for one running trial, every `interval` seconds, until the block ends."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float):
        self.study, self.trial, self.interval = study, trial, interval
        self.done = threading.Event()

    def __enter__(self) -> Heartbeat:
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        # A beat under way holds the journal file's lock: a process that left now would leave
        # the lock behind, and the study's other processes would wait out its 30 s grace. A
        # beat stuck on a storage that is away is not waited for long.
        self.thread.join(timeout=10)

    def _beat(self) -> None:
        optuna_beat = has_heartbeat(self.study)
        while True:
            try:
                if optuna_beat:
                    self.study._storage.record_heartbeat(self.trial._trial_id)
                elif not self.done.is_set():
                    self.trial.set_user_attr("heartbeat", time.time())
            except Exception as err:  # noqa: BLE001 - the storage is away; the next beat may land
                log.warning("trial %d's heartbeat was not recorded: %s", self.trial.number,
                            str(err).strip().splitlines()[0] if str(err).strip() else err)
            if self.done.wait(self.interval):
                return


# A process marks the trial it asked for at once (`mark_owner`); a RUNNING trial still unmarked
# this many seconds after it started was asked by a process that died, or that lost the
# storage's reply to its ask, in between. Optuna's heartbeat never fails it: it has no beat.
UNMARKED_AFTER = 60.0


def marked(trial: FrozenTrial) -> bool:
    """Whether `mark_owner` named the trial's process: its attributes are set one by one, so
    a process that died (or lost the storage) in between leaves a host without a pid."""
    return bool(trial.user_attrs.get("host") and trial.user_attrs.get("pid"))


def wait_out_unmarked(study: optuna.Study, stale_after: float,
                      on_failed: Callable[[FrozenTrial], None]) -> bool:
    """Whether, after waiting for them to age, this process failed and queued again RUNNING
    trials no process marked as its own; False at once if there are none. A process with no
    other work calls it: such a trial holds its slot and nobody would ever end it."""
    while True:
        unmarked = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if not marked(t)]
        if not unmarked:
            return False
        if fail_stale_trials(study, stale_after, on_failed):
            return True
        time.sleep(2.0)


def fail_stale_trials(study: optuna.Study, stale_after: float,
                      on_failed: Callable[[FrozenTrial], None]) -> list[int]:
    """Fail RUNNING trials whose process is gone (or silent for `stale_after` seconds) and queue
    their parameters again; `on_failed` gets each trial this call failed."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    optuna_beat = has_heartbeat(study)
    stale = []
    now = time.time()
    for trial in running:
        attrs = trial.user_attrs
        if not marked(trial):  # asked, never (or half) marked: `wait_out_unmarked`
            if now - trial.datetime_start.timestamp() > min(stale_after, UNMARKED_AFTER):
                stale.append(trial)
            continue
        here = (attrs.get("host") == HOST and attrs.get("pid_namespace") == PID_NAMESPACE
                and attrs.get("pid"))
        if here and attrs["pid"] == os.getpid():
            continue
        if here and not process_alive(attrs["pid"]):
            stale.append(trial)
        elif not optuna_beat:
            beat = attrs.get("heartbeat") or trial.datetime_start.timestamp()
            if now - beat > stale_after:
                stale.append(trial)
    failed = []
    for trial in stale:
        try:
            fail_and_retry(study, trial)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first
        failed.append(trial)
    if optuna_beat:  # Optuna fails the silent ones, and its callback (RETRY) queues them again
        optuna.storages.fail_stale_trials(study)
        retried = {retried_number(t) for t in study.get_trials(deepcopy=False)}
        failed += [t for t in running if t.number in retried and t not in failed]
    for trial in failed:
        on_failed(trial)
    return [t.number for t in failed]
