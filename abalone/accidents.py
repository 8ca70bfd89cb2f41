"""What a machine does to a command that is not the command's own error: a full disk (`ENOSPC`,
a quota's `EDQUOT`, SQLite's "database or disk is full"), recognised in an exception's chain and
named by the file or folder it stopped; and whether the process that left a record is gone
(`process_alive`, by host, PID namespace and pid)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from typing import Iterator

FULL = (errno.ENOSPC, errno.EDQUOT)
SQLITE_FULL = "database or disk is full"
NEARLY_FULL = 1 << 20  # bytes free below which a folder's disk counts as full
HOST = socket.gethostname()


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        return ""


# Pids compare only within one PID namespace: containers on one host share its name (host
# network) but each has pids of its own.
PID_NAMESPACE = _pid_namespace()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then its causes and contexts, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _full_folder(folders: list[str]) -> str | None:
    for folder in folders:
        try:
            if shutil.disk_usage(folder).free < NEARLY_FULL:
                return folder
        except OSError:
            continue
    return None


def disk_full(error: BaseException, sqlite_file: str | None = None,
              folders: tuple[str, ...] = ()) -> str | None:
    """What a full disk stopped, if `error`'s chain says one did: "writing FILE" (the file the
    error names, or `sqlite_file` for SQLite's error), or "writing under FOLDER" (the first of
    `folders`, then the working folder, whose disk is full); None if none did."""
    for link in chain(error):
        if isinstance(link, OSError) and link.errno in FULL:
            if link.filename:
                return f"writing {link.filename}"
            break
        if SQLITE_FULL in str(link):
            return f"writing {sqlite_file or 'a SQLite database'}"
    else:
        return None
    folder = _full_folder([*folders, os.getcwd()])
    return f"writing under {folder}" if folder else "writing a file"


def disk_full_line(error: BaseException, sqlite_file: str | None = None,
                   folders: tuple[str, ...] = ()) -> str | None:
    """The `error:` line's text for a full disk, or None."""
    where = disk_full(error, sqlite_file, folders)
    if where is None:
        return None
    return (f"no space left on the device ({where}); free space, then run the same command "
            "again: it ends FAILED any run this one could not end")
