"""The study's journal file: Optuna's `JournalFileBackend`, safe against the ends a file meets.

- **A torn last line** (a crash or a full disk mid-write): Optuna's reader skips a last line
  without its newline, and its writer appends right after it, so the half line and the next one
  become one line that never parses: the journal is then corrupt in the middle for every later
  reader. Here every write first looks at the file's end, under the journal's lock (no other
  writer is mid-line then): a torn tail is cut after a copy of the whole file is kept beside it
  (`<journal>.torn-<time>`); if that copy cannot be written (the disk is still full), the write is
  refused with what to do. Nothing is ever written after a partial line.
- **A signal** waits until a write and its lock are done (`abalone.interrupts.deferred`):
  Optuna's lock, interrupted while it waits, removes the lock another process holds.
- **A line that does not parse** in the middle (a journal torn before this check existed) stops
  the command naming the file and the line, instead of a JSONDecodeError traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Iterator

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file

from abalone import interrupts
from abalone.config import AbaloneError

log = logging.getLogger(__name__)


class JournalError(AbaloneError):
    """The journal cannot be read or safely written; the message names it and what to do."""


def _start_of_last_line(path: str, size: int) -> int:
    """The offset just after the file's last newline (0 if it has none)."""
    with open(path, "rb") as f:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


def cut_torn_tail(path: str) -> None:
    """Cut a last line without its newline, after copying the whole file beside it. Call it
    holding the journal's lock."""
    size = os.path.getsize(path)
    if size == 0:
        return
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
    keep = _start_of_last_line(path, size)
    backup = f"{path}.torn-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        shutil.copyfile(path, backup)
    except OSError as err:
        if os.path.exists(backup):
            os.unlink(backup)
        raise JournalError(
            f"the study journal {path} ends in half a line ({size - keep} bytes: a crash or a "
            f"full disk mid-write), and no copy of it could be kept before cutting that line "
            f"({err.strerror}); free space and run the same command again, or cut the line "
            f"yourself: truncate -s {keep} {path}") from None
    os.truncate(path, keep)
    log.warning("the study journal %s ended in half a line (%d bytes: a crash or a full disk "
                "mid-write): the line was cut, the whole file kept as %s", path, size - keep,
                backup)


class Journal(JournalFileBackend):
    """Optuna's journal file backend, with the checks above."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with interrupts.deferred(), get_lock_file(self._lock):
            cut_torn_tail(self._file_path)
            lines = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
            with open(self._file_path, "ab") as f:
                f.write(lines.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        number = log_number_from
        try:
            for entry in super().read_logs(log_number_from):
                number += 1
                yield entry
        except ValueError as err:  # JSONDecodeError among them
            raise JournalError(
                f"the study journal {self._file_path} is corrupt at line {number + 1} "
                f"({err}); the lines before it are intact: restore a copy of the file, or keep "
                f"only those lines (head -n {number} FILE > FIXED) and rerun") from None
