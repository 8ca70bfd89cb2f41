"""The Hydra launchers a sweep runs its trials with, and how a trial reaches a job that runs in
another process or on another host.

The default launcher (and the benchmark's) runs each trial in the sweeping process, which hands
the run its `abalone.trial.TrialContext` in memory. joblib (`hydra/launcher=joblib`, processes on
this machine) and submitit's SLURM launcher (`hydra/launcher=submitit_slurm`, jobs on a cluster)
run a batch of trials in other processes: each job gets its trial as a Hydra override,
`hydra.job.env_set.ABALONE_TRIAL=...`, which Hydra's `run_job` turns into an environment
variable inside the job, whatever launcher ran it; `abalone.train` then rebuilds the context from
the shared study (abalone.trial_job). Any other launcher is refused before the study or the parent
run exists: we have not seen its jobs through, and a job that does not get its trial would train
and register as a plain run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from abalone.config import AbaloneError, ConfigError
from abalone.redact import redact
from abalone.study.storage import heartbeat_interval
from abalone.study.trials import model_check
from abalone.sweep import slots
from abalone.sweep.state import LauncherKind, SweepState
from abalone.tracking import sweep_runs
from abalone.tracking.store import local_store
from abalone.trial import ACTIVE_TRIAL, TrialContext
from abalone.trial_job import OUTCOME, SLURM_JOB, trial_override

log = logging.getLogger(__name__)


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# By class path: every launcher our tests run a sweep through.
TESTED = {
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher":
        LauncherKind("basic", in_process=True, same_machine=True),
    # scripts/hydra_plugins/abalone_bench: the benchmark's own, reading ACTIVE_TRIAL in-process
    "hydra_plugins.abalone_bench.simulated_launcher.SimulatedLauncher":
        LauncherKind("simulated (benchmark)", in_process=True, same_machine=True),
    "hydra_plugins.abalone_bench.phase_timing_launcher.PhaseTimingLauncher":
        LauncherKind("phase timing (benchmark)", in_process=True, same_machine=True),
    JOBLIB: LauncherKind("joblib", in_process=False, same_machine=True),
    SLURM: LauncherKind("submitit_slurm", in_process=False, same_machine=False),
}
INSTEAD = ("use hydra/launcher=basic (the default: trials in this process, hydra.sweeper.n_jobs "
           "for more), joblib (processes on this machine), submitit_slurm (a SLURM cluster), "
           "or workers=container|sagemaker")


def check_launcher(launcher, launcher_cfg: DictConfig, settings: DictConfig,
                   tracking_cfg: DictConfig) -> LauncherKind:
    """The launcher's kind, or a ConfigError naming it and what to use instead: an untested
    launcher, extra sweep processes beside one that runs its own, or a storage or MLflow store
    its jobs cannot reach."""
    target = f"{type(launcher).__module__}.{type(launcher).__qualname__}"
    kind = TESTED.get(target)
    if kind is None:
        raise ConfigError(f"hydra.launcher._target_={launcher_cfg.get('_target_', target)} is a "
                          f"launcher this sweeper has not been tested with (its jobs may not get "
                          f"their trial, and would train and register as plain runs); {INSTEAD}")
    if kind.in_process:
        return kind
    if settings.n_jobs != 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={settings.n_jobs} with hydra/launcher="
                          f"{kind.name}: the launcher runs the trials at once itself; set "
                          f"{'hydra.launcher.n_jobs' if target == JOBLIB else 'hydra.launcher.array_parallelism'}"
                          " instead and leave hydra.sweeper.n_jobs=1")
    if not kind.same_machine:
        _check_shared(kind, launcher_cfg, settings.storage, tracking_cfg)
    return kind


def _check_shared(kind: LauncherKind, launcher_cfg: DictConfig, storage: str,
                  tracking_cfg: DictConfig) -> None:
    """A cluster's jobs reach a database or a storage proxy, or a journal file on the folder
    submitit itself shares with them (its `submitit_folder` must be on a shared file system, or
    no job would start); SQLite is refused (its locks are unsafe on network file systems), and
    so is an MLflow store in a file (jobs write runs at once): use an MLflow server."""
    if storage.startswith("sqlite:"):
        raise ConfigError(f"hydra.sweeper.storage={redact(storage)} is SQLite, which jobs of "
                          f"hydra/launcher={kind.name} on other hosts cannot share safely; use "
                          "PostgreSQL (hydra.sweeper.storage=postgresql+psycopg2://USER@HOST/DB) "
                          "or a journal file on the cluster's shared file system")
    if "://" not in storage:
        folder = str(launcher_cfg.submitit_folder).replace("%j", "")
        if _device(storage) != _device(folder):
            raise ConfigError(
                f"hydra.sweeper.storage={storage} is not on the file system of "
                f"hydra.launcher.submitit_folder={launcher_cfg.submitit_folder}, the folder the "
                f"cluster's nodes share with this one; put the journal file there or use "
                "PostgreSQL (hydra.sweeper.storage=postgresql+psycopg2://USER@HOST/DB)")
    uri = local_store(tracking_cfg)
    if uri is not None:
        raise ConfigError(f"tracking.uri={redact(uri)} is a store in a file, which jobs of "
                          f"hydra/launcher={kind.name} on other hosts cannot write to at once; "
                          "use an MLflow server they reach (tracking=server "
                          "tracking.uri=http://HOST:5000) or tracking.enabled=false")


def _device(path: str) -> int:
    """The file system a path is (or would be created) on."""
    existing = Path(path).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    return os.stat(existing).st_dev


def batch_size(launcher_cfg: DictConfig) -> int:
    """How many trials the launcher runs at once, so the sweep asks that many."""
    target = launcher_cfg._target_
    if target == JOBLIB:
        n_jobs = int(launcher_cfg.n_jobs)  # joblib's rule: -1 every core, -2 all but one, ...
        return max(1, n_jobs if n_jobs > 0 else (os.cpu_count() or 1) + 1 + n_jobs)
    if target == SLURM:
        return max(1, int(launcher_cfg.array_parallelism))
    return 1


def launch(sweep: SweepState, trials: list[optuna.Trial],
           overrides: list[list[str]]) -> tuple[list, str | None]:
    """The launcher's job of each trial (None for one it lost) while this process beats for
    them, and why the launcher lost any (None if it lost none). A Ctrl-C fails each trial still
    running and queues its parameters again."""
    if sweep.launcher_kind.in_process:
        return [_launch_here(sweep, trials[0], overrides[0])], None
    return _launch_jobs(sweep, trials, overrides)


def _launch_here(sweep: SweepState, trial: optuna.Trial, overrides: list[str]):
    """The trial's training run in this process, handed its context in memory (ACTIVE_TRIAL)."""
    context = TrialContext(
        trial, sweep.parent_run_id, sweep.plan.study_name, sweep.plan.metrics[0],
        sweep.interrupted, sweep.plan.measures, sweep.plan.prune,
        logs_model=model_check(sweep.study, sweep.plan.log_models == "all"))
    token = ACTIVE_TRIAL.set(context)
    try:
        with slots.Heartbeat(sweep.study, trial, heartbeat_interval(sweep.settings.stale_after)):
            (job,) = sweep.launcher.launch([overrides], initial_job_idx=trial.number)
    except KeyboardInterrupt:
        slots.fail_and_retry(sweep.study, trial)
        raise
    finally:
        ACTIVE_TRIAL.reset(token)
    if sweep.interrupted.is_set() and job.status is not JobStatus.COMPLETED:
        slots.fail_and_retry(sweep.study, trial)  # as above: the error a Ctrl-C became
        raise KeyboardInterrupt
    return job


