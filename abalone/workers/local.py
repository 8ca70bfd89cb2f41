"""`workers=local`: today's `hydra.sweeper.n_jobs` processes on this machine; the command runs
trials too."""

from __future__ import annotations

import os
import subprocess
import sys

from abalone.trial import RANK_ENV
from abalone.workers.base import exit_status


class LocalWorkers:
    """`count` more processes of the sweep command on this machine (`hydra.sweeper.n_jobs - 1`);
    their output goes to this terminal, and Ctrl-C reaches them with the command's."""

    remote = False
    logs = "the terminal"

    def __init__(self, count: int = 0):
        self.count = count
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        for rank in range(1, self.count + 1):
            self.processes[f"process {rank}"] = subprocess.Popen(
                [sys.executable, "-m", "abalone.train", *argv],
                env={**os.environ, **env, RANK_ENV: str(rank)})

    def poll(self) -> dict[str, str]:
        return {name: exit_status(p.poll(), None) for name, p in self.processes.items()}

    def wait(self) -> None:
        for process in self.processes.values():
            process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        self.wait()
