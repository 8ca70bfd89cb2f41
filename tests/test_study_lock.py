"""The study's lock (abalone/sweep/lock.py) for each kind of storage: a journal file and SQLite
lock a file beside them, PostgreSQL takes an advisory lock, and only a storage with none of its
own (the gRPC proxy) holds a marker study, quietly. None leaves a study behind, and a holder
killed with SIGKILL leaves no lock behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest

from abalone.sweep.lock import AdvisoryLock, FileLock, MarkerStudy, lock_for, study_lock
from conftest import REPO


def held_in_turn(storage) -> list[tuple[str, float]]:
    """Two threads take the same lock at once, the first holding it 0.5 s: (who, when) of each
    entry and exit, in order."""
    events: list[tuple[str, float]] = []
    first_in = threading.Event()

    def hold(who: str, seconds: float) -> None:
        with study_lock(storage, "s.parent-run"):
            events.append((f"{who} in", time.monotonic()))
            first_in.set()
            time.sleep(seconds)
            events.append((f"{who} out", time.monotonic()))

    first = threading.Thread(target=hold, args=("first", 0.5))
    first.start()
    first_in.wait(10)
    second = threading.Thread(target=hold, args=("second", 0.0))
    second.start()
    first.join(10)
    second.join(10)
    return events


def journal(tmp_path):
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal")))


@pytest.mark.parametrize("make", [journal, lambda tmp_path: optuna.storages.RDBStorage(
    f"sqlite:///{tmp_path}/study.db")], ids=["journal file", "sqlite"])
def test_a_file_storage_locks_a_file_beside_it_and_holds_no_study(make, tmp_path, caplog):
    storage = make(tmp_path)
    assert isinstance(lock_for(storage, "s.parent-run"), FileLock)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        events = held_in_turn(storage)
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert [e for e, _ in events] == ["first in", "first out", "second in", "second out"]
    assert optuna.get_all_study_summaries(storage) == []  # no marker study, ever
    assert "A new study created" not in caplog.text
    assert len(list(tmp_path.glob("study.*.locks/*.lock"))) == 1


def test_two_names_are_two_locks(tmp_path):
    storage = journal(tmp_path)
    with study_lock(storage, "a.registration"):
        with study_lock(storage, "a.starting-points"):  # not the same lock: no wait
            pass


def test_a_storage_without_a_lock_of_its_own_holds_a_quiet_marker_study(caplog):
    storage = optuna.storages.InMemoryStorage()
    assert isinstance(lock_for(storage, "s.parent-run"), MarkerStudy)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        with study_lock(storage, "s.parent-run"):
            assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [
                "s.parent-run.lock"]
        assert optuna.get_all_study_summaries(storage) == []
        optuna.create_study(study_name="s", storage=storage)  # a study's own line is kept
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert "name: s.parent-run.lock" not in caplog.text
    assert "A new study created in memory with name: s" in caplog.text
    events = held_in_turn(storage)
    assert [e for e, _ in events] == ["first in", "first out", "second in", "second out"]


def test_a_marker_left_by_a_dead_holder_is_broken_after_stale_after():
    storage = optuna.storages.InMemoryStorage()
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s.registration.lock")
    start = time.monotonic()
    with study_lock(storage, "s.registration", stale_after=0.5):
        assert time.monotonic() - start >= 0.5
    assert optuna.get_all_study_summaries(storage) == []


HOLD = """
import sys, time
from abalone.sweep.lock import study_lock
from abalone.study.storage import make_storage
with study_lock(make_storage(sys.argv[1]), "s.parent-run"):
    print("held", flush=True)
    time.sleep(600)
"""


def killed_holder_leaves_no_lock(storage_setting: str) -> float:
    """A process takes the lock and is killed with SIGKILL while it holds it: the seconds this
    process then takes to get the lock."""
    from abalone.study.storage import make_storage

    holder = subprocess.Popen([sys.executable, "-c", HOLD, storage_setting], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        storage = make_storage(storage_setting)
        got = threading.Event()
        waiter = threading.Thread(target=lambda: [study_lock(storage, "s.parent-run").__enter__(),
                                                  got.set()], daemon=True)
        waiter.start()
        assert not got.wait(1.0)  # held by the other process
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        start = time.monotonic()
        assert got.wait(20), "the lock of a killed holder was never released"
        return time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_killed_holder_of_a_journal_file_lock_leaves_none_behind(tmp_path):
    assert killed_holder_leaves_no_lock(str(tmp_path / "study.journal")) < 2.0


@pytest.mark.slow
@pytest.mark.postgres
def test_postgresql_locks_with_an_advisory_lock_its_killed_holder_loses(postgres_url):
    from abalone.study.storage import make_storage

    storage = make_storage(postgres_url)
    assert isinstance(lock_for(storage, "s.parent-run"), AdvisoryLock)
    events = held_in_turn(storage)
    assert [e for e, _ in events] == ["first in", "first out", "second in", "second out"]
    assert optuna.get_all_study_summaries(storage) == []
    # The server ends a killed holder's session, and its lock with it: no stale time to wait.
    assert killed_holder_leaves_no_lock(postgres_url) < 2.0
