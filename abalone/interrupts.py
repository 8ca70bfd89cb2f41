"""How a command stops when told to: Ctrl-C (SIGINT), SIGTERM (SLURM, Kubernetes, `docker stop`,
a spot interruption) and SIGHUP (an ssh session dropping) all stop it as Ctrl-C does, with a
KeyboardInterrupt in the main thread, and exit 128 + the signal's number (130, 143, 129).

- Events a block registers (`remembered`) are set as well: Python loses a KeyboardInterrupt that
  lands inside a finalizer (TensorFlow's objects have many), and TensorFlow may raise an error of
  its own instead, so the training run and a sweep's loop still know.
- Within `deferred()` (a write to the study's journal, a model's registration) the interrupt
  waits for the block's end: Optuna's journal lock, interrupted while it waits, removes the lock
  another process holds, and an interrupted write leaves half a line.
- A second signal while the first one's shutdown runs leaves at once (after the deferred block
  in hand, milliseconds), with one line.
- A sweep's worker process (`abalone.workers.LocalWorkers`) watches a pipe from the process that
  started it: when that process writes to it (to stop the workers) or is gone (killed: the pipe
  closes), the worker stops as on SIGTERM, so no worker outlives its sweep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The read end of the pipe a worker process watches (abalone.workers.LocalWorkers).
PARENT_PIPE_ENV = "ABALONE_PARENT_PIPE"


class _State:
    received: int | None = None  # the first signal's number
    reason: str | None = None  # why, when it was not a person's signal (the parent is gone)
    requested = False  # the next SIGTERM is the watcher's, not a person's
    events: list[threading.Event] = []
    deferring = 0  # depth of `deferred` blocks in the main thread
    pending = False  # an interrupt waits for the deferred block's end
    leave: int | None = None  # a second signal came during a deferred block


STATE = _State()


def say(line: str) -> None:
    """One line on stderr, if there still is one (after SIGHUP the terminal may be gone)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def cause() -> str:
    """What stopped the process, as lines and run notes say it: Ctrl-C, SIGTERM, SIGHUP, or why
    a worker was stopped."""
    if STATE.reason:
        return STATE.reason
    return _name(STATE.received or signal.SIGINT)


def _name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def by() -> str:
    """What stopped the process, for its last line: "interrupted{by()}: ..." reads
    "interrupted: ..." for Ctrl-C, "interrupted by SIGTERM: ...", or a worker's reason."""
    if STATE.reason:
        return f" ({STATE.reason})"
    return "" if cause() == "Ctrl-C" else f" by {cause()}"


def exit_code() -> int:
    return 128 + (STATE.received or signal.SIGINT)


def _leave_now(signum: int) -> None:
    say(f"interrupted again ({_name(signum)}): leaving at once; a trial or run left RUNNING is "
        "ended by the next command")
    os._exit(128 + signum)


def _on_signal(signum: int, frame) -> None:
    requested, STATE.requested = STATE.requested, False
    if STATE.received is not None:
        if requested:  # the watcher's, after a signal of our own: already stopping
            return
        if STATE.deferring:
            STATE.leave = signum
            return
        _leave_now(signum)
    STATE.received = signum
    for event in STATE.events:
        event.set()
    if STATE.deferring:
        STATE.pending = True
        return
    raise KeyboardInterrupt


def install() -> dict[int, object]:
    """Handle SIGINT, SIGTERM and SIGHUP as above (in the main thread); returns the handlers
    they had."""
    return {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}


@contextlib.contextmanager
def remembered(interrupted: threading.Event) -> Iterator[threading.Event]:
    """Within the block a signal also sets `interrupted` (at once, if one came already)."""
    previous = install()
    STATE.events.append(interrupted)
    if STATE.received is not None:
        interrupted.set()
    try:
        yield interrupted
    finally:
        STATE.events.remove(interrupted)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal in the block stops the process at the block's end, not within it. Only the main
    thread gets signals: elsewhere the block is plain."""
    if not _in_main_thread():
        yield
        return
    STATE.deferring += 1
    try:
        yield
    finally:
        STATE.deferring -= 1
        if not STATE.deferring:
            if STATE.leave is not None:
                _leave_now(STATE.leave)
            if STATE.pending:
                STATE.pending = False
                raise KeyboardInterrupt


def received() -> bool:
    """Whether a signal has come (it may still wait for a deferred block's end)."""
    return STATE.received is not None


def watch_parent() -> None:
    """In a worker process started with `PARENT_PIPE_ENV`: stop as on SIGTERM once the process
    that started it asks (writes to the pipe) or is gone (the pipe closes)."""
    fd = os.environ.pop(PARENT_PIPE_ENV, None)
    if fd is None:
        return
    parent = os.getppid()

    def wait() -> None:
        try:
            asked = os.read(int(fd), 1)  # a byte: asked to stop; end of file: the parent is gone
        except OSError:
            asked = b""
        if STATE.received is not None:
            return
        STATE.reason = ("stopped by its sweep command" if asked
                        else f"its sweep command, pid {parent}, is gone")
        STATE.requested = True
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, daemon=True, name="parent watch").start()
