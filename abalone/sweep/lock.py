"""A lock across processes and hosts in the study's own storage, for the steps of opening a study
that must happen once: queueing the starting points (Optuna's `enqueue_trial(skip_if_exists=
True)` checks, then adds: two hosts can both add), electing the parent MLflow run (search,
then create: two coordinators can both create) and registering the champion (two processes of
one study that end together can both register).

Optuna offers no lock, but it creates a study name once, atomically: an RDB storage by the
unique constraint on `studies.study_name`, a journal by replaying its log in one order, where
the later writer's `create_study` raises DuplicatedStudyError. Holding the lock is holding a
marker study of that name; releasing it deletes the study. A holder that died leaves its marker:
the steps under the lock take a second or two, so a marker older than `stale_after` seconds is
taken as abandoned and deleted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import optuna

log = logging.getLogger(__name__)


@contextlib.contextmanager
def study_lock(storage, name: str, stale_after: float = 60.0) -> Iterator[None]:
    storage = optuna.storages.get_storage(storage)
    marker = f"{name}.lock"
    minimize = [optuna.study.StudyDirection.MINIMIZE]

    def release() -> None:
        with contextlib.suppress(KeyError):
            storage.delete_study(storage.get_study_id_from_name(marker))

    deadline = time.monotonic() + stale_after
    while True:
        try:
            storage.create_new_study(minimize, marker)  # quietly: not optuna.create_study
            break
        except optuna.exceptions.DuplicatedStudyError:
            if time.monotonic() >= deadline:
                log.warning("lock %r held for over %gs: taken as abandoned by a process that "
                            "died", marker, stale_after)
                release()
                deadline = time.monotonic() + stale_after
            time.sleep(0.2)
    try:
        yield
    finally:
        release()
