"""The fault soak (`--sections faults --seed S --minutes M`): real sweeps (`python -m abalone.train
-m`) for M minutes, each under a random schedule drawn from its seed:

- network faults from our fault proxy (bench/faultproxy.py) in front of the `mlflow server`,
  moto's S3 (the trials' `output.s3_uri`) and, for sweeps whose study is on PostgreSQL, the
  database (a TCP proxy: resets, lost replies, delays, cuts);
- at most one process fault, each followed by a restart: kill -9 of a trial process (the local
  worker of an `n_jobs=2` sweep), of a worker container (`--container-image`: a sweep on
  PostgreSQL with `workers=container workers.count=2`; the rerun starts new containers), of the
  coordinator (the sweep command; it is rerun), of the `mlflow server` (its process group;
  restarted on the same port and store) or of PostgreSQL's postmaster and backends (restarted on
  the same data folder).

A process fault strikes at a drawn moment of the sweep (a trial process: once it runs a trial),
in its first attempt or a rerun. A sweep a fault stopped is rerun with the network faults off, a
few seconds later (a killed container's trial: once its heartbeat is `stale_after` old, as the
sweep's error says), as a user would rerun it, until it exits 0: at most twice, or three times if
the process fault struck the second rerun. Then the invariants (bench/invariants.py) are checked; a breach is
printed with the sweep's seed, which `--sections faults --seed <that seed> --minutes 0` replays
as the first sweep."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.faultproxy import FaultProxy, TcpFaultProxy
from bench.invariants import CHECKED, sweep_breaches
from bench.measure import base_env
from bench.services import (Postgres, container_of, free_port, gone, start_mlflow_server, stop,
                            wait_for_http)

N_TRIALS = 2
SWEEP = ["-m", "sweep=quick", "trainer.epochs=3", "trainer.patience=0",
         "hydra.sweeper.pruner.name=none", "hydra.sweeper.sampler.name=random",
         f"hydra.sweeper.n_trials={N_TRIALS}", "tracking=server", "tracking.outage_grace=60"]
PROCESS_FAULTS = ("kill-trial", "kill-coordinator", "kill-mlflow", "kill-postgres",
                  "kill-container")
CONTAINER_STALE_AFTER = 20  # seconds: a killed container's trial counts as abandoned
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak",
                  "AWS_DEFAULT_REGION": "us-east-1"}
RERUNS = 2
HUNG_AFTER = 600  # seconds: an attempt (2 trials of 3 epochs, about a minute) this long is hung


def schedule(seed: int, postgres: bool, containers: bool = False) -> dict:
    """The sweep's faults, drawn from `seed`: network fault rates per request (per chunk sent,
    for PostgreSQL), the storage, n_jobs, and one process fault (or none) with when it strikes
    and how long the killed server stays down. `postgres`: whether a cluster is at hand;
    `containers`: whether an image for container workers is."""
    rng = random.Random(seed)
    plan = {"mlflow": {"drop": rng.choice((0.0, 0.02, 0.05)), "reset": rng.choice((0.0, 0.02)),
                       "delay": rng.choice((0.0, 0.05)), "503": rng.choice((0.0, 0.02)),
                       "429": rng.choice((0.0, 0.02)), "cut": rng.choice((0.0, 0.003))},
            "s3": {"drop": rng.choice((0.0, 0.05, 0.1)), "reset": rng.choice((0.0, 0.05)),
                   "503": rng.choice((0.0, 0.05)), "delay": rng.choice((0.0, 0.05)),
                   "cut": rng.choice((0.0, 0.01))}}
    plan["storage"] = "postgres" if postgres and rng.random() < 0.5 else "journal"
    plan["postgres"] = {"drop": rng.choice((0.0, 0.0005, 0.002)),
                        "reset": rng.choice((0.0, 0.0005, 0.002)),
                        "delay": rng.choice((0.0, 0.01)), "cut": rng.choice((0.0, 0.0005))
                        } if plan["storage"] == "postgres" else {}
    kinds = [None, *PROCESS_FAULTS[:3], *PROCESS_FAULTS[3:4] * (plan["storage"] == "postgres"),
             *PROCESS_FAULTS[4:] * (plan["storage"] == "postgres" and containers)]
    plan["process"] = rng.choice(kinds)
    plan["n_jobs"] = (2 if plan["process"] == "kill-trial" else 1 if plan["process"] ==
                      "kill-container" else rng.choice((1, 2)))
    plan["kill_after"] = round(rng.uniform(8.0, 45.0), 1)  # seconds into the first attempt
    if plan["process"] == "kill-container":  # its trials start later and end sooner
        plan["kill_after"] = round(plan["kill_after"] / 5, 1)
    plan["down_for"] = round(rng.uniform(0.5, 6.0), 1)  # a killed server's time before restart
    return plan


class Services:
    """What the sweeps share: the `mlflow server`, moto's S3 and, if its binaries are here, a
    PostgreSQL cluster; each server can be killed and started again on its port."""

    def __init__(self, root: Path, data: str, image: str | None):
        import boto3

        self.root = root
        self.image = image
        if image:  # the containers' training channel
            (root / "data").mkdir()
            shutil.copy(data, root / "data" / "abalone.data")
        self.mlflow_port = free_port()
        self.mlflow_url, self.mlflow = start_mlflow_server(
            root / "mlflow", "--artifacts-destination", str(root / "mlflow" / "artifacts"),
            port=self.mlflow_port)
        self.s3_port = free_port()
        self.moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", str(self.s3_port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.s3_url = f"http://127.0.0.1:{self.s3_port}"
        wait_for_http(f"{self.s3_url}/moto-api/", self.moto)
        self.s3 = boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1",
                               aws_access_key_id="soak", aws_secret_access_key="soak")
        self.s3.create_bucket(Bucket="soak")
        try:
            # Its own folder under /tmp: as root, the cluster runs as `postgres`, which cannot
            # enter this process's private temporary folder.
            self.postgres: Postgres | None = Postgres(Path(tempfile.mkdtemp(prefix="abalone-pg-")))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
            print(f"  (no PostgreSQL for the soak: {err})", flush=True)
            self.postgres = None

    def kill_mlflow(self, down_for: float) -> None:
        os.killpg(self.mlflow.pid, signal.SIGKILL)
        self.mlflow.wait()
        time.sleep(down_for)
        _, self.mlflow = start_mlflow_server(
            self.root / "mlflow", "--artifacts-destination",
            str(self.root / "mlflow" / "artifacts"), port=self.mlflow_port)

    def kill_postgres(self, down_for: float) -> None:
        self.postgres.kill()
        time.sleep(down_for)
        self.postgres.start_again()

    def close(self) -> None:
        stop(self.mlflow)
        stop(self.moto)
        if self.postgres:
            self.postgres.stop()
            shutil.rmtree(self.postgres.root, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _sweep_processes(pid: int) -> list[int]:
    """The local workers (trial processes) the sweep command `pid` started."""
    found = []
    for child in _children(pid):
        try:
            if b"abalone.train" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def worker_containers(command: subprocess.Popen) -> list[str]:
    """The names abalone.workers.container gives the sweep command's 2 containers."""
    return [f"abalone-worker-{command.pid}-{rank}" for rank in (1, 2)]


