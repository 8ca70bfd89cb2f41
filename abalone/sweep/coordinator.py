"""Starting, following and stopping a sweep's workers (`workers=local|container|sagemaker`):
the command gives each worker its own command line for the same study and the parent run, shows a
line of progress whenever the study changes, and fails the trials of workers that are gone."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from abalone.config import AbaloneError
from abalone.sweep import report, slots
from abalone.sweep.state import SweepState
from abalone.trial import PARENT_ENV
from abalone.workers import LocalWorkers, Workers, check_remote, thread_share

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 2.0  # how often the coordinator of remote workers looks at the study
# The user's command line minus what each worker gets its own value of.
REPLACED = ("hydra.sweeper.n_jobs=", "hydra.sweeper.study_name=", "hydra.sweeper.storage=",
            "hydra.sweep.dir=")


def make_workers(config: DictConfig, settings: DictConfig, base: DictConfig,
                 is_worker: bool) -> tuple[str, Workers]:
    """The option of `workers=...` and its object; remote ones need a storage and tracking
    they reach. A worker process runs trials only: it starts no workers of its own."""
    # For ${hydra:...} in the workers' settings (the launcher sets it only for each job).
    HydraConfig.instance().set_config(config)
    choice = config.hydra.runtime.choices.get("workers", "local")
    if is_worker:
        return choice, LocalWorkers(0)
    workers = instantiate(base.workers)
    if workers.remote:
        check_remote(choice, settings.storage, base.tracking)
    else:
        workers.count = settings.n_jobs - 1
    return choice, workers


def worker_argv(argv: list[str], study_name: str, storage: str,
                sweep_dir: Path | None) -> list[str]:
    """The user's command for one worker process: this study in this storage, its trials in the
    worker's own process. Local workers (`sweep_dir` given) share the command's sweep folder."""
    kept = [a for a in argv if not a.startswith(REPLACED)
            and not a.lstrip("+~").startswith(("workers=", "workers."))]
    quoted = storage.replace("\\", "\\\\").replace("'", "\\'")
    kept += ["workers=local", "hydra.sweeper.n_jobs=1", f"hydra.sweeper.study_name={study_name}",
             f"hydra.sweeper.storage='{quoted}'"]
    if sweep_dir is not None:
        kept.append(f"hydra.sweep.dir={sweep_dir.resolve()}")
    return kept


def start_workers(sweep: SweepState, workers: Workers, choice: str) -> None:
    # A trial a dead process left RUNNING holds its slot until it is failed and queued again:
    # fail it first, or a rerun whose only unfinished trial is one starts no workers.
    slots.fail_stale_trials(sweep.study, sweep.settings.stale_after, sweep.end_stale_run)
    if not workers.count or not slots.work_left(sweep.study, sweep.plan.n_trials):
        return  # a finished study needs no workers (each SageMaker job bills its start-up)
    if not workers.remote:  # before TensorFlow loads here; the processes inherit it
        for name, threads in thread_share(sweep.settings.n_jobs).items():
            os.environ.setdefault(name, threads)
    argv = worker_argv(sys.argv[1:], sweep.plan.study_name, sweep.settings.storage,
                       None if workers.remote else sweep.sweep_dir)
    workers.start(argv, {PARENT_ENV: sweep.parent_run_id or ""})
    log.info("started %d %s", workers.count, f"{choice} workers"
             if workers.remote else "more trial processes")


def progress(sweep: SweepState, states: dict[str, str]) -> str:
    count = Counter(t.state.name for t in sweep.study.get_trials(deepcopy=False)
                    if not t.user_attrs.get("surplus"))
    running = sum(state == "running" for state in states.values())
    return (f"trials of {sweep.plan.n_trials}: {count['COMPLETE']} complete, {count['PRUNED']} "
            f"pruned, {count['FAIL']} failed, {count['RUNNING']} running; "
            f"{report.best_text(sweep.plan, *report.best(sweep))}; workers running: {running} "
            f"of {len(states)}")


def follow_workers(sweep: SweepState, workers: Workers) -> None:
    """Until every remote worker has ended: fail the trials of workers that are gone, and show a
    line of progress whenever it changes."""
    shown = None
    while True:
        states = workers.poll()
        slots.fail_stale_trials(sweep.study, sweep.settings.stale_after, sweep.end_stale_run)
        line = progress(sweep, states)
        if line != shown:
            log.info("%s", line)
            shown = line
        if "running" not in states.values():
            break
        time.sleep(PROGRESS_SECONDS)
    trials = sweep.study.get_trials(deepcopy=False)
    unfinished = [t.number for t in trials if t.state.name in ("RUNNING", "WAITING")]
    if slots.work_left(sweep.study, sweep.plan.n_trials) or unfinished:
        failed = [f"{name} {state}" for name, state in states.items() if state != "finished"]
        raise AbaloneError(
            f"the workers have ended before study {sweep.plan.study_name!r} was complete ("
            f"{slots.finished_count(sweep.study)} of {sweep.plan.n_trials} trials finished, "
            f"trials {unfinished} unfinished); {'; '.join(failed) or 'none failed'}; their "
            f"logs: {workers.logs}. Rerun the same command to resume the study"
            + (f"; a RUNNING trial whose worker is gone is retried once its heartbeat is "
               f"hydra.sweeper.stale_after={sweep.settings.stale_after} s old"
               if unfinished else "") + ".")
