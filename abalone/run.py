"""One training run in four phases, each a function: `prepare` (ranges, data, the tracking
connection, the S3 check, the compiled model), `fit`, `evaluate`, `record` (files, S3, MLflow,
the registry). `run_training` reads them top to bottom.

Order matters for failing cleanly: everything `prepare` checks fails before an MLflow run
exists; once the run has started, `tracking.TrackedRun` ends it FAILED (Ctrl-C, a pruned trial:
KILLED) with why, and nothing is registered. In a sweep the run is handed an
`abalone.trial.TrialContext`: it nests under the sweep's parent run, reports each epoch to the
pruner, records the trial's state and objective, and logs its model only when the context says.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig

from abalone import aws, data, dataset, evaluate, interrupts, outputs, tracking
from abalone.config import ConfigError, check_ranges
from abalone.keras_setup import import_keras, seed_randomness
from abalone.tracking import records
from abalone.trial import TrialContext, kept_value

log = logging.getLogger(__name__)
_FIT_PATH_REFUSALS: set[str] = set()  # said once per process
# Each Keras model built leaves ~0.7 MiB behind in Keras's and TensorFlow's global state until
# keras.backend.clear_session(), which also costs the compiled programs ~0.5 s each to set up
# again: a long sweep's process clears it every this many runs (RSS stays flat).
SESSION_RUNS = 100
_runs_in_process = itertools.count(1)


@dataclass
class RunResult:
    run_id: str | None
    experiment_id: str | None
    metrics: dict[str, float]
    epochs_run: int
    fit_seconds: float
    model_version: str | None = None
    objective: float | None = None  # in a sweep: the sweep's metric for the weights kept
    objective_epoch: int | None = None  # the epoch (from 1) whose weights were kept
    # in a sweep: each value the sweep optimises or constrains (trial.measures), by name
    measured: dict[str, float] = field(default_factory=dict)
    s3_location: str | None = None
    logs_model: bool = True  # whether the run logs its model (a sweep's trial may not)


@dataclass
class Prepared:
    """What `prepare` readies: the data as the model takes it, the model, the tracking."""

    data: dataset.Dataset
    x: dict[str, dict]  # train, val, test: the model's inputs
    y: dict[str, object]  # train, val, test: the targets
    model: object
    keras: object
    experiment_id: str | None  # None: tracking.enabled=false
    mlp_plan: object = None  # trainer.fit_path=shared, when it can: an mlp_program.MlpPlan
    # The configuration's learning rate (abalone.model.LearningRate), None for an optimizer of
    # a builder of one's own.
    learning_rate: object = None


def steps_in_epoch(cfg: DictConfig, ds: dataset.Dataset) -> int:
    return -(-len(ds.splits.train) // cfg.trainer.batch_size)


def build_model(cfg: DictConfig, ds: dataset.Dataset, keras):
    """The configured model, compiled, told of the table's training rows (`table=`, a
    model.TableInputs), with the task's loss and metrics; a builder's result is checked."""
    from abalone.model import check_built, compile_arguments

    builder = cfg.model.get("_target_")
    try:
        # A partial first: instantiate would turn a dataclass given as a keyword into a config.
        model = instantiate(cfg.model, _partial_=True)(table=ds.table)
    except (ValueError, TypeError) as err:  # an unknown activation; a builder's own signature
        raise ConfigError(f"config group model: model builder {builder}: {err}") from err
    except ImportError as err:
        raise ConfigError(f"config group model: cannot import the builder {builder}: {err}"
                          ) from err
    check_built(model, builder, ds.table)
    steps_per_epoch = steps_in_epoch(cfg, ds)
    optimizer = instantiate(cfg.optimizer, steps_per_epoch=steps_per_epoch,
                            epochs=cfg.trainer.epochs)
    # One call into the compiled step function per epoch: Python round trips, not arithmetic,
    # dominate a network this small. Under TensorFlow, XLA's compile time outweighs its gain;
    # JAX without jit would run op by op.
    model.compile(optimizer=optimizer, **compile_arguments(ds.table),
                  steps_per_execution=cfg.trainer.steps_per_execution or steps_per_epoch,
                  jit_compile=keras.backend.backend() != "tensorflow")
    return model


# -- the four phases ------------------------------------------------------------------------


def prepare(cfg: DictConfig) -> Prepared:
    """Everything that can fail before a run exists: ranges, data, tracking, S3, the model."""
    check_ranges(cfg)
    ds = dataset.load(cfg.data)
    # null: the data's own name (data.model_name, or the file's stem and target), so recorded.
    cfg.tracking.registered_model = cfg.tracking.registered_model or ds.model_name
    experiment_id = tracking.connect(cfg.tracking) if cfg.tracking.enabled else None
    if cfg.output.s3_uri:
        aws.check_s3_output(cfg.output.s3_uri)
    keras = import_keras()
    if next(_runs_in_process) % SESSION_RUNS == 0:
        keras.backend.clear_session()
    seed_randomness(cfg.trainer.seed, keras)
    parts = {"train": ds.splits.train, "val": ds.splits.val, "test": ds.splits.test}
    model = build_model(cfg, ds, keras)
    from abalone.model import LearningRate

    rate = LearningRate.of(cfg.optimizer, steps_in_epoch(cfg, ds), cfg.trainer.epochs)
    mlp_plan = None
    if cfg.trainer.fit_path == "shared" and not cfg.trainer.steps_per_execution:
        from abalone import mlp_program  # TensorFlow: only after import_keras, quietly

        mlp_plan, why_not = mlp_program.plan(model, rate, cfg.optimizer.weight_decay, ds.task)
        if mlp_plan is None and why_not not in _FIT_PATH_REFUSALS:
            _FIT_PATH_REFUSALS.add(why_not)
            log.info("trainer.fit_path=shared cannot train this model (%s): using model.fit",
                     why_not)
    return Prepared(ds, {k: ds.inputs(f, k) for k, f in parts.items()},
                    {k: ds.targets(f) for k, f in parts.items()}, model, keras, experiment_id,
                    mlp_plan, rate)


def fit(cfg: DictConfig, ready: Prepared, run: tracking.TrackedRun, history,
        trial: TrialContext | None):
    """Train with the run's callbacks; return (the `BestEpoch` that chose the epoch whose
    weights the model holds, and the seconds fit took)."""
    # Keras's callbacks import Keras: only after import_keras has initialised it quietly.
    from abalone.callbacks import (BestEpoch, EpochPrinter, MlflowLogger, RaiseOnDivergence,
                                   RaiseOnInterrupt)

    t, keras = cfg.trainer, ready.keras
    rate = ready.learning_rate.after_epoch if ready.learning_rate else None
    # The epoch kept and early stopping watch the sweep's metric in its direction, else
    # val_loss. History first, so it holds the epoch a pruner stops at too.
    chooser = (BestEpoch(trial.metric, trial.maximize, t.patience, t.keep == "best") if trial
               else BestEpoch("val_loss", False, t.patience, t.keep == "best"))
    callbacks: list = [history, chooser]
    if t.verbose:
        callbacks.append(EpochPrinter(t.epochs, rate))
    if run.run_id:
        run.logger = MlflowLogger(run.client, run.run_id, learning_rate=rate)
        callbacks.append(run.logger)
    callbacks.append(RaiseOnDivergence())
    # Last, so the epoch is logged before a prune or Ctrl-C stops training.
    if trial and trial.prune:  # Optuna cannot prune multi-objective studies
        from optuna_integration import KerasPruningCallback

        callbacks.append(KerasPruningCallback(trial.trial, trial.metric))
    if run.interrupted is not None:
        callbacks.append(RaiseOnInterrupt(run.interrupted))
    train, val = (ready.x["train"], ready.y["train"]), (ready.x["val"], ready.y["val"])
    start = time.perf_counter()
    if ready.mlp_plan:
        from abalone import mlp_program

        mlp_program.fit(ready.mlp_plan, train, val, t.batch_size, t.seed, t.epochs, callbacks,
                        chooser)
    else:
        ready.model.fit(**data.fit_arguments(train, val, t.batch_size, t.seed,
                                             keras.backend.backend()),
                        epochs=t.epochs, verbose=0, callbacks=callbacks)
    return chooser, time.perf_counter() - start


def evaluate_run(ready: Prepared, history: dict, chooser, fit_seconds: float,
                 run: tracking.TrackedRun, trial: TrialContext | None):
    """Held-out metrics and model properties of the weights kept (`chooser`: fit's
    `BestEpoch`), and the epochs kept and best; in a sweep, each value the trial is measured by
    and whether it logs its model. Returns (the result, the test predictions)."""
    from abalone.model import model_properties

    keras, model = ready.keras, ready.model
    kept = chooser.kept_epoch
    # A direct call: model.predict would trace yet another function for a single batch.
    predicted = keras.ops.convert_to_numpy(model(ready.x["test"], training=False))
    task, classes = ready.data.task, (ready.data.spec or {}).get("classes")
    metrics = evaluate.held_out_metrics(task, ready.y["test"], predicted, "test", classes)
    metrics.update(evaluate.held_out_metrics(
        task, ready.y["val"], keras.ops.convert_to_numpy(model(ready.x["val"], training=False)),
        "best_val", classes))
    metrics.update(model_properties(model, ready.x["test"], keras))
    # From 1, as the per-epoch metrics' steps; best: by the value the kept epoch is chosen on.
    metrics["kept_epoch"] = kept + 1
    if chooser.best_epoch is not None:
        metrics["best_epoch"] = chooser.best_epoch + 1
    result = RunResult(run.run_id, ready.experiment_id, metrics, len(history["loss"]),
                       fit_seconds)
    if trial:
        from abalone.callbacks import TrainingDiverged  # after import_keras, as in fit

        for name in dict.fromkeys((trial.metric, *trial.measures)):
            value = metrics[name] if name in metrics else kept_value(history, name, kept)
            if math.isnan(value):
                raise TrainingDiverged(f"{name}, which the sweep optimises or constrains, "
                                       "became NaN or infinite")
            result.measured[name] = value
        result.objective = result.measured[trial.metric]
        result.objective_epoch = kept + 1
        result.logs_model = trial.logs_model(result.objective)
    return result, predicted


def record(cfg: DictConfig, ready: Prepared, history: dict, result: RunResult, predicted,
           output_dir: Path, run: tracking.TrackedRun, trial: TrialContext | None) -> None:
    """The run's folder, its upload to output.s3_uri, and in MLflow its held-out metrics, files
    and pyfunc model; outside sweeps the model is registered."""
    if ready.mlp_plan and result.logs_model:
        ready.mlp_plan.trained_by.store_optimizer(ready.mlp_plan)  # saved with the model
    config_path, plots, keras_path = outputs.save_files(
        cfg, ready.model, history, ready.y["test"], predicted, output_dir, result.logs_model,
        ready.data.task, (ready.data.spec or {}).get("classes"))
    if cfg.output.s3_uri:
        result.s3_location = aws.upload_folder(output_dir, cfg.output.s3_uri,
                                               result.run_id or output_dir.name)
        log.info("outputs uploaded to %s", result.s3_location)
    if not run.run_id:
        return
    # A trial's optuna.state is overwritten (FAIL) should logging its model fail.
    tags = {"output.s3_location": result.s3_location} if result.s3_location else {}
    if trial:
        tags["optuna.state"] = "COMPLETE"
    records.log_results(run, result.metrics, tags,
                        (result.objective, result.objective_epoch) if trial else None)
    records.log_files([config_path])
    records.log_files(plots, "plots")
    if keras_path is None:
        return
    model_uri = tracking.log_model(keras_path, ready.data.splits.test[ready.data.columns],
                                   predicted, ready.data.save_spec(output_dir))
    if trial:
        trial.trial.set_user_attr("mlflow_model_uri", model_uri)
    elif cfg.tracking.register:
        result.model_version = tracking.register_checked(
            model_uri, cfg.tracking.registered_model, result.run_id, result.metrics,
            ready.data).version


def record_stop(cfg: DictConfig, history: dict, output_dir: Path, trial: TrialContext | None,
                run: tracking.TrackedRun, error: BaseException, interrupted: bool) -> None:
    """What a stopped run still records, to compare with finished runs: why, in its description;
    for a pruned trial its objective; unless interrupted, config.yaml and the learning curves so
    far (a pruned trial's curves are its per-epoch metrics, which MLflow charts itself)."""
    # A Ctrl-C may land between History's record of an epoch and the logger's: count the epochs
    # the run holds (its logger has sent them all by now).
    epochs = records.epochs_logged(run) if run.logger else len(history.get("loss", []))
    after = f"after {epochs} epoch{'s' * (epochs != 1)}"
    pruned = trial is not None and isinstance(error, optuna.TrialPruned) and not interrupted
    objective = None
    if interrupted:
        note = f"Interrupted ({interrupts.cause()}) {after}."
        if trial:
            note += " The sweep runs its parameters again when it resumes."
    elif pruned:
        value = history[trial.metric][-1]
        note = (f"Pruned at epoch {epochs} with {trial.metric} {value:.4f}: the pruner "
                f"found it unpromising against the earlier trials at that epoch.")
        objective = value, epochs
    else:
        note = f"Failed {after}: {type(error).__name__}: {error}"
    records.log_stop(note, objective)
    if not interrupted:
        records.log_files([outputs.save_config(cfg, output_dir)])
        if epochs and not pruned:
            records.log_files([evaluate.save_learning_curves(history, output_dir / "plots")],
                              "plots")


def open_run(cfg: DictConfig, ready: Prepared, history: dict, output_dir: Path,
             trial: TrialContext | None, choices: dict[str, str],
             interrupted: threading.Event | None = None) -> tracking.TrackedRun:
    """The run's tracking: its name, tags and params (the config, and the group choices as
    written, `model=wide`, beside the keys they expand to), nested under a sweep's parent.
    `interrupted` is set by a Ctrl-C (a trial's comes with its context)."""
    interrupted = trial.interrupted if trial else interrupted
    if ready.experiment_id is None:
        return tracking.TrackedRun(None, interrupted=interrupted)
    tags = tracking.run_tags({**ready.data.located.tags, **tracking.table_identity(ready.data)})
    params = {**tracking.flat_params(cfg), **choices}
    run_name = cfg.tracking.run_name
    if trial:
        tags.update({"optuna.study_name": trial.study_name,
                     "optuna.trial_number": str(trial.trial.number),
                     "optuna.sampled_keys": ", ".join(trial.trial.params)})
        # Short, and unique across sweeps once a sorted table flattens the nesting.
        run_name = f"{run_name or trial.study_name}-t{trial.trial.number}"
        params["objective_metric"] = trial.metric
    elif not run_name:
        # MLflow's random names come from Python's `random`, which the run's seed resets: every
        # single run would get the same one.
        stamp = time.strftime("%Y%m%d-%H%M%S") + f".{int(time.time() * 1000) % 1000:03d}"
        run_name = f"{choices.get('model', 'model')}-{ready.data.name}-{stamp}"
    return tracking.TrackedRun(
        ready.experiment_id, run_name, tags, params,
        parent_run_id=trial.parent_run_id if trial else None, is_trial=trial is not None,
        interrupted=interrupted,
        on_stop=functools.partial(record_stop, cfg, history, output_dir, trial))


def run_training(cfg: DictConfig, output_dir: Path, trial: TrialContext | None = None,
                 choices: dict[str, str] | None = None,
                 interrupted: threading.Event | None = None) -> RunResult:
    """Train, evaluate, log and (outside sweeps) register one model as `cfg` says; a single
    run's Ctrl-C sets `interrupted`."""
    ready = prepare(cfg)
    if trial is None and ready.experiment_id:
        tracking.end_runs_of_gone_processes(ready.experiment_id)
        if cfg.tracking.register:  # before any run exists
            tracking.check_name(cfg.tracking.registered_model, ready.data)
    history = ready.keras.callbacks.History()
    run = open_run(cfg, ready, history.history, output_dir, trial, choices or {}, interrupted)
    try:
        with run:
            if run.run_id and trial:
                trial.trial.set_user_attr("mlflow_run_id", run.run_id)
            elif run.run_id:
                records.say_where(run.run_id, cfg.tracking.experiment)
            if run.run_id:
                tracking.log_datasets(ready.data.splits, ready.data.source, ready.data.sha256,
                                      ready.data.target)
            chooser, fit_seconds = fit(cfg, ready, run, history, trial)
            result, predicted = evaluate_run(ready, history.history, chooser, fit_seconds, run,
                                             trial)
            record(cfg, ready, history.history, result, predicted, output_dir, run, trial)
    except BaseException as err:
        # During a Ctrl-C, TensorFlow may raise its own error instead of the interrupt.
        if run.was_interrupted(err) and not isinstance(err, KeyboardInterrupt):
            raise KeyboardInterrupt from err
        raise
    return result
