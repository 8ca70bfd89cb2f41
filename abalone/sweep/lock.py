"""A lock across processes and hosts of one study's storage, for the steps of opening a study that
must happen once: queueing the starting points (Optuna's `enqueue_trial(skip_if_exists=True)`
checks, then adds: two hosts can both add), electing the parent MLflow run (search, then create:
two coordinators can both create) and registering the champion (two processes of one study that
end together can both register).

Each storage is locked with a lock of its own kind, which the operating system or the database
releases when its holder's process or session ends, so a holder that died never blocks anyone:
- a journal file: `flock` on a file named after the lock in the folder `<journal>.locks/` beside
  it (on the one machine, or the cluster's shared file system, the journal itself needs);
- SQLite: the same beside the database file;
- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection of its own.

Anything else (Optuna's gRPC storage proxy, another database) has no lock a client can take, but
each storage creates a study name once, atomically: an RDB storage by the unique constraint on
`studies.study_name`, a journal by replaying its log in one order. There the lock is a marker
study of the lock's name (`NAME.lock`), created without Optuna's "A new study created" line and
deleted on release; a marker older than `stale_after` seconds is taken as left by a holder that
died and deleted (the steps under the lock take a second or two).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Iterator

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

log = logging.getLogger(__name__)
WAIT_NOTICE = 10.0  # seconds of waiting before a line says what for
POLL = 0.1


class FileLock:
    """`flock` on a file of its own: released by the kernel when the holder's process ends."""

    kind = "file"

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self.file = handle
        return True

    def release(self) -> None:
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
        self.file = None


class AdvisoryLock:
    """PostgreSQL's session advisory lock on a connection of its own: released by the server
    when the session ends, the holder's process gone or its connection cut."""

    kind = "PostgreSQL advisory"

    def __init__(self, engine, name: str):
        self.engine = engine
        # pg_advisory_lock takes a bigint: the name's first 8 bytes of SHA-256, signed.
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self.connection = None

    def try_acquire(self) -> bool:
        from sqlalchemy import text

        connection = self.engine.connect()
        got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                 {"key": self.key}).scalar()
        connection.commit()  # session-level: the lock outlives the transaction
        if got:
            self.connection = connection
        else:
            connection.close()
        return bool(got)

    def release(self) -> None:
        from sqlalchemy import text

        try:
            self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            self.connection.commit()
        finally:  # a cut connection has lost the lock with its session anyway
            self.connection.close()
            self.connection = None


class MarkerStudy:
    """A study named after the lock, where the storage has no lock of its own."""

    kind = "marker study"

    def __init__(self, storage, name: str, stale_after: float):
        self.storage, self.marker, self.stale_after = storage, f"{name}.lock", stale_after
        self.since = time.monotonic()

    def try_acquire(self) -> bool:
        quiet_marker_studies()
        try:
            self.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], self.marker)
            return True
        except optuna.exceptions.DuplicatedStudyError:
            if time.monotonic() - self.since >= self.stale_after:
                log.warning("lock %r held for over %gs: taken as abandoned by a process that "
                            "died", self.marker, self.stale_after)
                self.release()
                self.since = time.monotonic()
            return False

    def release(self) -> None:
        with contextlib.suppress(KeyError):
            self.storage.delete_study(self.storage.get_study_id_from_name(self.marker))


class _NoMarkerLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("A new study created")
                    and record.getMessage().endswith(".lock"))


# The loggers of Optuna's storages that say "A new study created ... with name: NAME".
_STORAGE_LOGGERS = ("optuna.storages._rdb.storage", "optuna.storages.journal._storage",
                    "optuna.storages._in_memory")


def quiet_marker_studies() -> None:
    """Keep the storages' "A new study created" lines about marker studies off the terminal
    (here, and in the storage proxy's process, which creates them for its clients)."""
    for name in _STORAGE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoMarkerLines) for f in logger.filters):
            logger.addFilter(_NoMarkerLines())


def _file_name(name: str) -> str:
    """A file name for the lock: the name made safe, and a hash so two names never share one."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}.lock"


def lock_for(storage, name: str, stale_after: float = 60.0):
    """The lock of this storage's kind for `name`."""
    backend = getattr(storage, "_backend", None)  # Optuna's cache in front of an RDBStorage
    if isinstance(backend, RDBStorage):
        storage = backend
    if isinstance(storage, JournalStorage) and isinstance(storage._backend, JournalFileBackend):
        journal = Path(storage._backend._file_path)
        return FileLock(journal.parent / f"{journal.name}.locks" / _file_name(name))
    if isinstance(storage, RDBStorage):
        url = storage.engine.url
        if url.get_backend_name() == "postgresql":
            return AdvisoryLock(storage.engine, name)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            database = Path(url.database)
            return FileLock(database.parent / f"{database.name}.locks" / _file_name(name))
    return MarkerStudy(storage, name, stale_after)


@contextlib.contextmanager
def study_lock(storage, name: str, stale_after: float = 60.0) -> Iterator[None]:
    """Hold the storage's lock `name` for the block; wait for it as long as another holds it."""
    lock = lock_for(optuna.storages.get_storage(storage), name, stale_after)
    start = time.monotonic()
    noticed = False
    while not lock.try_acquire():
        if not noticed and time.monotonic() - start >= WAIT_NOTICE:
            log.info("waiting for the study's lock %r (%s), held by another process", name,
                     lock.kind)
            noticed = True
        time.sleep(POLL)
    try:
        yield
    finally:
        lock.release()
