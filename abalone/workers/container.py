"""`workers=container`: containers of our image on this machine, each started by
scripts/run_training.sh; the sweep command only coordinates them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from abalone.config import AbaloneError, ConfigError, require
from abalone.trial import RANK_ENV
from abalone.workers.base import exit_status, thread_share

RUN_TRAINING = Path(__file__).resolve().parents[2] / "scripts" / "run_training.sh"


class ContainerWorkers:
    """`count` containers of our image on this machine, each started by scripts/run_training.sh
    (host network, the data folder as the training channel, a folder of its own as
    /opt/ml/model) in a session of its own, so Ctrl-C reaches only the command, which stops
    them. Each one's output goes to `output_dir/<name>.log`."""

    remote = True

    def __init__(self, count: int, engine: str | None, image: str, build: bool,
                 base_image: str | None, data_dir: str | None, output_dir: str,
                 stop_timeout: int):
        if not RUN_TRAINING.is_file():  # an installed wheel has no scripts/
            raise ConfigError(f"workers=container starts {RUN_TRAINING.name} from the project's "
                              "source tree, which this installation does not have: run the sweep "
                              "from a checkout of abalone")
        require(count >= 1, "workers.count", ">= 1", count)
        require(engine in (None, "docker", "podman"), "workers.engine", "docker or podman", engine)
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
        return {name: exit_status(p.poll(), self.output_dir / f"{name}.log")
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
