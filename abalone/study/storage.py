"""The study's storage: a journal file (one machine; abalone/study/journal.py), a database
(several hosts; its password from Secrets Manager if asked), or Optuna's gRPC storage proxy
(large fleets), each failing in seconds, with the reason and without the password, when it
cannot be opened."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from abalone.config import AbaloneError, ConfigError
from abalone.redact import redact
from abalone.study.journal import Journal

CONNECT_TIMEOUT = 5  # seconds to reach a database storage or a storage proxy
# Fails a stale trial and queues its parameters again (abalone.sweep.slots).
RETRY = RetryHeartbeatStaleTrialCallback(max_retry=None)


def heartbeat_interval(stale_after: float) -> int:
    """Seconds between a running trial's heartbeats: several within `stale_after`."""
    return int(max(1.0, min(60.0, stale_after / 4)))


class StorageError(AbaloneError):
    """The study's storage cannot be opened; the message names it without its password."""


def make_storage(storage: str, password_secret: str | None = None,
                 stale_after: float | None = None) -> optuna.storages.BaseStorage:
    """The study's storage; `password_secret` (a Secrets Manager ARN) supplies the database
    login, read here in every process, so no URL or command line carries the password. A
    database keeps Optuna's heartbeat when `stale_after` is given: a trial silent that long is
    failed and queued again (abalone.sweep.slots)."""
    if password_secret and "://" not in storage:
        raise ConfigError("hydra.sweeper.storage_password_secret is for a database storage "
                          f"(postgresql+psycopg2://...), not the file {storage}")
    if storage.startswith("grpc://"):
        if password_secret:
            raise ConfigError("hydra.sweeper.storage_password_secret is for a database storage; "
                              "a storage proxy (grpc://) holds the database login itself")
        return grpc_proxy(storage)
    if "://" in storage:
        import sqlalchemy.exc

        connect_args: dict[str, Any] = {}
        if storage.startswith("postgresql"):  # an unreachable server fails in seconds, not minutes
            connect_args["connect_timeout"] = CONNECT_TIMEOUT
        if password_secret:
            from abalone.aws import secret_login

            user, password = secret_login(password_secret)
            # The driver's own arguments: the URL (which Optuna and logs may show) stays clean.
            connect_args.update(password=password, **({"user": user} if user else {}))
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args}
        heartbeat: dict[str, Any] = {}
        if stale_after:
            heartbeat = {"heartbeat_interval": heartbeat_interval(stale_after),
                         "grace_period": int(stale_after), "heartbeat_stale_trial_callback": RETRY}
        # Processes starting at once may race to create Optuna's tables; the loser retries.
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs, **heartbeat)
            except ImportError as err:  # Optuna's, for SQLAlchemy's dialect without its driver
                missing = getattr(err.__cause__ or err.__context__, "name", None) or "its driver"
                extra = " (pip install 'abalone[postgres]')" if missing == "psycopg2" else ""
                raise StorageError(f"cannot open the Optuna storage {redact(storage)} (config "
                                   f"key hydra.sweeper.storage): its database driver {missing} "
                                   f"is not installed{extra}") from None
            except sqlalchemy.exc.OperationalError as err:  # cannot connect: no use retrying
                raise StorageError(f"cannot open the Optuna storage {redact(storage)} (config "
                                   f"key hydra.sweeper.storage): {_first_line(err, storage)}"
                                   ) from None
            except Exception:  # sqlalchemy's IntegrityError/ProgrammingError, among others
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
    path = Path(storage).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(Journal(str(path.resolve())))


def _first_line(error: Exception, storage: str) -> str:
    """The driver's reason (psycopg2's first line), with any password in the URL masked."""
    lines = str(getattr(error, "orig", None) or error).strip().splitlines() or [type(error).__name__]
    password = urlsplit(storage).password
    return lines[0].replace(password, "***") if password else lines[0]


def grpc_proxy(storage: str) -> optuna.storages.BaseStorage:
    """A client of Optuna's gRPC storage proxy (`python -m abalone.storage_proxy`), which fails in
    seconds when no proxy answers: gRPC calls would otherwise fail one by one mid-sweep."""
    address = urlsplit(storage)
    try:
        host, port = address.hostname, address.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or not port or address.path.strip("/"):
        raise ConfigError(f"hydra.sweeper.storage={storage}: a storage proxy's address is "
                          "grpc://HOST:PORT")
    proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=CONNECT_TIMEOUT)
    except ConnectionError:
        proxy.close()
        raise ConfigError(f"hydra.sweeper.storage={storage}: no Optuna storage proxy answered "
                          f"within {CONNECT_TIMEOUT} s; start one with `python -m "
                          f"abalone.storage_proxy DATABASE_URL --port {port}`") from None
    return proxy
