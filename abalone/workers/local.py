"""`workers=local`: today's `hydra.sweeper.n_jobs` processes on this machine; the command runs
trials too."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from abalone.interrupts import PARENT_PIPE_ENV
from abalone.trial import RANK_ENV
from abalone.workers.base import exit_status

# Seconds the processes get to end their trials once asked (as on Ctrl-C); then SIGTERM, which
# ends one at once, and 3 s later SIGKILL: a sweep stops within 20 s.
STOP_SECONDS = 12.0


class LocalWorkers:
    """`count` more processes of the sweep command on this machine (`hydra.sweeper.n_jobs - 1`);
    their output goes to this terminal, and Ctrl-C reaches them with the command's. Each watches
    a pipe from this process (abalone.interrupts.watch_parent): a byte written to it stops one,
    and so does this process's end, however it ends (SIGKILL too), so none outlives the sweep."""

    remote = False
    logs = "the terminal"

    def __init__(self, count: int = 0):
        self.count = count
        self.processes: dict[str, subprocess.Popen] = {}
        self.pipe: int | None = None  # the write end the processes watch

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        read, self.pipe = os.pipe()
        for rank in range(1, self.count + 1):
            self.processes[f"process {rank}"] = subprocess.Popen(
                [sys.executable, "-m", "abalone.train", *argv], pass_fds=(read,),
                env={**os.environ, **env, RANK_ENV: str(rank), PARENT_PIPE_ENV: str(read)})
        os.close(read)

    def poll(self) -> dict[str, str]:
        return {name: exit_status(p.poll(), None) for name, p in self.processes.items()}

    def wait(self) -> None:
        for process in self.processes.values():
            process.wait()

    def stop(self) -> None:
        if self.pipe is not None:  # each ends its trial as on Ctrl-C
            with contextlib.suppress(OSError):  # none left to read it
                os.write(self.pipe, b"s" * len(self.processes))
            os.close(self.pipe)
            self.pipe = None
        for signal_them, seconds in ((None, STOP_SECONDS), ("terminate", 3.0), ("kill", 3.0)):
            running = [p for p in self.processes.values() if p.poll() is None]
            for process in running:
                if signal_them:
                    getattr(process, signal_them)()
            deadline = time.monotonic() + seconds
            for process in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
