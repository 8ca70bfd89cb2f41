"""`python -m abalone.train [overrides]`: one tracked training run of the Abalone regressor, or
with `-m` a sweep (the `abalone_optuna` sweeper calls back into `main` for each trial).

Heavy imports (Keras, MLflow, scikit-learn: abalone/run.py) wait until the config has composed,
so `--help` and config errors are instant.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
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
from omegaconf import DictConfig  # noqa: E402

from abalone.config import AbaloneError  # noqa: E402
# The module, not its ContextVar: run as `python -m abalone.train`, `main` is pickled by value for
# launchers that run jobs in other processes (joblib), and a ContextVar cannot be pickled.
import abalone.trial as trial_contract  # noqa: E402

# By name: run as `python -m abalone.train` this module is __main__, outside the abalone loggers.
log = logging.getLogger("abalone.train")
# abalone/conf: in the source tree (an editable install, the image) a symlink to the top-level
# conf/, in a wheel the configs themselves (pyproject.toml's package-data). An absolute path lets
# the `abalone-train` console script find it as well as `python -m abalone.train`.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _summary(cfg: DictConfig, result, output_dir: Path) -> None:
    from abalone.tracking import where_to_look

    held_out = "  ".join(f"{k[5:]} {v:.4f}" for k, v in result.metrics.items()
                         if k.startswith("test_"))
    log.info("done: %d epochs in %.1fs; test %s", result.epochs_run, result.fit_seconds,
             held_out)
    log.info("outputs: %s", output_dir)
    if result.run_id:
        log.info("MLflow run id: %s", result.run_id)
        if result.model_version:
            log.info("registered: %s version %s", cfg.tracking.registered_model,
                     result.model_version)
        log.info("look: %s", where_to_look(result.experiment_id))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | dict[str, float] | None:
    runtime = HydraConfig.get().runtime
    output_dir = Path(runtime.output_dir)
    trial = trial_contract.ACTIVE_TRIAL.get()
    choices = {group: choice for group, choice in runtime.choices.items()
               if choice is not None and not group.startswith("hydra/")}
    single = HydraConfig.get().mode is RunMode.RUN
    try:
        from abalone.run import run_training

        encoded = os.environ.get(trial_contract.TRIAL_ENV)
        if trial is None and encoded:  # a trial launched in another process (joblib, SLURM)
            from abalone.sweep.launchers import open_context, run_job

            return run_job(open_context(encoded, cfg.trainer.epochs),
                           lambda context: run_training(cfg, output_dir, context, choices))
        if single:  # a sweep's trials have the sweep's record of a Ctrl-C
            with trial_contract.interrupts_remembered(threading.Event()) as interrupted:
                result = run_training(cfg, output_dir, None, choices, interrupted)
        else:
            result = run_training(cfg, output_dir, trial, choices)
    except AbaloneError as err:
        if single:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        raise
    except KeyboardInterrupt:
        if single:  # one line, not Keras's traceback: the run has ended KILLED
            print("interrupted: the run ended KILLED; nothing was registered", file=sys.stderr)
            sys.exit(130)
        raise
    except Exception:
        from abalone.tracking import OUTAGE

        # An outage longer than tracking.outage_grace reaches here as MLflow's exception.
        if OUTAGE.given_up and single:
            print(f"error: {OUTAGE.given_up}", file=sys.stderr)
            sys.exit(1)
        raise
    if trial:
        return result.measured
    _summary(cfg, result, output_dir)
    # The task's primary metric: best_val_rmse, or best_val_log_loss when classifying.
    return result.metrics.get("best_val_rmse", result.metrics.get("best_val_log_loss"))


def _leave_without_teardown(exit_code: list[int]) -> None:
    """The last exit handler: flush and leave with the exit code, skipping the interpreter's
    teardown. TensorFlow's alone takes seconds (3.7 s measured) after everything of ours has
    ended, and a sweep waits for each of its worker processes to exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code[0])


if __name__ == "__main__":
    import atexit

    exit_code = [1]  # an uncaught exception's, after Python has printed it
    # Registered before TensorFlow, MLflow and logging register theirs, so it runs after them.
    atexit.register(_leave_without_teardown, exit_code)
    try:
        main()
        exit_code[0] = 0
    except SystemExit as stop:
        exit_code[0] = (0 if stop.code is None else stop.code if isinstance(stop.code, int)
                        else 1)  # a message: Python prints it
        raise
    except KeyboardInterrupt:
        exit_code[0] = 130
        raise