def _launch_jobs(sweep: SweepState, trials: list[optuna.Trial],
                 overrides: list[list[str]]) -> tuple[list, str | None]:
    """A batch of trials as jobs in other processes (joblib, SLURM), each handed its trial
    through its overrides (abalone.trial_job). This process owns the trials and beats for them
    while their jobs run, so a sweep that dies leaves them stale, failed and retried on resume.
    submitit gives up on the batch at its first lost job (scancel, a node's failure, the time
    limit): the batch's other jobs are waited for, and each trial ends as its job recorded."""
    jobs_overrides = [[*trial_overrides, _job_override(sweep, trial)]
                      for trial, trial_overrides in zip(trials, overrides)]
    reason = None
    interval = heartbeat_interval(sweep.settings.stale_after)
    beats = [slots.Heartbeat(sweep.study, trial, interval).__enter__() for trial in trials]
    try:
        try:
            jobs = _launcher_jobs(sweep, trials, jobs_overrides)
        except Exception as err:  # noqa: BLE001 - the launcher lost a job; see job_outcome
            log.debug("the launcher lost a job", exc_info=True)
            jobs = [None] * len(trials)
            # submitit's message goes on with the job's whole error stream: its first sentence.
            reason = " ".join(f"{type(err).__name__}: {err}".split("Error stream")[0].split())
            _wait_for_running_jobs(sweep.study, trials)
    except KeyboardInterrupt:
        for trial in trials:
            if sweep.study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                slots.fail_and_retry(sweep.study, trial)
        raise
    finally:
        for beat in beats:
            beat.__exit__()
    return jobs, reason


