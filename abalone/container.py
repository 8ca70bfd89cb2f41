"""How the container image starts: `python -m abalone.container [train] [overrides]`.

One entry point for both ways the image runs:
- EC2 (`scripts/run_training.sh`, or `docker run IMAGE overrides`): the arguments are Hydra
  overrides, exactly as for `python -m abalone.train`.
- A SageMaker training job starts the image as `IMAGE train`. The data channel is then mounted at
  /opt/ml/input/data/training, the job's hyperparameters are in
  /opt/ml/input/config/hyperparameters.json (each key=value becomes a Hydra override, so
  `{"model": "wide", "trainer.epochs": "20"}` trains `model=wide trainer.epochs=20`, and
  `{"hydra.mode": "MULTIRUN", "sweep": "quick"}` runs a sweep), outputs go to /opt/ml/model, and a
  failure's reason goes to /opt/ml/output/failure, which SageMaker shows as the job's
  FailureReason. With no arguments at all, a SageMaker-shaped environment (hyperparameters.json
  present, or TRAINING_JOB_NAME set, as in the SageMaker Python SDK's local mode) starts the same
  way; otherwise one run with the defaults; either way the first line says which and why (see
  `start_kind`). A job's `ContainerArguments` arrive as plain arguments, as on EC2. A fleet worker
  (workers=sagemaker) on a job of several hosts adds its host's place in
  /opt/ml/input/config/resourceconfig.json to the job's first rank.

Training runs in a child process whose stderr passes through line by line (the job's log) and
whose last lines become the failure reason. SIGTERM (`docker stop`, SageMaker's StopTrainingJob)
reaches the child as SIGINT, so a sweep stops as on Ctrl-C: the running trial is failed and
queued again, finished trials are kept, and the exit code is 130.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from abalone.trial import RANK_ENV

SAGEMAKER = Path("/opt/ml")
CHANNEL = SAGEMAKER / "input" / "data" / "training"
HYPERPARAMETERS = SAGEMAKER / "input" / "config" / "hyperparameters.json"
RESOURCE_CONFIG = SAGEMAKER / "input" / "config" / "resourceconfig.json"
MODEL_DIR = SAGEMAKER / "model"
FAILURE = SAGEMAKER / "output" / "failure"
REASON_LIMIT = 1024  # SageMaker keeps the first 1024 characters of a FailureReason


class StartError(Exception):
    """The job's own settings cannot be turned into a run; the message names the file."""


def hyperparameter_overrides(path: Path) -> list[str]:
    """Hydra overrides from a SageMaker hyperparameters file (a JSON object of strings).

    Values that are themselves JSON strings (the SageMaker Python SDK encodes them so: `"\\"wide\\""`)
    are unwrapped; everything else is passed as written, in the file's order.
    """
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StartError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON: "
                         f"{err.msg}") from None
    except OSError as err:
        raise StartError(f"{path}: cannot be read: {err.strerror}") from None
    if not isinstance(settings, dict):
        raise StartError(f"{path}: expected a JSON object of key: value pairs, got "
                         f"{type(settings).__name__}")
    overrides = []
    for key, value in settings.items():
        if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, (dict, list)) or value is None:
            raise StartError(f"{path}, key {key!r}: expected a string, number or boolean, got "
                             f"{json.dumps(value)}")
        if isinstance(value, bool):
            value = str(value).lower()
        overrides.append(f"{key}={value}")
    return overrides


