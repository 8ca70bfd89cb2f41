"""`python -m abalone.train [overrides]`: one tracked training run of the Abalone regressor.

Order matters for failing cleanly: config ranges, then data, then the tracking server are checked
before a run exists; once the MLflow run has started, any error ends it FAILED (Ctrl-C: KILLED)
and nothing is registered. Heavy imports (Keras, MLflow, scikit-learn) wait until the config has
composed, so `--help` and config errors are instant.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Before TensorFlow and MLflow load: keep their INFO lines and progress bars off the terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's "View run / View experiment" lines after every run; we print one link to the runs table.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from abalone.config import AbaloneError, ConfigError, check_ranges  # noqa: E402

log = logging.getLogger("abalone")
# abalone/conf: in the source tree (an editable install, the image) a symlink to the top-level
# conf/, in a wheel the configs themselves (pyproject.toml's package-data). An absolute path lets
# the `abalone-train` console script find it as well as `python -m abalone.train`.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


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


@contextlib.contextmanager
def _native_stderr_captured():
    """Hold back what native code writes to stderr (TensorFlow's absl lines, which ignore
    TF_CPP_MIN_LOG_LEVEL before absl is initialised); replay it if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_keras():
    """Import Keras (and its backend) and initialise the backend's devices, quietly."""
    with _native_stderr_captured():
        import keras

        keras.ops.convert_to_numpy(keras.ops.zeros(1))
    return keras