def strike(kind: str, plan: dict, current: dict, services: Services, done: threading.Event,
           record: dict, running_trials) -> None:
    """The process fault: `kind` at `plan["kill_after"]` s into the sweep (its first attempt or
    a rerun: `current["command"]`), or as soon as its target exists (a trial process or
    container: once it runs a trial, by `running_trials()`, the study's RUNNING trials); then
    the restart. What happened goes into `record`."""
    if done.wait(plan["kill_after"]):
        record["missed"] = "the sweep ended first"
        return
    while not done.is_set():
        command = current["command"]
        running = command.poll() is None
        if kind in ("kill-trial", "kill-container") and running:
            try:
                busy = running_trials()
            except Exception:  # noqa: BLE001 - the study is not there yet, or its database restarts
                busy = []
            if kind == "kill-trial":
                pids = {t.user_attrs.get("pid") for t in busy}
                targets = [p for p in _sweep_processes(command.pid) if p in pids]
                if targets:
                    os.kill(targets[0], signal.SIGKILL)
                    break
            else:  # a container whose trial has started its MLflow run: mid-training
                targets = [name for t in busy if "mlflow_run_id" in t.user_attrs
                           for name in [container_of(t, worker_containers(command))] if name]
                if targets:
                    subprocess.run(["podman", "kill", "--signal", "KILL", targets[0]],
                                   capture_output=True, timeout=60)
                    record["struck_at"] = time.monotonic()
                    break
        elif kind == "kill-coordinator" and running:
            record["orphans"] = _sweep_processes(command.pid)  # they finish their share
            os.kill(command.pid, signal.SIGKILL)
            break
        elif kind in ("kill-mlflow", "kill-postgres"):
            try:
                (services.kill_mlflow if kind == "kill-mlflow" else services.kill_postgres)(
                    plan["down_for"])
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                record["restart_failed"] = f"{kind}: the restart failed: {err}"
            break
        time.sleep(0.5)
    else:
        record["missed"] = "no trial process ran after the strike time"
        return
    record["struck"] = kind
    record["struck_in"] = current["attempt"]


