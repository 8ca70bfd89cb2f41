"""The `abalone_optuna` Hydra sweeper: one Optuna study, one MLflow parent run, trials in-process.

Each trial is composed by Hydra from the fixed overrides plus the sampled parameters and run by
the configured launcher in this process (TensorFlow stays warm between trials); the training
run reads its Optuna trial from `abalone.study.ACTIVE_TRIAL`. `n_jobs > 1` starts `n_jobs - 1`
more processes running the same command against the same storage and parent run. The process
that finishes the study last reports the best trial and registers its model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import subprocess
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

PARENT_ENV = "ABALONE_SWEEP_PARENT_RUN_ID"  # set for the extra processes of n_jobs
RANK_ENV = "ABALONE_SWEEP_WORKER_RANK"


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
        if not s.metric.startswith("val_"):
            raise ConfigError(f"hydra.sweeper.metric must be a validation metric (val_...), got "
                              f"{s.metric!r}: the test rows never choose a trial")
        self.direction = str(getattr(s.direction, "value", s.direction))
        self.log_models = str(getattr(s.log_models, "value", s.log_models))
        base = self.sweeper.hydra_context.config_loader.load_sweep_config(
            self.sweeper.config, list(self.fixed))
        check_ranges(base)
        data.load(data.resolve_path(base.data))
        self.tracking_cfg = base.tracking
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

        self.study = optuna.create_study(
            study_name=self.study_name, storage=study.make_storage(s.storage),
            sampler=study.make_sampler(s.sampler, self.space, self.rank),
            pruner=study.make_pruner(s.pruner, self.epochs), direction=self.direction,
            load_if_exists=True)
        if self.study.direction.name.lower() != self.direction:
            raise ConfigError(f"study {self.study_name!r} in {self.storage_label} was created to "
                              f"{self.study.direction.name.lower()}; hydra.sweeper.direction="
                              f"{self.direction} needs another hydra.sweeper.study_name")
        recorded = self.study.user_attrs.get("metric")
        if recorded is None:
            self.study.set_user_attr("metric", s.metric)
        elif recorded != s.metric:
            raise ConfigError(f"study {self.study_name!r} optimises {recorded}; "
                              f"hydra.sweeper.metric={s.metric} needs another study_name")

        self.client = None
        self.parent_run_id = None
        if self.tracking_cfg.enabled:
            self.experiment_id = tracking.connect(self.tracking_cfg)
            self.client = mlflow.MlflowClient()
            self.parent_run_id = os.environ.get(PARENT_ENV) or tracking.open_parent_run(
                self.client, self.experiment_id, self.study_name, self.storage_label,
                self.settings_params())

    def default_study_name(self) -> str:
        """The sweep's name plus a digest of what defines the study, so reruns resume it."""
        spec = json.dumps({"space": {k: repr(v) for k, v in sorted(self.space.items())},
                           "fixed": sorted(self.fixed), "metric": self.s.metric}, sort_keys=True)
        return f"{self.s.sweep_name or 'grid'}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"

    def settings_params(self) -> dict[str, str]:
        """The parent run's params: the settings that apply and the search space as written."""
        from abalone.study import SETTINGS_USED

        s = self.s
        params = {"sweep.name": str(s.sweep_name), "sweep.study_name": self.study_name,
                  "sweep.storage": self.storage_label, "sweep.metric": s.metric,
                  "sweep.direction": self.direction, "sweep.n_trials": str(self.n_trials),
                  "sweep.n_jobs": str(s.n_jobs), "sweep.max_failures": str(s.max_failures),
                  "sweep.log_models": self.log_models,
                  "sweep.fixed_overrides": " ".join(self.fixed)}
        for group in ("sampler", "pruner"):
            conf = OmegaConf.to_container(s[group], enum_to_str=True)
            for key in ("name", *SETTINGS_USED[conf["name"]]):
                params[f"sweep.{group}.{key}"] = str(conf[key])
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
        workers = self.start_workers()
        status = "FAILED"
        try:
            self.run_trials()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            for worker in workers:
                if status != "FINISHED":
                    worker.terminate()
                worker.wait()
            if status != "FINISHED" and self.client and not os.environ.get(PARENT_ENV):
                self.client.set_terminated(self.parent_run_id, status)
        failed_workers = [w.args for w in workers if w.returncode]
        if failed_workers:
            from abalone.config import AbaloneError

            raise AbaloneError(f"{len(failed_workers)} worker process(es) failed; see their "
                               "output above")
        if not os.environ.get(PARENT_ENV):
            self.finish()

    def start_workers(self) -> list[subprocess.Popen]:
        if os.environ.get(PARENT_ENV) or self.s.n_jobs == 1:
            return []
        # Share the cores: each process's TensorFlow would otherwise spread over all of them, and
        # the processes would only take turns. Set before TensorFlow loads here; workers inherit.
        threads = str(max(1, (os.cpu_count() or 1) // self.s.n_jobs))
        for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(name, threads)
        sweep_dir = Path(self.sweeper.config.hydra.sweep.dir).resolve()
        argv = [a for a in sys.argv[1:] if not a.startswith("hydra.sweeper.n_jobs=")]
        workers = []
        for rank in range(1, self.s.n_jobs):
            env = {**os.environ, RANK_ENV: str(rank), PARENT_ENV: self.parent_run_id or ""}
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "abalone.train", *argv, "hydra.sweeper.n_jobs=1",
                 f"hydra.sweep.dir={sweep_dir}"], env=env))
        log.info("started %d more trial processes", len(workers))
        return workers

    def finished_count(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False,
                                         states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def run_trials(self) -> None:
        import optuna

        from abalone import study
        from abalone.config import AbaloneError

        failures = 0
        while study.work_left(self.study, self.n_trials):
            if self.interrupted.is_set():  # a Ctrl-C lost after the last trial's training
                raise KeyboardInterrupt
            study.fail_stale_trials(self.study, self.s.stale_after, self.end_stale_run)
            if not study.work_left(self.study, self.n_trials):
                break
            trial = self.study.ask(self.space)
            if not study.within_total(self.study, trial.number, self.n_trials):
                # Another process took the last slot between our check and our ask.
                trial.set_user_attr("surplus", True)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            state = self.run_one(trial)
            if state == "FAIL":
                failures += 1
                if failures >= self.s.max_failures:
                    raise AbaloneError(f"{failures} trials failed in this process "
                                       f"(hydra.sweeper.max_failures={self.s.max_failures}); "
                                       "stopping the sweep")

    def run_one(self, trial) -> str:
        import optuna

        from abalone import study

        study.mark_owner(trial)
        overrides = [*self.fixed, *study.trial_overrides(trial.params)]
        context = study.TrialContext(
            trial, self.parent_run_id, self.study_name, self.s.metric, self.interrupted,
            self.study, self.log_models == "all")
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
        value, error = None, None
        if job.status is JobStatus.COMPLETED:
            value = job.return_value
        else:
            error = job._return_value  # the exception the task raised
        if isinstance(error, optuna.TrialPruned):
            state = "PRUNED"
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif error is None and value is not None and math.isfinite(value):
            state = "COMPLETE"
            self.study.tell(trial, value)
        else:
            state = "FAIL"
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.report(trial.number, state, value, error, time.monotonic() - start)
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

    def report(self, number: int, state: str, value, error, seconds: float) -> None:
        try:
            best = self.study.best_trial
            best_text = f"best {best.value:.4f} (trial {best.number})"
        except ValueError:
            best, best_text = None, "best -"
        shown = f"{value:.4f}" if state == "COMPLETE" else "-"
        reason = f"  {type(error).__name__}: {error}" if state == "FAIL" else ""
        log.info("trial %3d  %-8s  %s %s  %s  %.1fs%s", number, state, self.s.metric, shown,
                 best_text, seconds, reason)
        if self.client and best is not None:
            from abalone.study import BEST_OBJECTIVE

            self.client.log_metric(self.parent_run_id, BEST_OBJECTIVE, best.value,
                                   step=self.finished_count())

    # -- the end: best trial, plots, registration ---------------------------------------------

    def finish(self) -> None:
        from optuna.trial import TrialState

        from abalone import tracking
        from abalone.study import BEST_OBJECTIVE

        tally = {state.name: 0 for state in TrialState}
        for trial in self.study.get_trials(deepcopy=False):
            if not trial.user_attrs.get("surplus"):
                tally[trial.state.name] += 1
        if tally["RUNNING"] or tally["WAITING"]:
            log.info("other processes are still running trials of this study; the last one "
                     "to finish registers the best model")
            return
        log.info("study %r: %d COMPLETE, %d PRUNED, %d FAIL", self.study_name, tally["COMPLETE"],
                 tally["PRUNED"], tally["FAIL"])
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            if self.client:
                self.client.set_terminated(self.parent_run_id, "FAILED")
            from abalone.config import AbaloneError

            raise AbaloneError(f"study {self.study_name!r} has no COMPLETE trial; nothing to "
                               "register")
        best = self.study.best_trial
        self.print_table(complete)
        if not self.client:
            return
        client, parent = self.client, self.parent_run_id
        run_id = best.user_attrs["mlflow_run_id"]
        best_run = client.get_run(run_id)
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{key.lower()}", count, now, 0) for key, count in tally.items()]
        metrics.append(Metric(BEST_OBJECTIVE, best.value, now, self.finished_count()))
        if "test_rmse" in best_run.data.metrics:
            metrics.append(Metric("best_trial_test_rmse", best_run.data.metrics["test_rmse"],
                                  now, 0))
        tags = [RunTag("best.trial_number", str(best.number)), RunTag("best.run_id", run_id)]
        tags += [RunTag(f"best.params.{k}", str(v)) for k, v in best.params.items()]
        client.log_batch(parent, metrics=metrics, tags=tags)
        out_dir = Path(self.sweeper.config.hydra.sweep.dir) / "optuna"
        for plot in tracking.save_study_plots(self.study, out_dir):
            client.log_artifact(parent, str(plot), artifact_path="optuna")
        if self.tracking_cfg.register:
            metrics = {k: v for k, v in best_run.data.metrics.items()
                       if k.startswith(("test_", "best_val_"))}
            message = tracking.register_champion(
                client, self.tracking_cfg.registered_model, run_id,
                best.user_attrs["mlflow_model_uri"], metrics,
                tags={"sweep": str(self.s.sweep_name), "study": self.study_name,
                      "trial": str(best.number), "objective": f"{best.value:.4f}",
                      "objective_metric": self.s.metric})
            log.info("%s", message)
            client.set_tag(parent, "registration", message)
        client.set_terminated(parent, "FINISHED")
        log.info("look: %s", tracking.where_to_look(
            self.experiment_id, f"tags.`optuna.study_name` = '{self.study_name}'"))

    def print_table(self, complete) -> None:
        reverse = self.direction == "maximize"
        top = sorted(complete, key=lambda t: t.value, reverse=reverse)[:10]
        log.info("top trials by %s:", self.s.metric)
        log.info("  trial  %10s  mlflow run id                     params", self.s.metric)
        for trial in top:
            params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
            log.info("  %5d  %10.4f  %-32s  %s", trial.number, trial.value,
                     trial.user_attrs.get("mlflow_run_id", "-"), params)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