def build_model(cfg: DictConfig, splits, keras):
    """The configured model, compiled, with normalisation statistics of the training rows."""
    from hydra.utils import instantiate

    from abalone.serving import NUMERIC_COLUMNS

    measurements = splits.train[list(NUMERIC_COLUMNS)].to_numpy("float64")
    try:
        model = instantiate(cfg.model, feature_mean=measurements.mean(axis=0),
                            feature_variance=measurements.var(axis=0))
    except ValueError as err:  # e.g. an unknown activation name
        raise ConfigError(f"config group model: {err}") from err
    steps_per_epoch = -(-len(splits.train) // cfg.trainer.batch_size)
    optimizer = instantiate(cfg.optimizer, steps_per_epoch=steps_per_epoch,
                            epochs=cfg.trainer.epochs)
    # One call into the compiled step function per epoch: Python round trips, not arithmetic,
    # dominate a network this small. Under TensorFlow, XLA's compile time outweighs its gain;
    # JAX without jit would run op by op.
    model.compile(optimizer=optimizer, loss="mse",
                  metrics=[keras.metrics.RootMeanSquaredError(name="rmse"),
                           keras.metrics.MeanAbsoluteError(name="mae")],
                  steps_per_execution=cfg.trainer.steps_per_execution or steps_per_epoch,
                  jit_compile=keras.backend.backend() != "tensorflow")
    return model


# Rows in the batch whose prediction time `predict_seconds` measures.
PREDICT_BATCH = 256


def model_properties(model, rows: dict, keras) -> dict[str, float]:
    """What a sweep may optimise or constrain besides validation metrics: the parameter count,
    and the median seconds of one prediction on PREDICT_BATCH rows on this machine (after a
    warm-up call; a direct call, as serving makes)."""
    batch = {name: column[:PREDICT_BATCH] for name, column in rows.items()}
    keras.ops.convert_to_numpy(model(batch, training=False))
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(model(batch, training=False))
        seconds.append(time.perf_counter() - start)
    return {"params_count": float(model.count_params()),
            "predict_seconds": sorted(seconds)[len(seconds) // 2]}


def run_training(cfg: DictConfig, output_dir: Path, trial=None,
                 choices: dict[str, str] | None = None) -> RunResult:
    """Train, evaluate, log and (outside sweeps) register one model as `cfg` says.

    `trial` is the sweep's `abalone.study.TrialContext`: the run then nests under the sweep's
    parent run, reports each epoch to the pruner, and records the trial's Optuna state and
    objective. `choices` (config group -> option, e.g. model -> wide) are logged as params.
    """
    check_ranges(cfg)
    from abalone import data

    data_path = data.resolve_path(cfg.data)
    splits = data.split(data.load(data_path), cfg.data)

    import mlflow

    from abalone import tracking

    tracked = cfg.tracking.enabled
    experiment_id = tracking.connect(cfg.tracking) if tracked else None
    if cfg.output.s3_uri:
        from abalone.aws import check_s3_output

        check_s3_output(cfg.output.s3_uri)

    keras = import_keras()
    from abalone.callbacks import (EpochPrinter, MlflowLogger, RaiseOnDivergence,
                                   RaiseOnInterrupt, TrainingDiverged)
    from abalone.serving import model_inputs

    t = cfg.trainer
    keras.utils.set_random_seed(t.seed)
    train_x, val_x, test_x = (model_inputs(f) for f in (splits.train, splits.val, splits.test))
    train_y, val_y, test_y = (data.target(f) for f in (splits.train, splits.val, splits.test))
    model = build_model(cfg, splits, keras)

    # First, so it holds the epoch a pruner stops at too: a stopped run still plots its curves.
    history = keras.callbacks.History()
    callbacks: list = [history]
    early_stopping = None
    if t.patience:
        early_stopping = keras.callbacks.EarlyStopping(monitor="val_loss", patience=t.patience,
                                                       restore_best_weights=True)
        callbacks.append(early_stopping)
    if t.verbose:
        callbacks.append(EpochPrinter(t.epochs))

    run_id, mlflow_logger = None, None
    if tracked:
        run_tags = tracking.run_tags(data_path, data.sha256_of(data_path))
        run_name = cfg.tracking.run_name
        # Group choices as written (model=wide), beside the keys they expand to (model.units).
        params = {**tracking.flat_params(cfg), **(choices or {})}
        if trial:
            run_tags.update({"optuna.study_name": trial.study_name,
                             "optuna.trial_number": str(trial.trial.number),
                             "optuna.sampled_keys": ", ".join(trial.trial.params)})
            # Short, and unique across sweeps once a sorted table flattens the nesting.
            run_name = f"{run_name or trial.study_name}-t{trial.trial.number}"
            params["objective_metric"] = trial.metric
        run_id = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags,
                                  parent_run_id=trial.parent_run_id if trial else None
                                  ).info.run_id
    try:
        if tracked:
            client = mlflow.MlflowClient()
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v)
                                             for k, v in params.items()])
            mlflow_logger = MlflowLogger(client, run_id)
            callbacks.append(mlflow_logger)
            if trial:
                trial.trial.set_user_attr("mlflow_run_id", run_id)
            else:
                log.info("MLflow run %s in experiment %r at %s", run_id, cfg.tracking.experiment,
                         tracking.redact(mlflow.get_tracking_uri()))
        callbacks.append(RaiseOnDivergence())
        if trial:  # last, so the epoch is logged before a prune or Ctrl-C stops training
            from optuna_integration import KerasPruningCallback

            if trial.prune:  # Optuna cannot prune multi-objective studies
                callbacks.append(KerasPruningCallback(trial.trial, trial.metric))
            callbacks.append(RaiseOnInterrupt(trial.interrupted))
        fit_start = time.perf_counter()
        model.fit(**data.fit_arguments((train_x, train_y), (val_x, val_y), t.batch_size, t.seed,
                                       keras.backend.backend()),
                  epochs=t.epochs, verbose=0, callbacks=callbacks)
        fit_seconds = time.perf_counter() - fit_start

        from abalone import evaluate

        # A direct call: model.predict would trace yet another function for a single batch.
        predicted = keras.ops.convert_to_numpy(model(test_x, training=False))
        metrics = evaluate.regression_metrics(test_y, predicted, "test")
        metrics.update(evaluate.regression_metrics(
            val_y, keras.ops.convert_to_numpy(model(val_x, training=False)), "best_val"))
        metrics.update(model_properties(model, test_x, keras))
        result = RunResult(run_id, experiment_id, metrics, len(history.history["loss"]),
                           fit_seconds)
        with_model = True
        if trial:
            from abalone.study import kept_value, logs_model

            restored = early_stopping is not None and early_stopping.best_weights is not None
            kept = early_stopping.best_epoch if restored else result.epochs_run - 1
            for name in dict.fromkeys((trial.metric, *trial.measures)):
                value = (metrics[name] if name in metrics
                         else kept_value(history.history, name, kept))
                if math.isnan(value):
                    raise TrainingDiverged(f"{name}, which the sweep optimises or constrains, "
                                           "became NaN or infinite")
                result.measured[name] = value
            result.objective = result.measured[trial.metric]
            result.objective_epoch = kept + 1
            with_model = logs_model(trial, result.objective)

        save_outputs(cfg, model, history.history, splits.test, predicted, output_dir, result,
                     trial, with_model)
    except BaseException as err:
        # During a sweep's Ctrl-C, TensorFlow may raise its own error instead of the interrupt.
        interrupted = trial is not None and trial.interrupted.is_set()
        if tracked:
            end_stopped_run(cfg, err, history.history, output_dir, trial, mlflow_logger,
                            interrupted)
        if interrupted and not isinstance(err, KeyboardInterrupt):
            raise KeyboardInterrupt from err
        raise
    if tracked:
        mlflow.end_run("FINISHED")
    return result