def one_sweep(number: int, seed: int, services: Services, data: str, root: Path) -> dict:
    import mlflow
    import optuna

    from abalone.study.storage import make_storage

    plan = schedule(seed, services.postgres is not None, services.image is not None)
    study_name = f"soak-{number}"
    proxies = {"mlflow": FaultProxy(services.mlflow_port, seed, plan["mlflow"], delay=0.3),
               "s3": FaultProxy(services.s3_port, seed + 1, plan["s3"], delay=0.3)}
    cwd = root / f"sweep-{number}"
    cwd.mkdir()
    if plan["storage"] == "postgres":
        proxies["postgres"] = TcpFaultProxy(services.postgres.port, seed + 2,
                                            plan["postgres"], delay=0.3)
        services.postgres.create_database(study_name.replace("-", "_"))
        storage = f"postgresql+psycopg2://postgres@{proxies['postgres'].url}/" \
                  f"{study_name.replace('-', '_')}"
    else:
        storage = str(cwd / "optuna-studies.journal")
    output_uri = f"s3://soak/{study_name}"
    argv = [sys.executable, "-m", "abalone.train", *SWEEP,
            f"tracking.experiment={study_name}", f"tracking.registered_model={study_name}",
            f"hydra.sweeper.study_name={study_name}", f"hydra.sweeper.storage='{storage}'",
            f"hydra.sweeper.n_jobs={plan['n_jobs']}", f"tracking.uri={proxies['mlflow'].url}",
            f"output.s3_uri={output_uri}"]
    if plan["process"] == "kill-container":
        argv += ["workers=container", "workers.count=2", "workers.engine=podman",
                 f"workers.image={services.image}", "workers.build=false",
                 f"workers.data_dir={services.root / 'data'}",
                 f"hydra.sweeper.stale_after={CONTAINER_STALE_AFTER}"]
    env = {**base_env(data), **S3_CREDENTIALS, "AWS_ENDPOINT_URL": proxies["s3"].url}
    direct = (storage.replace(proxies["postgres"].url, f"127.0.0.1:{services.postgres.port}")
              if "postgres" in proxies else storage)  # the soak's own look, without faults

    opened = {}

    def running_trials() -> list:
        if "storage" not in opened:
            opened["storage"] = make_storage(direct)
        study = optuna.load_study(study_name=study_name, storage=opened["storage"])
        return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    attempts, record, current, started = [], {}, {}, []
    done = threading.Event()
    striker = threading.Thread(target=strike, args=(plan["process"], plan, current, services,
                                                    done, record, running_trials), daemon=True)
    try:
        attempt = 0
        # Reruns after the first attempt; a process fault that strikes the last one earns one more.
        while attempt <= RERUNS + (record.get("struck_in") == attempt - 1):
            current["attempt"] = attempt
            current["command"] = command = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True)
            started.append(command)
            if attempt == 0 and plan["process"]:
                striker.start()
            try:  # (until its workers close their output too)
                output, _ = command.communicate(timeout=HUNG_AFTER)
            except subprocess.TimeoutExpired:
                os.killpg(command.pid, signal.SIGKILL)
                output, _ = command.communicate()
                output += f"\nhung: killed after {HUNG_AFTER} s"
            # Workers a killed coordinator left go on with their share: wait for them.
            deadline = time.monotonic() + 900
            while any(not gone(p) for p in record.get("orphans", ())) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            lines = output.strip().splitlines() or [""]
            attempts.append((command.returncode, lines[-1]))
            (cwd / f"attempt-{attempt}.log").write_text(output)
            if command.returncode == 0:
                break
            for proxy in proxies.values():  # the rerun meets no network faults
                proxy.enabled = False
            time.sleep(max(p.cut_seconds for p in proxies.values()) + 1)  # as a user would
            if "struck_at" in record:  # the killed container's trial: abandoned once stale
                time.sleep(max(0.0, record["struck_at"] + CONTAINER_STALE_AFTER + 1
                               - time.monotonic()))
            attempt += 1
    finally:
        done.set()
        if striker.is_alive():
            striker.join()
        for proxy in proxies.values():
            proxy.close()
        if plan["process"] == "kill-container":  # any a hung attempt left behind
            subprocess.run(["podman", "rm", "--force", *(name for c in started
                                                          for name in worker_containers(c))],
                           capture_output=True, timeout=120)
    if record.get("restart_failed"):  # the harness's own failure: the soak cannot go on
        raise RuntimeError(f"seed {seed}: {record['restart_failed']} (output: {cwd})")
    study = optuna.load_study(study_name=study_name, storage=make_storage(direct))
    client = mlflow.MlflowClient(tracking_uri=services.mlflow_url,
                                 registry_uri=services.mlflow_url)
    code, last = attempts[-1]
    breaches = sweep_breaches(client, study_name, study, N_TRIALS, study_name, exit_code=code,
                              last_line=last, s3=services.s3, output_uri=output_uri)
    breaches += [f"attempt {i} hung: killed after {HUNG_AFTER} s" for i, (_, line)
                 in enumerate(attempts) if line.startswith("hung:")]
    if code != 0:
        breaches.append(f"the sweep did not complete in {len(attempts)} attempts: exit {code}, "
                        f"{last!r} (its output: {cwd})")
    injected = Counter()
    for name, proxy in proxies.items():
        injected.update({f"{name} {kind}": n for kind, n in proxy.injected.items()})
    if record.get("struck"):
        injected[record["struck"]] += 1
    return {"seed": seed, "plan": plan, "injected": dict(injected),
            "requests": sum(p.requests for p in proxies.values()), "attempts": attempts,
            "missed": record.get("missed"), "breaches": breaches}


