"""`python -m abalone.train [overrides]`: one tracked training run of the Abalone regressor, or
with `-m` a sweep (the `abalone_optuna` sweeper calls back into `main` for each trial).

Heavy imports (Keras, MLflow, scikit-learn: abalone/run.py) wait until the config has composed,
so `--help` and config errors are instant.
"""

from __future__ import annotations

import os
import sys

from abalone.interrupts import PARENT_PIPE_ENV

# Flags after which Hydra prints something and exits: no set-up line for them.
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--cfg", "-c",
              "--shell-completion", "-sc"}


_said = False


def _first_line(argv: list[str]) -> None:
    """What the command sets up, at once: Hydra, TensorFlow and MLflow take 10-20 s to load."""
    global _said
    if INFO_FLAGS & set(argv) or _said:
        return
    _said = True
    if PARENT_PIPE_ENV in os.environ:
        what = "a worker process of the sweep: loading TensorFlow and MLflow"
    elif {"-m", "--multirun"} & set(argv):
        what = ("a sweep: composing the config, opening the study, loading TensorFlow and "
                "MLflow")
    else:
        what = "a training run: composing the config, loading TensorFlow and MLflow"
    print(f"abalone: setting up {what} (10-20 s) ...", file=sys.stderr, flush=True)


if __name__ == "__main__":  # before the imports below: within a second of the start
    _first_line(sys.argv[1:])

import logging  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

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

from abalone import interrupts  # noqa: E402
from abalone.config import AbaloneError, check_option  # noqa: E402
from abalone.redact import redact_files  # noqa: E402
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
    # What Hydra saved before calling us holds the command line's URLs as given.
    redact_files([*(output_dir / ".hydra").glob("*.yaml"),
                  Path(HydraConfig.get().sweep.dir) / "multirun.yaml"])
    try:
        if single:
            from hydra.core.global_hydra import GlobalHydra

            check_option("sweep", choices.get("sweep"),
                         GlobalHydra.instance().config_loader().get_group_options("sweep"))
        from abalone.run import run_training

        encoded = os.environ.get(trial_contract.TRIAL_ENV)
        if trial is None and encoded:  # a trial launched in another process (joblib, SLURM)
            from abalone.trial_job import open_context, run_job

            return run_job(open_context(encoded, cfg.trainer.epochs),
                           lambda context: run_training(cfg, output_dir, context, choices))
        if single:  # a sweep's trials have the sweep's record of a signal
            with interrupts.remembered(threading.Event()) as interrupted:
                result = run_training(cfg, output_dir, None, choices, interrupted)
        else:
            result = run_training(cfg, output_dir, trial, choices)
    except AbaloneError as err:
        if single:
            _fail(str(err))
        raise
    except KeyboardInterrupt:
        if single:  # one line, not Keras's traceback: the run has ended KILLED
            interrupts.say(f"interrupted{interrupts.by()}: the run ended KILLED; nothing was "
                           "registered")
            sys.exit(interrupts.exit_code())
        raise
    except Exception as err:
        from abalone.tracking import failure_reason

        # A full disk, a tracking server that refuses, an outage longer than the grace.
        reason = failure_reason(err) if single else None
        if reason:
            _fail(reason)
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


def _fail(reason: str) -> None:
    interrupts.say(f"error: {reason}")
    sys.exit(1)


def cli() -> None:
    """`python -m abalone.train` and the `abalone-train` command: `main`, with SIGTERM and SIGHUP
    stopping it as Ctrl-C does (abalone.interrupts), and the exit code without the
    interpreter's teardown."""
    import atexit

    _first_line(sys.argv[1:])
    # A log file on a full disk: lose the line, not print a traceback for it to the terminal.
    logging.raiseExceptions = False
    interrupts.install()
    interrupts.watch_parent()
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
    except KeyboardInterrupt:  # before a run or a sweep began: while loading or composing
        exit_code[0] = interrupts.exit_code()
        interrupts.say(f"interrupted{interrupts.by()} while starting: nothing was run")


if __name__ == "__main__":
    cli()