def end_stopped_run(cfg: DictConfig, error: BaseException, history: dict, output_dir: Path,
                    trial, mlflow_logger, interrupted: bool) -> None:
    """End the active run after `error` (FAILED, or KILLED for a pruned trial and Ctrl-C),
    first recording what still compares with finished runs: the epochs' metrics, config.yaml,
    the learning curves so far, for a pruned trial its objective, and in the run's description
    why it stopped. Recording is best effort: the original error is what the caller raises."""
    import mlflow
    import optuna

    from abalone import evaluate, tracking
    from abalone.study import OBJECTIVE

    epochs = len(history.get("loss", []))
    after = f"after {epochs} epoch{'s' * (epochs != 1)}"
    try:
        if mlflow_logger is not None:
            mlflow_logger.close()
        if interrupted or isinstance(error, KeyboardInterrupt):
            note = f"Interrupted (Ctrl-C) {after}."
            if trial:
                note += " The sweep runs its parameters again when it resumes."
        elif trial and isinstance(error, optuna.TrialPruned):
            value = history[trial.metric][-1]
            note = (f"Pruned at epoch {epochs} with {trial.metric} {value:.4f}: the pruner "
                    f"found it unpromising against the earlier trials at that epoch.")
            mlflow.log_metric(OBJECTIVE, value, step=epochs)
        else:
            note = f"Failed {after}: {type(error).__name__}: {error}"
        mlflow.set_tag("mlflow.note.content", note)
        if not (interrupted or isinstance(error, KeyboardInterrupt)):
            mlflow.log_artifact(str(save_config(cfg, output_dir)))
            # A pruned trial's curves are its per-epoch metrics, which MLflow charts itself.
            if epochs and not isinstance(error, optuna.TrialPruned):
                mlflow.log_artifact(str(evaluate.save_learning_curves(
                    history, output_dir / "plots")), artifact_path="plots")
    except Exception as record_error:  # noqa: BLE001 - never hides the run's own error
        log.warning("could not record why the MLflow run stopped: %s: %s",
                    type(record_error).__name__, record_error)
    finally:
        try:
            tracking.end_failed_run(error, is_trial=trial is not None, interrupted=interrupted)
        except Exception as end_error:  # noqa: BLE001 - e.g. the server went away
            log.warning("could not end the MLflow run: %s: %s", type(end_error).__name__,
                        end_error)