def _job_override(sweep: SweepState, trial: optuna.Trial) -> str:
    storage = sweep.settings.storage  # a journal file by its absolute path: jobs' folders differ
    storage = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    return trial_override({
        "study_name": sweep.plan.study_name, "storage": storage,
        "storage_password_secret": sweep.settings.storage_password_secret,
        "trial_id": trial._trial_id, "trial_number": trial.number,
        "parent_run_id": sweep.parent_run_id, "metric": sweep.plan.metrics[0],
        "measures": list(sweep.plan.measures), "prune": sweep.plan.prune,
        "pruner": OmegaConf.to_container(sweep.settings.pruner, resolve=True),
        "log_models": str(sweep.plan.log_models)})


class Outcome(NamedTuple):
    """How a trial's job ended: what it measured or the error it raised, and whether its trial
    was already failed and queued again (a job lost without a result)."""

    measured: dict[str, float] | None
    error: BaseException | None
    queued_again: bool = False


def job_outcome(sweep: SweepState, trial: optuna.Trial, job, lost: str | None) -> Outcome:
    """The job's return value or error; for a job the launcher lost (`lost`: why), what it
    recorded on its trial before, or, if it recorded nothing, its trial failed and queued again
    and its run ended."""
    if job is not None and job.status is JobStatus.COMPLETED:
        return Outcome(job.return_value, None)  # {name: value} of trial.measures
    if job is not None:
        return Outcome(None, job._return_value)  # the exception the task raised
    outcome = sweep.study._storage.get_trial(trial._trial_id).user_attrs.get(OUTCOME)
    if outcome is None:
        slots.fail_and_retry(sweep.study, trial)
        run_id = sweep.study._storage.get_trial(trial._trial_id).user_attrs.get("mlflow_run_id")
        if sweep.client and run_id:  # the job could not end it
            sweep_runs.end_trial_runs(sweep.client, [run_id])
        return Outcome(None, RuntimeError(f"its job ended without a result ({lost[:300]}); "
                                          "queued again"), queued_again=True)
    error = (optuna.TrialPruned() if outcome["state"] == "PRUNED"
             else RuntimeError(outcome["error"]) if outcome["state"] == "FAIL" else None)
    return Outcome(outcome.get("measured"), error)