def start_kind(argv: list[str], job_name: str | None, has_hyperparameters: bool) -> tuple[bool, str]:
    """Whether the container's arguments (and, with none, its environment) make a SageMaker start,
    and, for a start without arguments, the line that says which was chosen and why.

    A SageMaker job starts the image as `IMAGE train`, but the SageMaker Python SDK's local mode
    (v3 ModelTrainer) starts it with no command at all, in a job's environment: that is a SageMaker
    start too, or the job's hyperparameters would be silently left out.
    """
    if argv:
        return argv[0] == "train", ""
    signs = [f"{HYPERPARAMETERS} exists"] if has_hyperparameters else []
    if job_name:
        signs.append(f"TRAINING_JOB_NAME is set ({job_name})")
    if signs:
        return True, (f"abalone.container: starting as a SageMaker training job, as `train` "
                      f"would (the training channel, hyperparameters.json, the failure file): "
                      f"no arguments, and {' and '.join(signs)}")
    return False, (f"abalone.container: starting one run with the default settings: no arguments, "
                   f"no {HYPERPARAMETERS} and no TRAINING_JOB_NAME (give Hydra overrides, or "
                   f"`train` to start as a SageMaker training job)")


def training_command(argv: list[str]) -> list[str]:
    """The `python -m abalone.train` command line for the container's arguments."""
    if argv[:1] == ["train"]:  # SageMaker's start: the job's settings come from files
        argv = argv[1:]
        if HYPERPARAMETERS.is_file():
            argv = [*argv, *hyperparameter_overrides(HYPERPARAMETERS)]
    return [sys.executable, "-m", "abalone.train", *argv]


def host_rank(rank: str) -> str:
    """A fleet worker's rank on this host of a multi-host job: the job's first rank plus the
    host's place among the job's hosts, so every host seeds its sampler differently."""
    try:
        hosts = json.loads(RESOURCE_CONFIG.read_text())
        return str(int(rank) + sorted(hosts["hosts"]).index(hosts["current_host"]))
    except (OSError, ValueError, KeyError):  # no resource config (not SageMaker): as given
        return rank


def write_failure(reason: str) -> None:
    """Leave the reason where SageMaker reads it; elsewhere (no writable /opt/ml/output) skip."""
    try:
        FAILURE.write_text(reason[-REASON_LIMIT:])
    except OSError:
        pass


def failure_reason(lines: collections.deque, code: int) -> str:
    """The `error: ...` paragraph the CLI printed, else the last lines of its stderr."""
    text = "".join(lines)
    start = text.rfind("error: ")
    reason = text[start:] if start >= 0 else text
    return (reason.strip() or f"training exited with code {code}") + "\n"


def main(argv: list[str]) -> int:
    # The channel and model folder of a SageMaker job (the data module and Hydra's output folder
    # read these); on EC2 run_training.sh mounts the data and outputs at the same places.
    if CHANNEL.is_dir():
        os.environ.setdefault("SM_CHANNEL_TRAINING", str(CHANNEL))
    os.environ.setdefault("SM_MODEL_DIR", str(MODEL_DIR))
    if RANK_ENV in os.environ:
        os.environ[RANK_ENV] = host_rank(os.environ[RANK_ENV])
    sagemaker, why = start_kind(argv, os.environ.get("TRAINING_JOB_NAME"),
                                HYPERPARAMETERS.is_file())
    if why:  # the first line of the job's log
        print(why, file=sys.stderr, flush=True)
    if sagemaker and not argv:
        argv = ["train"]
    try:
        command = training_command(argv)
    except StartError as err:
        print(f"error: {err}", file=sys.stderr)
        write_failure(f"error: {err}\n")
        return 2
    model_dir = Path(os.environ["SM_MODEL_DIR"])
    model_dir.mkdir(parents=True, exist_ok=True)
    # In the output folder, so a local MLflow store and a sweep's journal land in the outputs.
    child = subprocess.Popen(command, cwd=model_dir, stderr=subprocess.PIPE)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGINT))
    signal.signal(signal.SIGINT, lambda signum, frame: child.send_signal(signal.SIGINT))
    tail: collections.deque = collections.deque(maxlen=40)
    for raw in child.stderr:
        sys.stderr.buffer.write(raw)
        sys.stderr.buffer.flush()
        tail.append(raw.decode(errors="replace"))
    code = child.wait()
    if code < 0:  # killed by a signal: the shell's convention
        code = 128 - code
    if code != 0:
        write_failure(failure_reason(tail, code))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
