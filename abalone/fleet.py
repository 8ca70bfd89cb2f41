"""Where a sweep's trials run (the `workers` config group), and what remote workers need.

The sweep command coordinates: it opens the study and the parent MLflow run, then starts the
workers object of `workers=...`, each worker running `python -m abalone.train ARGV` (the user's
command with `workers=local hydra.sweeper.n_jobs=1`, the study's name and storage) with the
environment `ENV` (the parent run, a rank of its own). A workers object has:
- `start(argv, env)`: start them; `poll()`: worker name -> "running" | "finished" | "failed: why";
  `stop()`: stop every worker still running (a stopped worker fails its running trial and queues
  it again, as on Ctrl-C), idempotent.

`LocalWorkers` are today's `hydra.sweeper.n_jobs` processes: the command runs trials too.
`ContainerWorkers` are containers of our image on this machine, started by
scripts/run_training.sh; the command only coordinates. Remote workers share nothing with the
command but the network, so their storage and tracking must be servers (`check_remote`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from abalone.config import AbaloneError, ConfigError
from abalone.tracking import redact
from hydra_plugins.abalone_optuna_sweeper.sweeper import RANK_ENV

RUN_TRAINING = Path(__file__).resolve().parents[1] / "scripts" / "run_training.sh"


def check_remote(workers: str, storage: str, tracking_cfg) -> None:
    """Refuse a study or MLflow store in a file on this machine when workers run elsewhere."""
    if "://" not in storage or storage.startswith("sqlite:"):
        raise ConfigError(
            f"hydra.sweeper.storage={redact(storage)} is a file on this machine, which "
            f"workers={workers} cannot share (they run in their own file systems, and Optuna's "
            "file storages only lock within one machine); use a database all workers reach, e.g. "
            "hydra.sweeper.storage=postgresql+psycopg2://USER@HOST:5432/DB")
    uri = tracking_cfg.uri or ""
    if tracking_cfg.enabled and not (tracking_cfg.arn or tracking_cfg.server_name) and (
            "://" not in uri or uri.startswith(("sqlite:", "file:"))):
        raise ConfigError(
            f"tracking.uri={redact(uri)} is a store on this machine, which workers={workers} "
            "cannot write to; use an MLflow server all workers reach (tracking=server "
            "tracking.uri=http://HOST:5000, or tracking=sagemaker) or tracking.enabled=false")


def thread_share(processes: int) -> dict[str, str]:
    """TensorFlow's threads for one of `processes` training processes on this machine: each one
    would otherwise spread over every core, and the processes would only take turns."""
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    return {name: threads for name in
            ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")}


def _exit_status(code: int | None, log: Path | None) -> str:
    if code is None:
        return "running"
    if code == 0:
        return "finished"
    reason = f"exit code {code}"
    if log is not None and log.is_file():
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if line.startswith("error: ")]
        if errors:
            reason += f", {errors[-1]}"
    return f"failed: {reason}"


class LocalWorkers:
    """`count` more processes of the sweep command on this machine (`hydra.sweeper.n_jobs - 1`);
    their output goes to this terminal, and Ctrl-C reaches them with the command's."""

    def __init__(self, count: int = 0):
        self.count = count
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        for rank in range(1, self.count + 1):
            self.processes[f"process {rank}"] = subprocess.Popen(
                [sys.executable, "-m", "abalone.train", *argv],
                env={**os.environ, **env, RANK_ENV: str(rank)})

    def poll(self) -> dict[str, str]:
        return {name: _exit_status(p.poll(), None) for name, p in self.processes.items()}

    def wait(self) -> None:
        for process in self.processes.values():
            process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        self.wait()


class ContainerWorkers:
    """`count` containers of our image on this machine, each started by scripts/run_training.sh
    (host network, the data folder as the training channel, a folder of its own as
    /opt/ml/model) in a session of its own, so Ctrl-C reaches only the command, which stops
    them. Each one's output goes to `output_dir/<name>.log`."""

    def __init__(self, count: int, engine: str | None, image: str, build: bool,
                 base_image: str | None, data_dir: str | None, output_dir: str,
                 stop_timeout: int):
        if count < 1:
            raise ConfigError(f"config key workers.count must be >= 1, got {count}")
        if engine not in (None, "docker", "podman"):
            raise ConfigError(f"config key workers.engine must be docker or podman, got {engine!r}")
        self.count = count
        self.engine = engine or ("docker" if shutil.which("docker") else "podman")
        if shutil.which(self.engine) is None:
            raise ConfigError(f"workers=container needs {self.engine}, which is not installed "
                              "(config key workers.engine)")
        self.image, self.build, self.base_image = image, build, base_image
        self.data_dir = data_dir
        self.output_dir = Path(output_dir).resolve()
        self.logs = str(self.output_dir)  # where the coordinator's messages send the user
        self.stop_timeout = stop_timeout
        self.processes: dict[str, subprocess.Popen] = {}

    def script_env(self, **settings: str) -> dict[str, str]:
        """run_training.sh's settings; the data folder and base image only when given."""
        env = {**os.environ, "ENGINE": self.engine, "IMAGE": self.image, **settings}
        if self.data_dir:
            env["DATA_DIR"] = str(Path(self.data_dir).resolve())
        if self.base_image:
            env["BASE_IMAGE"] = self.base_image
        return env

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # The data and the image once, before the containers start (they would race for both).
        prepare_log = self.output_dir / "prepare.log"
        with open(prepare_log, "w") as log:
            prepared = subprocess.run([str(RUN_TRAINING)], stdout=log, stderr=subprocess.STDOUT,
                                      env=self.script_env(RUN="0", BUILD="1" if self.build else "0"))
        if prepared.returncode != 0:
            raise AbaloneError(f"preparing workers=container failed (exit code "
                               f"{prepared.returncode}); see {prepare_log}")
        for rank in range(1, self.count + 1):
            name = f"abalone-worker-{os.getpid()}-{rank}"
            output = self.output_dir / name
            output.mkdir(exist_ok=True)
            worker_env = {**thread_share(self.count), **env, RANK_ENV: str(rank)}
            with open(self.output_dir / f"{name}.log", "w") as log:
                self.processes[name] = subprocess.Popen(
                    [str(RUN_TRAINING), *argv], stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**self.script_env(BUILD="0", NAME=name, OUTPUT_DIR=str(output),
                                           ENV_NAMES=" ".join(worker_env)), **worker_env})

    def poll(self) -> dict[str, str]:
        return {name: _exit_status(p.poll(), self.output_dir / f"{name}.log")
                for name, p in self.processes.items()}

    def stop(self) -> None:
        running = [name for name, p in self.processes.items() if p.poll() is None]
        if running:
            # SIGTERM to each container, which fails its running trial and exits 130; after
            # stop_timeout the engine kills it.
            subprocess.run([self.engine, "stop", "--time", str(self.stop_timeout), *running],
                           capture_output=True, timeout=self.stop_timeout + 60)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # e.g. a container that was still being created
                subprocess.run([self.engine, "rm", "--force", name], capture_output=True)
                process.kill()
                process.wait()
