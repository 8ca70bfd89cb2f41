"""A Hydra launcher that runs each trial of a sweep as `abalone.run`'s phases called in sequence
(what `abalone.train.main` does through `run_training`), timing each from outside, for the
`overhead` section (scripts/bench/overhead.py), which selects it with
`hydra.launcher._target_=hydra_plugins.abalone_bench.phase_timing_launcher.PhaseTimingLauncher`.

Hydra's own launcher (`BasicLauncher`: composing the trial's config, the job's folder, logging
and .hydra/ files) runs each trial; this one only hands it another task function and times
around it. Fit time comes from a History that also notes when each epoch begins and ends (wall
and CPU seconds): it is first among fit's callbacks, as abalone.run puts the History it is given.
"""

from __future__ import annotations

import time
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher

# The parts of a trial, in the order it meets them; FIT_ENDS is the fit phase minus fit time.
SWEEPER = "sweeper between trials: tell, the trial's line, checks, ask (Optuna storage)"
HYDRA = "Hydra: composing the trial's config, the job's folder, logging and .hydra/ files"
PREPARE = "prepare: config checks, data split, tracking connection, model build and compile"
OPEN = "MLflow run start: tags and params, the run id on the trial"
FIT_ENDS = "Keras fit's set-up and end (callbacks, awaiting the epochs' metrics)"
EVALUATE = "evaluation: test and validation rows, model properties"
RECORD = "record: files, final metrics and tags, artifacts (the model when best)"
END = "MLflow run end"
PARTS = (SWEEPER, HYDRA, PREPARE, OPEN, FIT_ENDS, EVALUATE, RECORD, END)
TRIALS: list[dict] = []  # one record per trial after the first, for bench.overhead


def clock() -> tuple[float, float]:
    """(wall, CPU seconds of all the process's threads)."""
    return time.perf_counter(), time.process_time()


class PhaseTimingLauncher(BasicLauncher):
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=self.run_trial, config=config)
        self.last_end: tuple[float, float] | None = None

    def launch(self, job_overrides, initial_job_idx: int):
        begin = clock()
        self.parts, self.epochs, self.task_seconds = {}, [], None
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            end = clock()
            # The first trial pays the imports and tracing's caches: not counted.
            if self.last_end and self.task_seconds is not None and len(self.epochs) == 4:
                self.record(begin, end)
            self.last_end = end

    def record(self, begin, end) -> None:
        first, second = self.epochs[1][0] - self.epochs[0][0], self.epochs[3][0] - self.epochs[2][0]
        fit_time = self.epochs[3][0] - self.epochs[0][0]
        parts = {SWEEPER: begin[0] - self.last_end[0],
                 HYDRA: end[0] - begin[0] - self.task_seconds, **self.parts}
        parts[FIT_ENDS] = parts.pop("fit") - fit_time
        TRIALS.append({
            "parts": parts, "wall": end[0] - self.last_end[0], "fit time": fit_time,
            "tracing of the first epoch": first - second,
            "overhead CPU": (end[1] - self.last_end[1]) - (self.epochs[3][1] - self.epochs[0][1])})

    def timed(self, part: str, function, *arguments):
        start = time.perf_counter()
        try:
            return function(*arguments)
        finally:
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start

    def run_trial(self, cfg):
        """`abalone.train.main` for a trial: `run_training`'s phases, each timed."""
        from hydra.core.hydra_config import HydraConfig

        from abalone import tracking
        from abalone.run import evaluate_run, fit, open_run, prepare, record
        from abalone.trial import ACTIVE_TRIAL

        start = time.perf_counter()
        runtime = HydraConfig.get().runtime
        trial = ACTIVE_TRIAL.get()
        choices = {group: choice for group, choice in runtime.choices.items()
                   if choice is not None and not group.startswith("hydra/")}
        output_dir = Path(runtime.output_dir)
        ready = self.timed(PREPARE, prepare, cfg)
        history = epoch_times(ready.keras, self.epochs)
        run = self.timed(OPEN, open_run, cfg, ready, history.history, output_dir, trial, choices)
        self.timed(OPEN, run.__enter__)
        try:
            if run.run_id:
                self.timed(OPEN, trial.trial.set_user_attr, "mlflow_run_id", run.run_id)
                self.timed(OPEN, tracking.log_datasets, ready.data.splits, ready.data.path,
                           ready.data.sha256, ready.data.target)
            kept, fit_seconds = self.timed("fit", fit, cfg, ready, run, history, trial)
            result, predicted = self.timed(EVALUATE, evaluate_run, ready, history.history, kept,
                                           fit_seconds, run, trial)
            self.timed(RECORD, record, cfg, ready, history.history, result, predicted,
                       output_dir, run, trial)
        except BaseException as err:
            run.__exit__(type(err), err, err.__traceback__)
            raise
        self.timed(END, run.__exit__, None, None, None)
        self.task_seconds = time.perf_counter() - start
        return result.measured


def epoch_times(keras, times: list):
    """A Keras History that also appends `clock()` to `times` as each epoch begins and ends."""

    class EpochTimes(keras.callbacks.History):
        def on_epoch_begin(self, epoch, logs=None):
            times.append(clock())

        def on_epoch_end(self, epoch, logs=None):
            times.append(clock())
            super().on_epoch_end(epoch, logs)

    return EpochTimes()
