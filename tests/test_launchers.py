"""Sweeps whose trials Hydra's launcher plugins run in other processes (joblib, SLURM jobs on a
one-node cluster the tests start), a cancelled SLURM job's trial failed and retried on resume,
and launchers refused before anything exists (abalone/sweep/launchers.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from abalone.study.storage import make_storage
from conftest import CLI_TIMEOUT, load_study, poll, run_cli, scrubbed_environ, sweep_runs
from test_sweeps import MODEL, SMALL, assert_total_honoured

pytestmark = pytest.mark.slow


def assert_sweep_records(client: MlflowClient, study, n_runs: int) -> None:
    """What every launcher leaves: one parent, every trial's run nested under it and ended as
    its trial did, one registered version (the champion's), none registered by a trial."""
    (parent,), runs = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert len(runs) == n_runs
    by_id = {r.info.run_id: r for r in runs}
    for trial in study.trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED",
                                   "FAIL": "FAILED"}[trial.state.name]
    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert version.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    assert version.tags["trial"] == str(study.best_trial.number)
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version


def test_joblib_runs_trials_in_its_processes_as_the_default_launcher_does(tmp_path, data_file):
    # The grid of test_sweeps' pruning test, two trials at a time in joblib's processes: each
    # job reports its epochs to the shared journal, so a hopeless trial is pruned against trials
    # other processes finished.
    done = run_cli(["-m", *SMALL, f"hydra.sweeper.storage={tmp_path / 'study.journal'}",
                    "optimizer.lr=0.02,0.000001", "trainer.seed=1,2,3",
                    "hydra.sweeper.pruner.name=median", "hydra.sweeper.pruner.n_startup_trials=1",
                    "hydra.sweeper.pruner.n_warmup_steps=0",
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                   cwd=tmp_path, data=data_file)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    study = load_study(str(tmp_path / "study.journal"))
    assert_total_honoured(study, 6)
    assert out.count("is launching 2 jobs") == 3  # batches the size joblib runs at once
    # The jobs ran elsewhere: each trial's owner is this sweep, its run another process's.
    assert len({t.user_attrs["pid"] for t in study.trials}) == 1
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, [(t.number, t.state.name, t.params) for t in study.trials]
    assert all(t.params["optimizer.lr"] == 0.000001 and t.intermediate_values for t in pruned)
    assert all(t.user_attrs["outcome"]["state"] == t.state.name for t in study.trials)
    assert_sweep_records(MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), study, 6)
    assert "registered: " not in out  # no trial registered as a plain run would


@pytest.mark.parametrize("args, refusal", [
    (["hydra/launcher=submitit_local"],
     "hydra.launcher._target_=hydra_plugins.hydra_submitit_launcher.submitit_launcher."
     "LocalLauncher is a launcher this sweeper has not been tested with"),
    (["hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"],
     "set hydra.launcher.n_jobs instead and leave hydra.sweeper.n_jobs=1"),
    (["hydra/launcher=submitit_slurm", "hydra.sweeper.storage=sqlite:///study.db"],
     "is SQLite, which jobs of hydra/launcher=submitit_slurm on other hosts cannot share"),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.submitit_folder=/dev/shm/abalone/%j"],
     "hydra.sweeper.storage=optuna-studies.journal is not on the file system of "
     "hydra.launcher.submitit_folder=/dev/shm/abalone/%j"),
    (["hydra/launcher=submitit_slurm"],
     "tracking.uri=sqlite:///mlflow.db is a store in a file, which jobs of "
     "hydra/launcher=submitit_slurm"),
])
def test_launchers_we_cannot_drive_are_refused_before_anything_exists(tmp_path, data_file, args,
                                                                       refusal):
    done = run_cli(["-m", *SMALL, "optimizer.lr=0.02,0.01", *args], cwd=tmp_path,
                   data=data_file)
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    first, said = done.stderr.split("\n", 1)
    assert first.startswith("abalone: setting up a sweep")  # then nothing but the refusal
    assert said.startswith("error: ") and refusal in said
    if "has not been tested" in refusal:
        assert "use hydra/launcher=basic" in done.stderr and "joblib" in done.stderr
    # No study, no MLflow store, no parent run, no job folder.
    assert [p.name for p in tmp_path.iterdir()] == []


# -- SLURM through submitit: a one-node cluster on this machine ---------------------------------