def save_config(cfg: DictConfig, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return config_path


def save_outputs(cfg: DictConfig, model, history: dict, test_rows, predicted, output_dir: Path,
                 result: RunResult, trial, with_model: bool = True) -> None:
    """Write the run's folder (config, plots, Keras model), upload it to output.s3_uri, and log
    it to the active MLflow run with the pyfunc model; register the model outside sweeps.
    Without `with_model` (a trial that is not the best so far) only config.yaml is written and
    logged: its plots and model would cost most of a short trial's time and never be used."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    from abalone import data, evaluate, tracking

    config_path = save_config(cfg, output_dir)
    plots, keras_path = [], output_dir / "model.keras"
    if with_model:
        plots = evaluate.save_plots(history, data.target(test_rows), predicted,
                                    output_dir / "plots")
        model.save(keras_path)
    if cfg.output.s3_uri:
        from abalone import aws

        result.s3_location = aws.upload_folder(output_dir, cfg.output.s3_uri,
                                               result.run_id or output_dir.name)
        log.info("outputs uploaded to %s", result.s3_location)
    if not result.run_id:
        return
    # One request for the held-out metrics and the tags. A trial's optuna.state is overwritten
    # (FAIL) should logging its model fail.
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in result.metrics.items()]
    tags = [RunTag("output.s3_location", result.s3_location)] if result.s3_location else []
    if trial:
        from abalone.study import OBJECTIVE

        metrics.append(Metric(OBJECTIVE, result.objective, now, result.objective_epoch))
        tags.append(RunTag("optuna.state", "COMPLETE"))
    mlflow.MlflowClient().log_batch(result.run_id, metrics=metrics, tags=tags)
    mlflow.log_artifact(str(config_path))
    for plot in plots:
        mlflow.log_artifact(str(plot), artifact_path="plots")
    if not with_model:
        return
    model_uri = tracking.log_model(keras_path, test_rows, predicted)
    if trial:
        trial.trial.set_user_attr("mlflow_model_uri", model_uri)
    elif cfg.tracking.register:
        result.model_version = tracking.register(model_uri, cfg.tracking.registered_model,
                                                 result.run_id, result.metrics).version


def _summary(cfg: DictConfig, result: RunResult, output_dir: Path) -> None:
    m = result.metrics
    log.info("done: %d epochs in %.1fs; test rmse %.4f  mae %.4f  r2 %.4f", result.epochs_run,
             result.fit_seconds, m["test_rmse"], m["test_mae"], m["test_r2"])
    log.info("outputs: %s", output_dir)
    if result.run_id:
        log.info("MLflow run id: %s", result.run_id)
        if result.model_version:
            log.info("registered: %s version %s", cfg.tracking.registered_model,
                     result.model_version)
        from abalone.tracking import where_to_look

        log.info("look: %s", where_to_look(result.experiment_id))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from abalone.study import ACTIVE_TRIAL

    runtime = HydraConfig.get().runtime
    output_dir = Path(runtime.output_dir)
    trial = ACTIVE_TRIAL.get()
    choices = {group: choice for group, choice in runtime.choices.items()
               if choice is not None and not group.startswith("hydra/")}
    try:
        result = run_training(cfg, output_dir, trial, choices)
    except AbaloneError as err:
        if HydraConfig.get().mode is RunMode.RUN:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        raise
    except Exception:
        from abalone.tracking import OUTAGE

        # An outage longer than tracking.outage_grace reaches here as MLflow's exception.
        if OUTAGE.given_up and HydraConfig.get().mode is RunMode.RUN:
            print(f"error: {OUTAGE.given_up}", file=sys.stderr)
            sys.exit(1)
        raise
    if trial:
        return result.measured
    _summary(cfg, result, output_dir)
    return result.metrics["best_val_rmse"]


if __name__ == "__main__":
    main()