def check_lost(sweep: SweepState, queued_again: list[int], lost: str | None) -> None:
    """Stop the sweep if the launcher lost a job without a result (its trial is queued again);
    a warning if it lost jobs that had each recorded how they ended."""
    if queued_again:
        raise AbaloneError(
            f"hydra/launcher={sweep.launcher_kind.name} lost the job of trial(s) {queued_again} "
            f"(scancel, a node's failure or the time limit: {lost[:500]}); they were marked FAIL "
            "and their parameters queued again: rerun the same command to resume the study")
    if lost is not None:  # each job recorded how it ended: the study knows all
        log.warning("hydra/launcher=%s: %s; every trial of the batch had recorded its outcome",
                    sweep.launcher_kind.name, lost[:300])


class JobLeftQueue(Exception):
    """A trial's SLURM job is no longer queued and recorded no result."""


JOB_CHECK = 10.0  # seconds between the sweep's own looks at the SLURM queue


def _launcher_jobs(sweep: SweepState, trials: list[optuna.Trial],
                   jobs_overrides: list[list[str]]) -> list:
    """The launcher's jobs. submitit learns that a SLURM job ended without a result (scancel, a
    node's failure, the time limit) only from `sacct`, which fails on a cluster without
    accounting (no slurmdbd) and leaves it waiting forever; so beside it the sweep looks at the
    queue itself and gives up on the batch once a trial's job has been out of the queue without
    a result for `stale_after` seconds (submitit, with accounting, usually says so first)."""
    if sweep.launcher_kind is not TESTED[SLURM]:
        return sweep.launcher.launch(jobs_overrides, initial_job_idx=trials[0].number)
    done: dict[str, Any] = {}

    def launch() -> None:
        try:
            done["jobs"] = sweep.launcher.launch(jobs_overrides, initial_job_idx=trials[0].number)
        except Exception as err:  # noqa: BLE001 - raised again in the sweep's thread
            done["error"] = err

    # A daemon: left waiting on a lost job, it ends with the command.
    thread = threading.Thread(target=launch, daemon=True, name="submitit launch")
    thread.start()
    missing_since: dict[str, float] = {}
    while True:
        thread.join(JOB_CHECK)
        if not thread.is_alive():
            break
        jobs, queued = _unfinished_jobs(sweep.study, trials), _queued()
        if queued is None:  # squeue failed this time: no verdict
            continue
        now = time.monotonic()
        for number, job in jobs.items():
            if job in queued:
                missing_since.pop(job, None)
            elif now - missing_since.setdefault(job, now) >= sweep.settings.stale_after:
                raise JobLeftQueue(
                    f"SLURM job {job} of trial {number} left the queue without a result "
                    f"{sweep.settings.stale_after}s ago (hydra.sweeper.stale_after)")
    if "error" in done:
        raise done["error"]
    return done["jobs"]


def _unfinished_jobs(study: optuna.Study, trials: list[optuna.Trial]) -> dict[int, str]:
    """Trial number -> SLURM job id, of the trials whose job started and recorded no outcome."""
    jobs = {}
    for trial in trials:
        attrs = study._storage.get_trial(trial._trial_id).user_attrs
        if OUTCOME not in attrs and SLURM_JOB in attrs:
            jobs[trial.number] = attrs[SLURM_JOB]
    return jobs


def _queued() -> set[str] | None:
    """This user's SLURM jobs still pending, running or completing, as `squeue` (which needs no
    accounting) names them; None if it failed."""
    listed = subprocess.run(["squeue", "--me", "--noheader", "--format=%i"],
                            capture_output=True, text=True)
    return set(listed.stdout.split()) if listed.returncode == 0 else None


def _wait_for_running_jobs(study: optuna.Study, trials: list[optuna.Trial]) -> None:
    """Until no trial of the batch without a recorded outcome has a SLURM job still in the
    queue, so each of the batch's other trials ends as its job does rather than failed under a
    job that still trains. A job that has not started has not recorded its id: its trial is
    failed, and the job fails at its first report."""
    while True:
        jobs, queued = set(_unfinished_jobs(study, trials).values()), _queued()
        if not jobs or queued is None or not jobs & queued:
            return
        time.sleep(JOB_CHECK / 2)
