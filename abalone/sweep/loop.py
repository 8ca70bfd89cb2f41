"""One process's share of a study: ask a batch of trials (one for the default launcher), run them
through Hydra's launcher and tell the study how each ended (abalone/sweep/batches.py); and the
sweep as a whole, from the plan to the champion.

Each trial is composed by Hydra from the fixed overrides plus the sampled parameters and run by
the configured launcher, by default in this process (TensorFlow stays warm between trials),
where the training run reads its `abalone.trial.TrialContext` from `ACTIVE_TRIAL`. With
`n_jobs > 1` or remote workers the command also coordinates them (abalone/sweep/coordinator.py);
the process that finishes the study last reports it and registers the champion
(abalone/sweep/report.py).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import optuna
import sqlalchemy.exc
from omegaconf import DictConfig
from optuna.trial import TrialState

from abalone import dataset, interrupts, tracking
from abalone.config import AbaloneError, ConfigError, check_option, check_ranges
from abalone.redact import redact_files
from abalone.study.storage import make_storage
from abalone.study.trials import make_pruner
from abalone.sweep import batches, coordinator, launchers, objectives, report, slots, space
from abalone.sweep.algorithms import make_sampler, process_rank
from abalone.sweep.lock import study_lock
from abalone.sweep.plan import SweepPlan, make_plan, open_study
from abalone.sweep.state import SweepState
from abalone.tracking import sweep_runs
from abalone.trial import PARENT_ENV, RANK_ENV
from abalone.workers import thread_share

log = logging.getLogger(__name__)


def run_sweep(settings: DictConfig, arguments: list[str], config: DictConfig, hydra_context,
              launcher) -> None:
    """The plugin's `sweep`: a clear line and exit code for every way a sweep ends early."""
    try:
        Sweep(settings, arguments, config, hydra_context, launcher).run()
    except AbaloneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        interrupts.say(f"interrupted{interrupts.by()}: the running trial was marked FAIL and "
                       "queued again; finished trials are kept in the study")
        sys.exit(interrupts.exit_code())
    except Exception as err:
        print(f"error: {failure_line(err)}", file=sys.stderr)
        sys.exit(1)


def failure_line(err: Exception) -> str:
    """The `error:` line of a sweep's failure outside its own checks; raises `err` again when
    it is none of these (a bug: its traceback is wanted)."""
    reason = tracking.failure_reason(err)  # a full disk, an outage, a store or server refusing
    if reason:
        return reason
    if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                        optuna.exceptions.StorageInternalError)):
        # The study's database went away mid-sweep (it restarted, the network cut): what it
        # recorded is kept, and a trial left RUNNING is failed and queued again on resume.
        # Optuna wraps the driver's error in StorageInternalError ("... during the commit").
        cause = err.__cause__ if isinstance(err, optuna.exceptions.StorageInternalError) and \
            err.__cause__ is not None else err
        first = str(getattr(cause, "orig", None) or cause).strip().splitlines() or [
            type(cause).__name__]
        return (f"the study's database (hydra.sweeper.storage) failed mid-sweep: {first[0]}; "
                "rerun the same command to resume the study")
    raise err