def bench_faults(args, seeds: list[int] = ()) -> dict:
    """The soak: its first sweep's seed is `args.seed`, or the first sweeps' are `seeds` (the
    tests'), then each next one's is drawn from it, until `args.minutes` have passed."""
    rng = random.Random(args.seed)
    injected: Counter = Counter()
    sweeps, breaches = [], []
    deadline = time.monotonic() + args.minutes * 60
    root = Path(tempfile.mkdtemp(prefix="abalone-bench-faults-"))
    # The folder is kept when a breach needs its logs.
    services = Services(root, args.data, getattr(args, "container_image", None))
    try:
        while not sweeps or time.monotonic() < deadline or len(sweeps) < len(seeds):
            seed = (seeds[len(sweeps)] if len(sweeps) < len(seeds) else
                    args.seed if not sweeps else rng.randrange(2 ** 31))
            result = one_sweep(len(sweeps), seed, services, args.data, root)
            sweeps.append(result)
            injected.update(result["injected"])
            breaches += [f"seed {seed}: {b}" for b in result["breaches"]]
            plan = result["plan"]
            print(f"  sweep {len(sweeps)} seed {seed} ({plan['storage']}, n_jobs "
                  f"{plan['n_jobs']}, {plan['process'] or 'no process fault'}"
                  f"{' missed: ' + result['missed'] if result['missed'] else ''}): "
                  f"{result['requests']} requests, faults {result['injected'] or 'none'}, "
                  f"exits {[a[0] for a in result['attempts']]}, breaches "
                  f"{len(result['breaches'])}", flush=True)
            for line in result["breaches"]:
                print(f"    BREACH {line}", flush=True)
    finally:
        services.close()
    if breaches:
        print(f"  the sweeps' output and logs are kept in {root}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
    checked = dict(CHECKED)
    summary = {"seed": args.seed, "minutes": args.minutes, "sweeps_completed": len(sweeps),
               "resumed": sum(len(s["attempts"]) > 1 for s in sweeps),
               "missed": sum(bool(s["missed"]) for s in sweeps),
               "invariants_checked": checked, "faults_injected": dict(injected),
               "breaches": breaches, "sweeps": sweeps}
    print(f"faults: {len(sweeps)} sweeps, {summary['resumed']} rerun after a fault stopped "
          f"them, {summary['missed']} whose process fault found no target; faults injected "
          f"{sum(injected.values())}: {dict(sorted(injected.items()))}; invariants checked "
          f"after every sweep, over {checked}; breaches {len(breaches)}", flush=True)
    for line in breaches:
        print(f"  BREACH {line}", flush=True)
    return summary