SLURM_CONF = """ClusterName=abalone
SlurmctldHost=localhost
SlurmctldAddr=127.0.0.1
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# scancel sends SIGTERM, which submitit lets pass (it waits for preemption), then SIGKILL after
# KillWait seconds (30 by default): short, so a cancelled trial cannot finish meanwhile.
KillWait=1
JobAcctGatherType=jobacct_gather/none
# Accounting through slurmdbd, as real clusters have it: submitit learns that a job ended without
# a result (scancel, a node's failure) from `sacct`, which without it fails, and would wait forever.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
AccountingStoragePass={root}/munge.sock
NodeName=localhost NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000
PartitionName=abalone Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
# slurmdbd reads slurmdbd.conf beside slurm.conf; MariaDB's root has no password on loopback.
SLURMDBD_CONF = """AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={root}/slurmdbd.pid
LogFile={root}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, log: Path, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not listen on 127.0.0.1:{port}: "
                        + (log.read_text()[-2000:] if log.exists() else "no log"))
        time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged, MariaDB, slurmdbd, slurmctld and slurmd (Debian's munge, mariadb-server,
    slurmdbd and slurm-wlm, as root; scripts/test.sh installs them) on 127.0.0.1 with a
    generated slurm.conf; yields the environment its clients need."""
    missing = [b for b in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch")
               if not shutil.which(b) and not Path("/usr/sbin", b).exists()]
    if missing or os.geteuid() != 0:
        pytest.fail(f"the SLURM tests need root and Debian's slurm-wlm, slurmdbd, mariadb-server "
                    f"and munge (missing: {missing}); scripts/test.sh installs them")
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    root.chmod(0o700)
    subprocess.run(["/usr/sbin/munged", f"--key-file={key}", f"--socket={root}/munge.sock",
                    f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                    f"--seed-file={root}/munge.seed", "--force"], check=True)
    db_port, dbd_port = _free_port(), _free_port()
    subprocess.run(["mariadb-install-db", f"--datadir={root}/db", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True)
    mariadb = subprocess.Popen(["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={root}/db",
                      f"--socket={root}/mariadb.sock", f"--port={db_port}",
                      "--bind-address=127.0.0.1", "--skip-name-resolve", "--user=root",
                      f"--pid-file={root}/mariadbd.pid", f"--log-error={root}/mariadbd.log",
                      "--innodb-buffer-pool-size=32M"], start_new_session=True)
    _wait_for_port(db_port, root / "mariadbd.log", "MariaDB")
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=_free_port(), dbd_port=dbd_port,
                                      slurmd_port=_free_port(), host=socket.gethostname(),
                                      cpus=os.cpu_count()))
    dbd_conf = root / "slurmdbd.conf"
    dbd_conf.write_text(SLURMDBD_CONF.format(root=root, dbd_port=dbd_port, db_port=db_port))
    dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["/usr/sbin/slurmdbd"], env=env, check=True)
    _wait_for_port(dbd_port, root / "slurmdbd.log", "slurmdbd")
    subprocess.run(["/usr/sbin/slurmctld", "-c"], env=env, check=True)
    subprocess.run(["/usr/sbin/slurmd", "-N", "localhost"], env=env, check=True)
    deadline = time.monotonic() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env,
                                       capture_output=True, text=True).stdout:
        if time.monotonic() > deadline:
            pytest.fail("the SLURM node did not come up: " + (root / "slurmd.log").read_text()[-2000:])
        time.sleep(0.5)
    yield {"SLURM_CONF": str(conf)}
    for name in ("slurmd", "slurmctld", "slurmdbd", "munged"):
        pid_file = root / f"{name}.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    mariadb.terminate()
    mariadb.wait(timeout=60)


def slurm_args(tmp_path: Path, storage: str, mlflow_url: str, *extra: str) -> list[str]:
    return ["-m", *SMALL, f"hydra.sweeper.storage={storage}", "tracking=server",
            f"tracking.uri={mlflow_url}", "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=abalone", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]


@pytest.mark.postgres
def test_a_sweep_runs_as_slurm_jobs(tmp_path, data_file, slurm_cluster, postgres_url,
                                    mlflow_server):
    done = run_cli(slurm_args(tmp_path, postgres_url, mlflow_server,
                              "optimizer.lr=0.02,0.000001", "trainer.seed=1,2",
                              "hydra.sweeper.pruner.name=median",
                              "hydra.sweeper.pruner.n_startup_trials=1",
                              "hydra.sweeper.pruner.n_warmup_steps=0",
                              "hydra.launcher.array_parallelism=2"),
                   cwd=tmp_path, data=data_file, env=slurm_cluster)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    study = load_study(postgres_url)
    assert_total_honoured(study, 4)
    # Each trial ran as a SLURM job: submitit's folder holds one per trial.
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_submitted.pkl"))) == 4
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned and all(t.params["optimizer.lr"] == 0.000001 for t in pruned)
    assert_sweep_records(MlflowClient(tracking_uri=mlflow_server), study, 4)


@pytest.mark.postgres
@pytest.mark.parametrize("accounting", [True, False], ids=["sacct", "no-sacct"])
def test_scancel_fails_then_retries_a_trial(tmp_path, data_file, slurm_cluster, postgres_url,
                                            mlflow_server, accounting):
    # Two trials at once; the first one's job is cancelled a few epochs in. With accounting,
    # submitit learns from sacct that the job ended without a result and gives up on the batch;
    # without (the sweep's own slurm.conf says accounting_storage/none, so its sacct fails as on
    # a cluster without slurmdbd), the sweep sees the job gone from squeue for stale_after
    # seconds. Either way it waits for the other job, fails the cancelled trial, queues its
    # parameters again and stops. A trial of 300 short epochs (several seconds on the shared
    # compiled program) and its records outlast scancel's SIGTERM (which submitit ignores) and
    # KillWait.
    env = dict(slurm_cluster)
    epochs = 300
    extra = []
    if not accounting:
        conf = Path(slurm_cluster["SLURM_CONF"]).read_text().replace(
            "accounting_storage/slurmdbd", "accounting_storage/none")
        (tmp_path / "slurm.conf").write_text(conf)
        env["SLURM_CONF"] = str(tmp_path / "slurm.conf")
        extra = ["hydra.sweeper.stale_after=15"]
    args = [a for a in slurm_args(tmp_path, postgres_url, mlflow_server,
                                  "optimizer.lr=0.02,0.01,0.005", f"trainer.epochs={epochs}",
                                  "trainer.batch_size=8", "hydra.sweeper.pruner.name=none",
                                  "hydra.launcher.array_parallelism=2", *extra)
            if a != "trainer.epochs=3"]
    full_env = {**scrubbed_environ(), **env, "ABALONE_DATA": str(data_file)}
    sweep = subprocess.Popen([sys.executable, "-m", "abalone.train", *args], cwd=tmp_path,
                             env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        storage = make_storage(postgres_url)  # one connection pool for the polling

        def first_trial_training():  # in the study (not the parent run's lock study beside it)
            for summary in optuna.get_all_study_summaries(storage):
                try:
                    study = optuna.load_study(study_name=summary.study_name, storage=storage)
                except KeyError:  # the lock study, deleted since
                    continue
                first = next(iter(study.trials), None)
                if first and first.intermediate_values and "slurm_job_id" in first.user_attrs:
                    return first
            return None

        job = poll(first_trial_training, "trial 0 reporting epochs from its SLURM job"
                   ).user_attrs["slurm_job_id"]
        subprocess.run(["scancel", job], env=full_env, check=True)
        out, err = sweep.communicate(timeout=CLI_TIMEOUT)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, (out + err)[-4000:]
    last = err.rstrip().splitlines()[-1]
    assert last.startswith(
        "error: hydra/launcher=submitit_slurm lost the job of trial(s) [0] (scancel, a node's "
        "failure or the time limit: "), err[-3000:]
    assert ("UncompletedJobError: Job " if accounting else
            f"JobLeftQueue: SLURM job {job} of trial 0 left the queue without a result 15s ago"
            ) in last, last
    assert last.endswith("rerun the same command to resume the study")
    assert re.search(r"trial +0  FAIL .*RuntimeError: its job ended without a result \((Uncompleted"
                     r"JobError|JobLeftQueue): .*\); queued again", out + err), (out + err)[-3000:]
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job],
                           env={**full_env, **slurm_cluster}, capture_output=True, text=True,
                           check=True).stdout
    assert sacct.startswith("CANCELLED"), sacct
    study = load_study(postgres_url)
    states = {t.number: t.state for t in study.trials}
    assert states[0] == TrialState.FAIL and len(study.trials[0].intermediate_values) < epochs
    assert states[1] == TrialState.COMPLETE  # its job ran on; the sweep waited for it
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.params == study.trials[0].params
    client = MlflowClient(tracking_uri=mlflow_server)
    cancelled = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert (cancelled.info.status, cancelled.data.tags["optuna.state"]) == ("FAILED", "FAIL")
    if not accounting:  # the rest is the same either way
        return

    # The same command resumes: the cancelled trial's parameters first, then the grid's last.
    done = run_cli(args, cwd=tmp_path, data=data_file, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(postgres_url)
    assert_total_honoured(study, 3)
    assert [t.state for t in study.trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert study.trials[2].params == study.trials[0].params
    assert sorted(t.params["optimizer.lr"] for t in study.trials[1:]) == [0.005, 0.01, 0.02]
    assert_sweep_records(client, study, 4)