class Sweep:
    """One invocation's share of a study."""

    def __init__(self, settings: DictConfig, arguments: list[str], config: DictConfig,
                 hydra_context, launcher):
        self.settings, self.arguments, self.config = settings, arguments, config
        self.hydra_context, self.launcher = hydra_context, launcher
        # A worker process (its command's rank 1..) runs trials only: no parent run, no report.
        self.is_worker = int(os.environ.get(RANK_ENV, "0")) > 0
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.interrupted = threading.Event()
        self.client = None
        self.workers = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None

    # -- set-up: everything that can fail does so before the first trial --------------------

    def prepare(self) -> None:
        s = self.settings
        check_option("sweep", self.config.hydra.runtime.choices.get("sweep"),
                     self.hydra_context.config_loader.get_group_options("sweep"))
        self.plan: SweepPlan = make_plan(s, self.arguments)
        base = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                  list(self.plan.fixed))
        check_ranges(base)
        self.check_trial_configs()
        ds = dataset.load(base.data)  # a bad table fails before any trial, naming where
        base.tracking.registered_model = base.tracking.registered_model or ds.model_name
        self.tracking_cfg = base.tracking
        # Before the study and the parent run: a launcher we cannot drive is refused first.
        self.launcher_kind = launchers.check_launcher(self.launcher, self.config.hydra.launcher,
                                                      s, self.tracking_cfg)
        self.batch = 1 if self.launcher_kind.in_process else launchers.batch_size(
            self.config.hydra.launcher)
        if self.launcher_kind.same_machine and not self.launcher_kind.in_process:
            # Before the launcher's processes start; they inherit it (as local workers do).
            for name, threads in thread_share(self.batch).items():
                os.environ.setdefault(name, threads)
        self.workers_choice, self.workers = coordinator.make_workers(
            self.config, s, base, self.is_worker)
        if self.workers.remote and not self.launcher_kind.in_process:
            raise ConfigError(f"workers={self.workers_choice} runs trials with the default "
                              f"launcher in each worker; leave hydra/launcher="
                              f"{self.launcher_kind.name} out, or drop workers=")
        pruner = (make_pruner(s.pruner, base.trainer.epochs) if self.plan.prune
                  else optuna.pruners.NopPruner())
        self.storage = storage = make_storage(s.storage, s.storage_password_secret,
                                              s.stale_after)
        self.study = open_study(self.plan, storage, pruner)
        self.study.sampler = make_sampler(s.sampler, self.plan.space, process_rank(self.study),
                                          len(self.plan.metrics))
        if self.tracking_cfg.enabled:
            self.experiment_id = tracking.connect(self.tracking_cfg)
            if self.tracking_cfg.register and not self.is_worker:  # before any run exists
                tracking.check_name(self.tracking_cfg.registered_model, ds)
            import mlflow

            self.client = mlflow.MlflowClient()
            if self.is_worker:
                self.parent_run_id = os.environ.get(PARENT_ENV)
            else:
                # Search, then create: one coordinator at a time (two may start at once).
                with study_lock(storage, f"{self.plan.study_name}.parent-run"):
                    self.parent_run_id = sweep_runs.open_parent_run(
                        self.client, self.experiment_id, self.plan.study_name,
                        self.plan.storage_label, self.plan.params(self.workers_choice))
                self.end_runs_left_running()
        self.state = SweepState(
            s, self.plan, self.study, storage, self.launcher, self.launcher_kind,
            self.interrupted, self.sweep_dir, self.tracking_cfg, self.client, self.experiment_id,
            self.parent_run_id)

    def check_trial_configs(self) -> None:
        """Compose trials' configs before the study exists: a key of the search space the
        config does not have (`model.unitz`), an option no group has, or a value out of range
        is refused naming it, with nothing created."""
        for values in space.probe_values(self.plan.space):
            overrides = [*self.plan.fixed, *space.trial_overrides(values)]
            try:
                check_ranges(self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                                overrides))
            except AbaloneError:
                raise
            except Exception as err:  # Hydra's composition errors, whatever their class
                reason = " ".join(str(err).split("Config search path")[0].split())
                raise ConfigError(f"hydra.sweeper.params: a trial's config cannot be composed "
                                  f"from {' '.join(space.trial_overrides(values))}: "
                                  f"{reason}") from err

    def end_runs_left_running(self) -> None:
        """End FAILED the runs of FAIL trials that a sweep stopped by an outage of the tracking
        server could not end."""
        failed = {str(t.number) for t in self.study.get_trials(deepcopy=False,
                                                               states=(TrialState.FAIL,))}
        if failed:
            running = sweep_runs.runs_left_running(self.client, self.experiment_id,
                                                   self.plan.study_name)
            sweep_runs.end_trial_runs(self.client, [run_id for number, run_id in running.items()
                                                    if number in failed])

    # -- the sweep ----------------------------------------------------------------------------

    def run(self) -> None:
        status, started = "FAILED", None
        try:
            self.prepare()
            started = time.monotonic()
            log.info("study %r (%s): %d trials in total, %d finished before; parent MLflow run "
                     "%s", self.plan.study_name, self.plan.storage_label, self.plan.n_trials,
                     slots.finished_count(self.study), self.parent_run_id)
            if self.client and not self.is_worker:  # the link first: trials show as they end
                log.info("look: %s", tracking.where_to_look(
                    self.experiment_id, f"tags.`optuna.study_name` = '{self.plan.study_name}'"))
            log.info("watch the study: optuna-dashboard %s (docs/sweeps.md)",
                     self.plan.storage_label)
            with interrupts.remembered(self.interrupted):  # the running trial stops, and the loop
                self.run_share()
            if not self.is_worker:
                report.finish(self.state)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if status != "FINISHED":
                self.end_early(status)
            redact_files([self.sweep_dir / "multirun.yaml"])  # what the launcher saved
            if started is not None:
                log.info("the sweep took %s (%s)",
                         report.duration_text(time.monotonic() - started), status)

    def run_share(self) -> None:
        """This process's trials, and its workers' (followed, or waited for and their stale
        trials retried here)."""
        coordinator.start_workers(self.state, self.workers, self.workers_choice)
        if self.workers.remote:
            coordinator.follow_workers(self.state, self.workers)
            return
        self.run_trials()
        self.workers.wait()
        # A trial process that died left its trial RUNNING: fail it, retry it here.
        slots.fail_stale_trials(self.study, self.settings.stale_after, self.state.end_stale_run)
        self.run_trials()
        failed = [f"{name} {state}" for name, state in self.workers.poll().items()
                  if state.startswith("failed")]
        if failed:
            log.warning("%s; this process finished the study without them (see their output "
                        "above)", "; ".join(failed))

    def end_early(self, status: str) -> None:
        """Stop the workers, and end the parent run KILLED or FAILED if the server takes it."""
        if self.workers is not None:
            self.workers.stop()
        if self.client and self.parent_run_id and not self.is_worker:
            try:
                self.client.set_terminated(self.parent_run_id, status)
            except Exception as err:  # noqa: BLE001 - the server is gone; keep the cause
                log.warning("could not end the parent MLflow run %s: %s", status,
                            str(err).strip().splitlines()[0] if str(err).strip() else err)

    def run_trials(self) -> None:
        failures = 0
        n_trials = self.plan.n_trials
        while slots.work_left(self.study, n_trials) or slots.wait_out_unmarked(
                self.study, self.settings.stale_after, self.state.end_stale_run):
            if self.interrupted.is_set():  # a Ctrl-C lost after the last trial's training
                raise KeyboardInterrupt
            slots.fail_stale_trials(self.study, self.settings.stale_after, self.state.end_stale_run)
            if not slots.work_left(self.study, n_trials) or self.stopped():
                break
            batch = self.ask_batch()
            if not batch:
                break
            states = batches.run_batch(self.state, batch)
            for state in states:
                if state == "FAIL" and tracking.OUTAGE.given_up:
                    raise AbaloneError(tracking.OUTAGE.given_up)
                if state == "FAIL":
                    failures += 1
                    if failures >= self.settings.max_failures:
                        raise AbaloneError(f"{failures} trials failed in this process "
                                           f"(hydra.sweeper.max_failures="
                                           f"{self.settings.max_failures}); stopping the sweep")

    def ask_batch(self) -> list[optuna.Trial]:
        """As many trials as the launcher runs at once (one for the default launcher), within
        the study's n_trials."""
        batch: list[optuna.Trial] = []
        while len(batch) < self.batch and (not batch
                                           or slots.work_left(self.study, self.plan.n_trials)):
            trial = self.study.ask(self.plan.space)
            if not slots.within_total(self.study, trial.number, self.plan.n_trials):
                # Another process took the last slot between our check and our ask.
                trial.set_user_attr("surplus", True)
                self.study.tell(trial, state=TrialState.FAIL)
                break
            batch.append(trial)
        return batch

    def stopped(self) -> bool:
        """Whether the stop rule has ended the study at this n_trials, in this run or an
        earlier one (a higher n_trials resumes it); records why when it ends it now."""
        n_trials = self.plan.n_trials
        record = self.study.user_attrs.get(objectives.STOPPED)
        if record and n_trials <= record["n_trials"]:
            log.info("the study was stopped early: %s; raise hydra.sweeper.n_trials above %d "
                     "to go on", record["reason"], record["n_trials"])
            return True
        trials = self.study.get_trials(deepcopy=False)
        if self.plan.stop_rule == "none" or any(t.state == TrialState.WAITING for t in trials):
            return False  # starting points and retries run first
        reason = objectives.stagnation(self.study, self.plan.stop_rule,
                                       self.settings.stop.patience,
                                       record["after_trial"] + 1 if record else 0,
                                       self.plan.directions)
        if reason is None:
            return False
        reason += f"; {n_trials} trials were allowed"
        self.study.set_user_attr(objectives.STOPPED, {
            "reason": reason, "n_trials": n_trials,
            "after_trial": max(t.number for t in trials if t.state.is_finished())})
        log.info("the study stops early: %s", reason)
        if self.client:
            try:
                self.client.set_tag(self.parent_run_id, "stop.reason", reason)
            except Exception as err:  # noqa: BLE001 - the study holds the reason too
                log.warning("could not tag the parent MLflow run with the stop reason: %s", err)
        return True
