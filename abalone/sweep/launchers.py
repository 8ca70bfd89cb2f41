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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from abalone.config import AbaloneError, ConfigError
from abalone.redact import redact
from abalone.study.storage import heartbeat_interval
from abalone.sweep import report, slots, space
from abalone.tracking import sweep_runs
from abalone.trial_job import OUTCOME, SLURM_JOB, trial_override

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LauncherKind:
    name: str  # as the user selects it: hydra/launcher=NAME
    in_process: bool  # the trial runs in the sweeping process (the context travels in memory)
    same_machine: bool  # its jobs run on this machine (file storages and MLflow stores work)


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
    uri = tracking_cfg.uri or ""
    if tracking_cfg.enabled and not (tracking_cfg.arn or tracking_cfg.server_name) and (
            "://" not in uri or uri.startswith(("sqlite:", "file:"))):
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


def run_batch(sweep, trials: list[optuna.Trial]) -> list[str]:
    """Launch a batch of trials as jobs in other processes (joblib, SLURM), each handed its
    trial through its overrides (abalone.trial_job), and tell the study how each
    ended. This process owns the trials and beats for them while their jobs run, so a sweep
    that dies leaves them stale, failed and retried on resume; a job lost with its result
    (scancel, a node's failure, the time limit) fails its trial, queues its parameters again and
    stops the sweep once the batch's other jobs have ended."""
    jobs_overrides = []
    storage = sweep.settings.storage  # a journal file by its absolute path: jobs' folders differ
    storage = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    for trial in trials:
        slots.mark_owner(trial)
        extra = sweep.conditional_overrides(trial) if sweep.plan.custom_space else {}
        swept = {k: v for k, v in trial.params.items() if k in sweep.plan.space}
        jobs_overrides.append([
            *sweep.plan.fixed, *space.trial_overrides({**swept, **extra}),
            trial_override({
                "study_name": sweep.plan.study_name, "storage": storage,
                "storage_password_secret": sweep.settings.storage_password_secret,
                "trial_id": trial._trial_id, "trial_number": trial.number,
                "parent_run_id": sweep.parent_run_id, "metric": sweep.plan.metrics[0],
                "measures": list(sweep.plan.measures), "prune": sweep.plan.prune,
                "pruner": OmegaConf.to_container(sweep.settings.pruner, resolve=True),
                "log_models": str(sweep.plan.log_models)})])
    start = time.monotonic()
    lost: Exception | None = None
    reason = ""
    interval = heartbeat_interval(sweep.settings.stale_after)
    beats = [slots.Heartbeat(sweep.study, trial, interval).__enter__() for trial in trials]
    try:
        try:
            jobs = _launch(sweep, trials, jobs_overrides)
        except Exception as err:  # noqa: BLE001 - the launcher lost a job; see below
            log.debug("the launcher lost a job", exc_info=True)
            lost, jobs = err, [None] * len(trials)
            # submitit's message goes on with the job's whole error stream: its first sentence.
            reason = " ".join(f"{type(err).__name__}: {err}".split("Error stream")[0].split())
            # submitit gives up on the batch at its first lost job; its others may still run.
            _wait_for_running_jobs(sweep.study, trials)
    except KeyboardInterrupt:
        for trial in trials:
            if sweep.study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                slots.fail_and_retry(sweep.study, trial)
        raise
    finally:
        for beat in beats:
            beat.__exit__()
    states, retried, seconds = [], [], time.monotonic() - start
    for trial, job in zip(trials, jobs):
        measured, error = None, None
        if job is not None and job.status is JobStatus.COMPLETED:
            measured = job.return_value
        elif job is not None:
            error = job._return_value
        else:  # what the job recorded before the launcher lost it, if it finished
            outcome = sweep.study._storage.get_trial(trial._trial_id).user_attrs.get(
                OUTCOME)
            if outcome is None:
                slots.fail_and_retry(sweep.study, trial)
                run_id = sweep.study._storage.get_trial(trial._trial_id).user_attrs.get(
                    "mlflow_run_id")
                if sweep.client and run_id:  # the job could not end it
                    sweep_runs.end_trial_runs(sweep.client, [run_id])
                report.trial_line(sweep, trial, "FAIL", None, RuntimeError(
                    f"its job ended without a result ({reason[:300]}); queued again"), seconds, "")
                states.append("FAIL")
                retried.append(trial.number)
                continue
            measured = outcome.get("measured")
            if outcome["state"] == "PRUNED":
                error = optuna.TrialPruned()
            elif outcome["state"] == "FAIL":
                error = RuntimeError(outcome["error"])
        state, values, note = sweep.tell(trial, measured, error)
        report.trial_line(sweep, trial, state, values, error, seconds, note)
        states.append(state)
    if retried:
        raise AbaloneError(
            f"hydra/launcher={sweep.launcher_kind.name} lost the job of trial(s) {retried} "
            f"(scancel, a node's failure or the time limit: {reason[:500]}); they were marked FAIL "
            "and their parameters queued again: rerun the same command to resume the study")
    if lost is not None:  # each job recorded how it ended: the study knows all
        log.warning("hydra/launcher=%s: %s; every trial of the batch had recorded its outcome",
                    sweep.launcher_kind.name, reason[:300])
    return states


class JobLeftQueue(Exception):
    """A trial's SLURM job is no longer queued and recorded no result."""


JOB_CHECK = 10.0  # seconds between the sweep's own looks at the SLURM queue


def _launch(sweep, trials: list[optuna.Trial], jobs_overrides: list[list[str]]) -> list:
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
