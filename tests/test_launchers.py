"""Sweeps whose trials Hydra's launcher plugins run in other processes (joblib), and launchers
refused before anything exists (abalone/sweep/launchers.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import load_study, run_cli, sweep_runs
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
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
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
    assert done.stderr.startswith("error: ") and refusal in done.stderr
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
# KillWait seconds (30 by default).
KillWait=3
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000
PartitionName=abalone Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged, slurmctld and slurmd (Debian's slurm-wlm, as root, scripts/test.sh installs them)
    on 127.0.0.1 with a generated slurm.conf; yields the environment its clients need."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b)
               and not Path("/usr/sbin", b).exists()]
    if missing or os.geteuid() != 0:
        pytest.fail(f"the SLURM tests need root and Debian's slurm-wlm and munge (missing: "
                    f"{missing}); scripts/test.sh installs them")
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
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=_free_port(),
                                      slurmd_port=_free_port(), host=socket.gethostname(),
                                      cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["/usr/sbin/slurmctld", "-c"], env=env, check=True)
    subprocess.run(["/usr/sbin/slurmd", "-N", "localhost"], env=env, check=True)
    deadline = time.monotonic() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env,
                                       capture_output=True, text=True).stdout:
        if time.monotonic() > deadline:
            pytest.fail("the SLURM node did not come up: " + (root / "slurmd.log").read_text()[-2000:])
        time.sleep(0.5)
    yield {"SLURM_CONF": str(conf)}
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = root / f"{name}.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


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
