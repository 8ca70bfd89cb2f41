"""A Hydra launcher that stands in for training, so that worker processes of the real sweep
command (`python -m abalone.train -m ...`, abalone/sweep/loop.py's trial loop: storage, slots,
stale-trial check, owner attributes, heartbeat thread, pruner, the trial's line) run cheap trials
against one study. The `fleet_storage` section (scripts/bench/fleet_storage.py) selects it with
`hydra.launcher._target_=hydra_plugins.abalone_bench.simulated_launcher.SimulatedLauncher
+hydra.launcher.folder=DIR +hydra.launcher.epoch_seconds=S`; scripts/ is on the workers'
PYTHONPATH.

A trial is `trainer.epochs` epochs of `epoch_seconds` of sleep, each reported to the study's
pruner as KerasPruningCallback reports a real epoch (trial.report, trial.should_prune). The
launcher times, on the sweeper's thread: "start" (from the start signal to the first trial:
Hydra's sweep config, the data check, opening the study, the first ask), "between_trials" (from
one trial's end to the next one's start: tell, the trial's line with the best so far, the
stale-trial check, the slot checks, ask, owner attributes) and "report" (one epoch's report and
pruning check). It writes them, its trial count and its CPU seconds to DIR/worker-RANK.json at
exit.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import resource
import time
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

SPANS = ("start", "between_trials", "report")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SimulatedLauncher(Launcher):
    def __init__(self, folder: str, epoch_seconds: float) -> None:
        self.folder, self.epoch_seconds = Path(folder), float(epoch_seconds)
        from abalone.trial import RANK_ENV

        self.rank = os.environ[RANK_ENV]
        self.spans: dict[str, list[float]] = {name: [] for name in SPANS}
        self.trials = 0

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.epochs = config.trainer.epochs
        import abalone.sweep.loop  # noqa: F401 - the sweep's imports, before the start signal
        # Imports are done: say so, and start with the others when the benchmark says go.
        (self.folder / f"ready-{self.rank}").touch()
        while not (self.folder / "go").exists():
            time.sleep(0.01)
        self.cpu_start, self.last_end = cpu_seconds(), time.perf_counter()
        atexit.register(self.write_results)

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        begin = time.perf_counter()
        self.spans["between_trials" if self.trials else "start"].append(begin - self.last_end)
        import optuna

        from abalone.trial import ACTIVE_TRIAL

        context = ACTIVE_TRIAL.get()
        quality = random.Random(context.trial.number).random()
        status, value = JobStatus.COMPLETED, None
        for epoch in range(self.epochs):
            time.sleep(self.epoch_seconds)
            value = 2 + quality + 1 / (epoch + 1)
            start = time.perf_counter()
            context.trial.report(value, epoch)
            pruned = context.trial.should_prune()
            self.spans["report"].append(time.perf_counter() - start)
            if pruned:  # as abalone.run's trial raises it (abalone.sweep.launchers.job_outcome)
                status = JobStatus.FAILED
                value = optuna.TrialPruned(f"pruned at epoch {epoch + 1}")
                break
        if status is JobStatus.COMPLETED:
            value = {name: value for name in (context.metric, *context.measures)}
        self.trials += 1
        self.last_end = time.perf_counter()
        return [JobReturn(overrides=list(job_overrides[0]), status=status,
                          _return_value=value)]

    def write_results(self) -> None:
        (self.folder / f"worker-{self.rank}.json").write_text(json.dumps({
            "spans": self.spans, "trials": self.trials,
            "cpu_seconds": cpu_seconds() - self.cpu_start}))
