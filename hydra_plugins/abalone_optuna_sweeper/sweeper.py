"""The `abalone_optuna` Hydra sweeper: one Optuna study, one MLflow parent run, trials in-process.

Each trial is composed by Hydra from the fixed overrides plus the sampled parameters and run by
the configured launcher in this process (TensorFlow stays warm between trials); the training
run reads its Optuna trial from `abalone.study.ACTIVE_TRIAL`. `n_jobs > 1` starts `n_jobs - 1`
more processes running the same command against the same storage and parent run. The process
that finishes the study last reports the best trial and registers its model.

With remote workers (`workers=container`, abalone/fleet.py) this process only coordinates: it
opens the study and the parent run, starts the workers, shows progress until they have ended,
and registers the champion; Ctrl-C stops them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("abalone.sweep")

PARENT_ENV = "ABALONE_SWEEP_PARENT_RUN_ID"  # set for workers: extra processes, containers
RANK_ENV = "ABALONE_SWEEP_WORKER_RANK"  # 1.. for workers, so their samplers differ
PROGRESS_SECONDS = 2.0  # how often the coordinator of remote workers looks at the study


class AbaloneOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        from abalone.config import AbaloneError

        try:
            _Sweep(self, arguments).run()
        except AbaloneError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except Exception:
            from abalone.tracking import OUTAGE

            if OUTAGE.given_up:  # e.g. the champion's registration outlasted the grace
                print(f"error: {OUTAGE.given_up}", file=sys.stderr)
                sys.exit(1)
            raise
        except KeyboardInterrupt:
            print("interrupted: the running trial was marked FAIL; finished trials are kept "
                  "in the study", file=sys.stderr)
            sys.exit(130)


class _Sweep:
    """One invocation's share of a study."""

    def __init__(self, sweeper: AbaloneOptunaSweeper, arguments: list[str]):
        self.sweeper = sweeper
        self.s = sweeper.settings
        self.arguments = arguments
        self.rank = int(os.environ.get(RANK_ENV, "0"))
        self.is_worker = self.rank > 0

    # -- set-up: everything that can fail does so before the first trial --------------------

    def prepare(self) -> None:
        import mlflow

        from abalone import data, study, tracking
        from abalone.config import ConfigError, check_ranges

        s = self.s
        self.space, self.fixed, self.space_written = study.search_space(
            OmegaConf.to_container(s.params), self.arguments)
        if not self.space:
            raise ConfigError("nothing to sweep: select a sweep (sweep=quick) or give values to "
                              "try on the command line (model=wide,deep optimizer.lr=0.001,0.01)")
        self.prepare_objectives()
        self.log_models = str(getattr(s.log_models, "value", s.log_models))
        base = self.sweeper.hydra_context.config_loader.load_sweep_config(
            self.sweeper.config, list(self.fixed))
        check_ranges(base)
        data.load(data.resolve_path(base.data))
        self.tracking_cfg = base.tracking
        self.prepare_workers(base)
        self.epochs = base.trainer.epochs
        sampler_name = str(getattr(s.sampler.name, "value", s.sampler.name))
        if s.n_trials is None:
            if sampler_name != "grid":
                raise ConfigError(f"hydra.sweeper.n_trials is required with the "
                                  f"{sampler_name} sampler")
            self.n_trials = math.prod(len(v) for v in study.grid_values(self.space).values())
        elif s.n_trials < 1:
            raise ConfigError(f"hydra.sweeper.n_trials must be >= 1, got {s.n_trials}")
        else:
            self.n_trials = s.n_trials
        if s.n_jobs < 1 or s.max_failures < 1:
            raise ConfigError("hydra.sweeper.n_jobs and hydra.sweeper.max_failures must be >= 1")
        self.study_name = s.study_name or self.default_study_name()
        self.storage_label = tracking.redact(s.storage) if "://" in s.storage else str(
            Path(s.storage).expanduser().resolve())

        import optuna

        sampler = study.make_sampler(s.sampler, self.space, self.rank, len(self.metrics))
        storage = study.make_storage(s.storage, s.storage_password_secret)
        source = self.warm_start_source(storage)
        self.study = optuna.create_study(
            study_name=self.study_name,
            storage=storage, sampler=sampler,
            pruner=study.make_pruner(s.pruner, self.epochs) if self.prune
            else optuna.pruners.NopPruner(), directions=self.directions, load_if_exists=True)
        created = [d.name.lower() for d in self.study.directions]
        if created != self.directions:
            raise ConfigError(f"study {self.study_name!r} in {self.storage_label} was created to "
                              f"{', '.join(created)}; hydra.sweeper.direction="
                              f"{', '.join(self.directions)} needs another "
                              "hydra.sweeper.study_name")
        recorded = self.study.user_attrs.get("metric")
        if recorded is None:
            self.study.set_user_attr("metric", self.metric_label)
        elif recorded != self.metric_label:
            raise ConfigError(f"study {self.study_name!r} optimises {recorded}; "
                              f"hydra.sweeper.metric={self.metric_label} needs another "
                              "study_name")
        self.seed_study(source)

        self.client = None
        self.parent_run_id = None
        if self.tracking_cfg.enabled:
            self.experiment_id = tracking.connect(self.tracking_cfg)
            self.client = mlflow.MlflowClient()
            self.parent_run_id = os.environ.get(PARENT_ENV) if self.is_worker else tracking.open_parent_run(
                self.client, self.experiment_id, self.study_name, self.storage_label,
                self.settings_params())
            if not self.is_worker:
                self.end_runs_left_running()

    def end_runs_left_running(self) -> None:
        """End FAILED the runs of FAIL trials that a sweep stopped by an outage of the tracking
        server could not end."""
        from optuna.trial import TrialState

        failed = {str(t.number) for t in self.study.get_trials(deepcopy=False,
                                                               states=(TrialState.FAIL,))}
        if not failed:
            return
        for run in self.client.search_runs(
                [self.experiment_id], f"tags.`optuna.study_name` = '{self.study_name}' and "
                "attributes.status = 'RUNNING'"):
            if run.data.tags.get("optuna.trial_number") in failed:
                self.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
                self.client.set_terminated(run.info.run_id, "FAILED")

    def prepare_workers(self, base) -> None:
        """The workers object of `workers=...`; remote ones need a storage and tracking they reach."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import instantiate

        from abalone.fleet import LocalWorkers, check_remote

        # For ${hydra:...} in the workers' settings (the launcher sets it only for each job).
        HydraConfig.instance().set_config(self.sweeper.config)
        self.workers_choice = self.sweeper.config.hydra.runtime.choices.get("workers", "local")
        self.workers = LocalWorkers() if self.is_worker else instantiate(base.workers)
        self.remote = not isinstance(self.workers, LocalWorkers)
        if self.remote:
            check_remote(self.workers_choice, self.s.storage, base.tracking)
        else:
            self.workers.count = 0 if self.is_worker else self.s.n_jobs - 1

    def prepare_objectives(self) -> None:
        """Metrics and directions (one each, or lists of one length), constraints, the
        conditional-space function and the stop rule; each error names its setting."""
        from abalone import study
        from abalone.config import ConfigError

        s = self.s
        self.metrics = [str(m) for m in (s.metric if OmegaConf.is_list(s.metric)
                                         else [s.metric])]
        self.directions = [str(getattr(d, "value", d)) for d in (
            s.direction if OmegaConf.is_list(s.direction) else [s.direction])]
        if not self.metrics or len(self.metrics) != len(self.directions):
            raise ConfigError(f"hydra.sweeper.metric names {len(self.metrics)} metric(s) but "
                              f"hydra.sweeper.direction has {len(self.directions)}; give one "
                              "direction per metric")
        for metric in self.metrics:
            study.check_measure(metric, "hydra.sweeper.metric")
        for direction in self.directions:
            if direction not in ("minimize", "maximize"):
                raise ConfigError(f"hydra.sweeper.direction must be minimize or maximize, got "
                                  f"{direction!r}")
        self.metric_label = ", ".join(self.metrics)
        self.constraints = study.parse_constraints(list(s.constraints))
        pruner = str(getattr(s.pruner.name, "value", s.pruner.name))
        self.prune = len(self.metrics) == 1
        if not self.prune and pruner != "none":
            log.info("pruning is off: Optuna cannot prune a multi-objective study "
                     "(hydra.sweeper.pruner.name=%s is ignored)", pruner)
        self.custom_space = (study.load_function(s.custom_search_space,
                                                 "hydra.sweeper.custom_search_space")
                             if s.custom_search_space else None)
        study.check_starting_points(OmegaConf.to_container(s.starting_points), self.space,
                                    conditional=self.custom_space is not None)
        sampler = str(getattr(s.sampler.name, "value", s.sampler.name))
        if self.custom_space and sampler == "grid":
            raise ConfigError("hydra.sweeper.custom_search_space cannot add parameters to a grid "
                              "(sampler.name=grid); choose another sampler")
        self.stop_rule = str(getattr(s.stop.rule, "value", s.stop.rule))
        if self.stop_rule != "none":
            if len(self.metrics) > 1:
                raise ConfigError(f"hydra.sweeper.stop.rule={self.stop_rule} needs a single "
                                  "metric")
            if s.stop.patience < 1:
                raise ConfigError(f"hydra.sweeper.stop.patience must be >= 1, got "
                                  f"{s.stop.patience}")
            if self.stop_rule == "terminator":
                study.require_torch("hydra.sweeper.stop.rule=terminator")

    def warm_start_source(self, storage):
        """The study `warm_start_from` names, if it optimises what this sweep does."""
        import optuna

        from abalone.config import ConfigError

        name = self.s.warm_start_from
        if not name:
            return None
        try:
            source = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ConfigError(f"hydra.sweeper.warm_start_from={name}: no such study in "
                              f"{self.storage_label}") from None
        if source.user_attrs.get("metric") != self.metric_label or [
                d.name.lower() for d in source.directions] != self.directions:
            raise ConfigError(f"hydra.sweeper.warm_start_from={name}: that study optimises "
                              f"{source.user_attrs.get('metric')}, this one {self.metric_label}")
        return source

    def seed_study(self, source) -> None:
        """Copy the trials of `warm_start_from` and queue `starting_points`, each once."""
        from abalone import study

        if source is not None:
            copied, incompatible = study.copy_trials(self.study, source, self.space)
            log.info("warm start from study %r: %d trials copied now, %d outside this search "
                     "space", source.study_name, copied, incompatible)
        for point in OmegaConf.to_container(self.s.starting_points):
            self.study.enqueue_trial(point, skip_if_exists=True)

    def default_study_name(self) -> str:
        """The sweep's name plus a digest of what defines the study, so reruns resume it."""
        spec = json.dumps({"space": {k: repr(v) for k, v in sorted(self.space.items())},
                           "fixed": sorted(self.fixed), "metric": self.metric_label},
                          sort_keys=True)
        return f"{self.s.sweep_name or 'grid'}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"

    def settings_params(self) -> dict[str, str]:
        """The parent run's params: the settings that apply and the search space as written."""
        from abalone.study import SETTINGS_USED

        s = self.s
        params = {"sweep.name": str(s.sweep_name), "sweep.study_name": self.study_name,
                  "sweep.storage": self.storage_label, "sweep.metric": self.metric_label,
                  "sweep.direction": ", ".join(self.directions),
                  "sweep.n_trials": str(self.n_trials),
                  "sweep.n_jobs": str(s.n_jobs), "sweep.max_failures": str(s.max_failures),
                  "sweep.workers": self.workers_choice,
                  "sweep.log_models": self.log_models,
                  "sweep.fixed_overrides": " ".join(self.fixed)}
        for group in ("sampler", "pruner"):
            conf = OmegaConf.to_container(s[group], enum_to_str=True)
            if group == "pruner" and not self.prune:
                conf["name"] = "none"
            for key in ("name", *SETTINGS_USED[conf["name"]]):
                params[f"sweep.{group}.{key}"] = str(conf[key])
        # The search settings beyond the space, when used.
        if s.constraints:
            params["sweep.constraints"] = "; ".join(s.constraints)
        if s.starting_points:
            params["sweep.starting_points"] = json.dumps(
                OmegaConf.to_container(s.starting_points))
        for key in ("warm_start_from", "custom_search_space"):
            if s[key]:
                params[f"sweep.{key}"] = str(s[key])
        if self.stop_rule != "none":
            params.update({"sweep.stop.rule": self.stop_rule,
                           "sweep.stop.patience": str(s.stop.patience)})
        params.update({f"sweep.space.{k}": v for k, v in self.space_written.items()})
        return params

    # -- the trials ---------------------------------------------------------------------------

    def run(self) -> None:
        self.prepare()
        log.info("study %r (%s): %d trials in total, %d finished before; parent MLflow run %s",
                 self.study_name, self.storage_label, self.n_trials, self.finished_count(),
                 self.parent_run_id)
        # Python loses a Ctrl-C that lands inside a finalizer; remember every one, so the
        # running trial (RaiseOnInterrupt) and the loop of trials still stop.
        self.interrupted = threading.Event()

        def on_interrupt(signum, frame):
            self.interrupted.set()
            signal.default_int_handler(signum, frame)

        previous_handler = signal.signal(signal.SIGINT, on_interrupt)
        status = "FAILED"
        try:
            self.start_workers()
            if self.remote:
                self.follow_workers()
            else:
                self.run_trials()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            if status != "FINISHED":
                self.workers.stop()
            elif not self.remote:  # remote ones have ended: follow_workers waited for them
                self.workers.wait()
            if status != "FINISHED" and self.client and not self.is_worker:
                try:
                    self.client.set_terminated(self.parent_run_id, status)
                except Exception as err:  # noqa: BLE001 - the server is gone; keep the cause
                    log.warning("could not end the parent MLflow run: %s", err)
        failed_workers = [f"{name} {state}" for name, state in self.workers.poll().items()
                          if state.startswith("failed")]
        if failed_workers and not self.remote:
            from abalone.config import AbaloneError

            raise AbaloneError(f"{len(failed_workers)} worker process(es) failed; see their "
                               "output above")
        if not self.is_worker:
            self.finish()

    def start_workers(self) -> None:
        from abalone import study

        # A trial a dead process left RUNNING holds its slot until it is failed and queued again:
        # fail it first, or a rerun whose only unfinished trial is one starts no workers.
        study.fail_stale_trials(self.study, self.s.stale_after, self.end_stale_run)
        if not self.workers.count or not study.work_left(self.study, self.n_trials):
            return  # a finished study needs no workers (each SageMaker job bills its start-up)
        if not self.remote:  # before TensorFlow loads here; the processes inherit it
            from abalone.fleet import thread_share

            for name, threads in thread_share(self.s.n_jobs).items():
                os.environ.setdefault(name, threads)
        # The user's command for one worker process: this study in this storage, its trials in
        # the worker's own process. Local workers share this command's sweep folder.
        replaced = ("hydra.sweeper.n_jobs=", "hydra.sweeper.study_name=",
                    "hydra.sweeper.storage=", "hydra.sweep.dir=")
        argv = [a for a in sys.argv[1:] if not a.startswith(replaced)
                and not a.lstrip("+~").startswith(("workers=", "workers."))]
        storage = self.s.storage.replace("\\", "\\\\").replace("'", "\\'")
        argv += ["workers=local", "hydra.sweeper.n_jobs=1",
                 f"hydra.sweeper.study_name={self.study_name}",
                 f"hydra.sweeper.storage='{storage}'"]
        if not self.remote:
            argv.append(f"hydra.sweep.dir={Path(self.sweeper.config.hydra.sweep.dir).resolve()}")
        self.workers.start(argv, {PARENT_ENV: self.parent_run_id or ""})
        log.info("started %d %s", self.workers.count, f"{self.workers_choice} workers"
                 if self.remote else "more trial processes")

    def follow_workers(self) -> None:
        """Until every remote worker has ended: fail the trials of workers that are gone, and
        show a line of progress whenever it changes."""
        from abalone import study
        from abalone.config import AbaloneError

        shown = None
        while True:
            states = self.workers.poll()
            study.fail_stale_trials(self.study, self.s.stale_after, self.end_stale_run)
            line = self.progress(states)
            if line != shown:
                log.info("%s", line)
                shown = line
            if "running" not in states.values():
                break
            time.sleep(PROGRESS_SECONDS)
        trials = self.study.get_trials(deepcopy=False)
        unfinished = [t.number for t in trials if t.state.name in ("RUNNING", "WAITING")]
        if study.work_left(self.study, self.n_trials) or unfinished:
            failed = [f"{name} {state}" for name, state in states.items() if state != "finished"]
            raise AbaloneError(
                f"the workers have ended before study {self.study_name!r} was complete ("
                f"{self.finished_count()} of {self.n_trials} trials finished, trials "
                f"{unfinished} unfinished); {'; '.join(failed) or 'none failed'}; their logs: "
                f"{self.workers.logs}. Rerun the same command to resume the study.")

    def progress(self, states: dict[str, str]) -> str:
        from collections import Counter

        count = Counter(t.state.name for t in self.study.get_trials(deepcopy=False)
                        if not t.user_attrs.get("surplus"))
        running = sum(state == "running" for state in states.values())
        return (f"trials of {self.n_trials}: {count['COMPLETE']} complete, {count['PRUNED']} "
                f"pruned, {count['FAIL']} failed, {count['RUNNING']} running; "
                f"{self.best_text(*self.best())}; workers running: {running} of {len(states)}")

    def finished_count(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False,
                                         states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def run_trials(self) -> None:
        import optuna

        from abalone import study, tracking
        from abalone.config import AbaloneError

        failures = 0
        while study.work_left(self.study, self.n_trials):
            if self.interrupted.is_set():  # a Ctrl-C lost after the last trial's training
                raise KeyboardInterrupt
            study.fail_stale_trials(self.study, self.s.stale_after, self.end_stale_run)
            if not study.work_left(self.study, self.n_trials) or self.stopped():
                break
            trial = self.study.ask(self.space)
            if not study.within_total(self.study, trial.number, self.n_trials):
                # Another process took the last slot between our check and our ask.
                trial.set_user_attr("surplus", True)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            state = self.run_one(trial)
            if state == "FAIL" and tracking.OUTAGE.given_up:
                raise AbaloneError(tracking.OUTAGE.given_up)
            if state == "FAIL":
                failures += 1
                if failures >= self.s.max_failures:
                    raise AbaloneError(f"{failures} trials failed in this process "
                                       f"(hydra.sweeper.max_failures={self.s.max_failures}); "
                                       "stopping the sweep")

    def stopped(self) -> bool:
        """Whether the stop rule has ended the study at this n_trials, in this run or an
        earlier one (a higher n_trials resumes it); records why when it ends it now."""
        from optuna.trial import TrialState

        from abalone import study

        record = self.study.user_attrs.get(study.STOPPED)
        if record and self.n_trials <= record["n_trials"]:
            log.info("the study was stopped early: %s; raise hydra.sweeper.n_trials above %d "
                     "to go on", record["reason"], record["n_trials"])
            return True
        trials = self.study.get_trials(deepcopy=False)
        if self.stop_rule == "none" or any(t.state == TrialState.WAITING for t in trials):
            return False  # starting points and retries run first
        reason = study.stagnation(self.study, self.stop_rule, self.s.stop.patience,
                                  record["after_trial"] + 1 if record else 0, self.directions)
        if reason is None:
            return False
        reason += f"; {self.n_trials} trials were allowed"
        self.study.set_user_attr(study.STOPPED, {
            "reason": reason, "n_trials": self.n_trials,
            "after_trial": max(t.number for t in trials if t.state.is_finished())})
        log.info("the study stops early: %s", reason)
        if self.client:
            try:
                self.client.set_tag(self.parent_run_id, "stop.reason", reason)
            except Exception as err:  # noqa: BLE001 - the study holds the reason too
                log.warning("could not tag the parent MLflow run with the stop reason: %s", err)
        return True

    def conditional_overrides(self, trial) -> dict[str, Any]:
        """The custom_search_space function's overrides; it samples more from `trial`."""
        import optuna

        from abalone.config import ConfigError

        try:
            overrides = self.custom_space(trial)
            if not isinstance(overrides, dict):
                raise TypeError(f"it must return a dict of config overrides, not "
                                f"{type(overrides).__name__}")
        except Exception as err:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise ConfigError(f"hydra.sweeper.custom_search_space={self.s.custom_search_space}: "
                              f"{type(err).__name__}: {err}") from err
        return overrides

    def run_one(self, trial) -> str:
        import optuna

        from abalone import study

        study.mark_owner(trial)
        extra = self.conditional_overrides(trial) if self.custom_space else {}
        # Parameters the custom function sampled are recorded by Optuna; what it returns is
        # what the trial's config gets.
        swept = {k: v for k, v in trial.params.items() if k in self.space}
        overrides = [*self.fixed, *study.trial_overrides({**swept, **extra})]
        context = study.TrialContext(trial, self.parent_run_id, self.study_name,
                                     self.metrics[0], self.interrupted,
                                     tuple(dict.fromkeys(
                                         [*self.metrics, *(c.name for c in self.constraints)])),
                                     self.prune, study=self.study,
                                     log_every_model=self.log_models == "all")
        token = study.ACTIVE_TRIAL.set(context)
        beating = threading.Event()
        heartbeat = threading.Thread(target=self.beat, args=(trial, beating), daemon=True)
        heartbeat.start()
        start = time.monotonic()
        try:
            (job,) = self.sweeper.launcher.launch([overrides], initial_job_idx=trial.number)
        except KeyboardInterrupt:
            study.fail_and_retry(self.study, trial)
            raise
        finally:
            beating.set()
            study.ACTIVE_TRIAL.reset(token)
        if self.interrupted.is_set() and job.status is not JobStatus.COMPLETED:
            study.fail_and_retry(self.study, trial)  # as above: the error a Ctrl-C became
            raise KeyboardInterrupt
        measured, error, values, note = None, None, None, ""
        if job.status is JobStatus.COMPLETED:
            measured = job.return_value  # {name: value} of trial.measures
            values = [measured[m] for m in self.metrics] if measured else None
        else:
            error = job._return_value  # the exception the task raised
        if isinstance(error, optuna.TrialPruned):
            state = "PRUNED"
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif error is None and values and all(math.isfinite(v) for v in values):
            state = "COMPLETE"
            if self.constraints:
                broken = []
                for constraint in self.constraints:
                    violation = constraint.violation(measured[constraint.name])
                    trial.set_constraint(str(constraint), violation)
                    if violation > 0:
                        broken.append(str(constraint))
                if broken:
                    note = f"infeasible: breaks {', '.join(broken)}"
            self.study.tell(trial, values if len(values) > 1 else values[0])
            if self.constraints and self.client and "mlflow_run_id" in trial.user_attrs:
                try:  # after tell: the study holds the trial whatever the server does
                    self.client.set_tag(trial.user_attrs["mlflow_run_id"], "optuna.feasible",
                                        str(not note).lower())
                except Exception as err:  # noqa: BLE001 - a tag never stops the sweep
                    log.warning("could not tag trial %d's run feasible: %s", trial.number, err)
        else:
            state = "FAIL"
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.report(trial, state, values, error, time.monotonic() - start, note)
        return state

    def beat(self, trial, stop: threading.Event) -> None:
        interval = max(1.0, min(60.0, self.s.stale_after / 4))
        while not stop.wait(interval):
            trial.set_user_attr("heartbeat", time.time())

    def end_stale_run(self, trial) -> None:
        log.warning("trial %d was left RUNNING by a process that is gone: marked FAIL, its "
                    "parameters queued again", trial.number)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.client and run_id:
            self.client.set_tag(run_id, "optuna.state", "FAIL")
            self.client.set_terminated(run_id, "FAILED")

    def best(self):
        """(the Pareto front of this study's own feasible COMPLETE trials, the champion)."""
        from abalone import study

        front = study.pareto_front(study.candidates(self.study), self.directions)
        return front, study.champion(front, self.directions)

    def best_text(self, front, best) -> str:
        if best is None:
            return "best -"
        if len(self.metrics) > 1:
            return f"Pareto front {len(front)}, champion trial {best.number}"
        return f"best {best.values[0]:.4f} (trial {best.number})"

    def values_text(self, values) -> str:
        return "  ".join(f"{m} {_value(m, v)}" for m, v in zip(self.metrics, values))

    def report(self, trial, state: str, values, error, seconds: float, note: str) -> None:
        front, best = self.best()
        best_text = self.best_text(front, best)
        shown = (self.values_text(values) if state == "COMPLETE"
                 else self.values_text(["-"] * len(self.metrics)))
        reason = f"  {type(error).__name__}: {error}" if state == "FAIL" else note and f"  {note}"
        log.info("trial %3d  %-8s  %s  %s  %.1fs%s", trial.number, state, shown, best_text,
                 seconds, reason)
        if self.client and best is not None:
            from abalone.study import BEST_OBJECTIVE

            try:
                self.client.log_metric(self.parent_run_id, BEST_OBJECTIVE, best.values[0],
                                       step=self.finished_count())
            except Exception as err:  # noqa: BLE001 - a report never stops the sweep
                log.warning("could not log %s on the parent MLflow run: %s", BEST_OBJECTIVE,
                            err)

    # -- the end: best trial, plots, registration ---------------------------------------------

    def finish(self) -> None:
        from optuna.trial import TrialState

        from abalone import study, tracking
        from abalone.study import BEST_OBJECTIVE

        tally = {state.name: 0 for state in TrialState}
        for trial in self.study.get_trials(deepcopy=False):
            if not (trial.user_attrs.get("surplus") or study.WARM_START_OF in trial.user_attrs):
                tally[trial.state.name] += 1
        stop = self.study.user_attrs.get(study.STOPPED)
        stopped = stop is not None and self.n_trials <= stop["n_trials"]
        if tally["RUNNING"] or (tally["WAITING"] and not stopped):
            log.info("other processes are still running trials of this study; the last one "
                     "to finish registers the best model")
            return
        log.info("study %r: %d COMPLETE, %d PRUNED, %d FAIL", self.study_name, tally["COMPLETE"],
                 tally["PRUNED"], tally["FAIL"])
        front, best = self.best()
        if best is None:
            if self.client:
                self.client.set_terminated(self.parent_run_id, "FAILED")
            from abalone.config import AbaloneError

            feasible = " feasible" if tally["COMPLETE"] else ""
            raise AbaloneError(f"study {self.study_name!r} has no{feasible} COMPLETE trial; "
                               "nothing to register")
        self.print_table(study.candidates(self.study), front)
        if not self.client:
            return
        client, parent = self.client, self.parent_run_id
        run_id = best.user_attrs["mlflow_run_id"]
        best_run = client.get_run(run_id)
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{key.lower()}", count, now, 0) for key, count in tally.items()]
        metrics.append(Metric(BEST_OBJECTIVE, best.values[0], now, self.finished_count()))
        if "test_rmse" in best_run.data.metrics:
            metrics.append(Metric("best_trial_test_rmse", best_run.data.metrics["test_rmse"],
                                  now, 0))
        tags = [RunTag("best.trial_number", str(best.number)), RunTag("best.run_id", run_id)]
        tags += [RunTag(f"best.params.{k}", str(v)) for k, v in best.params.items()]
        out_dir = Path(self.sweeper.config.hydra.sweep.dir) / "optuna"
        artifacts = tracking.save_study_plots(self.study, out_dir, self.metrics)
        if len(self.metrics) > 1:
            tags.append(RunTag("pareto_front", ", ".join(str(t.number) for t in front)))
            for trial in front:
                client.set_tag(trial.user_attrs["mlflow_run_id"], "optuna.pareto_front", "true")
            artifacts.append(tracking.save_pareto_table(front, self.metrics,
                                                        out_dir / "pareto_front.csv"))
        client.log_batch(parent, metrics=metrics, tags=tags)
        for path in artifacts:
            client.log_artifact(parent, str(path), artifact_path="optuna")
        if self.tracking_cfg.register:
            metrics = {k: v for k, v in best_run.data.metrics.items()
                       if k.startswith(("test_", "best_val_"))}
            message = tracking.register_champion(
                client, self.tracking_cfg.registered_model, run_id,
                best.user_attrs["mlflow_model_uri"], metrics,
                tags={"sweep": str(self.s.sweep_name), "study": self.study_name,
                      "trial": str(best.number),
                      "objective": ", ".join(f"{v:.4g}" for v in best.values),
                      "objective_metric": self.metric_label})
            log.info("%s", message)
            client.set_tag(parent, "registration", message)
        client.set_terminated(parent, "FINISHED")
        log.info("look: %s", tracking.where_to_look(
            self.experiment_id, f"tags.`optuna.study_name` = '{self.study_name}'"))

    def print_table(self, candidates, front) -> None:
        """The top feasible trials by the first metric; `*` marks the Pareto front."""
        sign = -1 if self.directions[0] == "maximize" else 1
        top = sorted(candidates, key=lambda t: sign * t.values[0])[:10]
        multi = len(self.metrics) > 1
        on_front = {t.number for t in front}
        log.info("top trials by %s%s:", self.metrics[0], " (* on the Pareto front)" * multi)
        log.info("  trial  %s  mlflow run id                     params",
                 "  ".join(f"{m:>10}" for m in self.metrics))
        for trial in top:
            params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
            values = "  ".join(f"{_value(m, v):>10}" for m, v in zip(self.metrics, trial.values))
            mark = "*" if multi and trial.number in on_front else " "
            log.info(" %s%5d  %s  %-32s  %s", mark, trial.number, values,
                     trial.user_attrs.get("mlflow_run_id", "-"), params)


def _value(metric: str, value: Any) -> str:
    """A metric's value as the terminal shows it: 4 decimals for val_ metrics."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if metric.startswith("val_") else f"{value:.4g}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
