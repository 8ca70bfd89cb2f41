"""What real machines do to a command, done for real: a journal torn mid-line, two identical
sweep commands at once, a full disk, a tracking server that fails every request. Each ends with
one `error:` line (or goes on safely), nothing left RUNNING that the next command does not end,
nothing FINISHED with missing data."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from abalone.sweep.slots import retried_number
from conftest import CLI_TIMEOUT, load_study, run_cli, scrubbed_environ, sweep_runs

# A two-point grid of two-epoch trials, no tracking: a study in ~20 s.
GRID = ["-m", "trainer.epochs=2", "trainer.patience=0", "trainer.verbose=0",
        "optimizer.lr=0.01,0.02", "tracking.enabled=false"]


def journal_lines(path: Path) -> list[dict]:
    text = path.read_bytes()
    assert text.endswith(b"\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_a_torn_journal_line_is_cut_after_a_backup_and_the_sweep_goes_on(tmp_path, data_file):
    journal = tmp_path / "optuna-studies.journal"
    first = run_cli(GRID, cwd=tmp_path, data=data_file)
    assert first.returncode == 0, first.stderr[-3000:]
    # A crash (or a full disk) mid-write: the last line, trial 1's end, is cut in the middle.
    whole = journal.read_bytes()
    torn = whole[:-30]
    journal.write_bytes(torn)
    (last,) = [t for t in load_study(str(journal)).trials if t.state == TrialState.RUNNING]

    again = run_cli(GRID, cwd=tmp_path, data=data_file)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    (backup,) = tmp_path.glob("optuna-studies.journal.torn-*")
    assert backup.read_bytes() == torn
    partial = len(torn) - torn.rindex(b"\n") - 1
    assert f"the study journal {journal} ended in half a line ({partial} bytes" in out
    assert f"the whole file kept as {backup}" in out
    lines = journal_lines(journal)  # every line whole, none written after a partial one
    assert len(lines) > len(whole.splitlines())
    study = optuna.load_study(study_name=load_study(str(journal)).study_name,
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(str(journal))))
    assert study.trials[last.number].state == TrialState.FAIL  # its process is gone
    (retry,) = [t for t in study.trials if retried_number(t) == last.number]
    assert retry.state == TrialState.COMPLETE


@pytest.mark.slow
def test_a_journal_corrupt_in_the_middle_is_named_with_its_line(tmp_path, data_file):
    journal = tmp_path / "optuna-studies.journal"
    first = run_cli(GRID, cwd=tmp_path, data=data_file)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[5] = lines[5][:20] + lines[6]  # a torn line that another was written after
    del lines[6]
    journal.write_bytes(b"".join(lines))
    again = run_cli(GRID, cwd=tmp_path, data=data_file)
    assert again.returncode == 1, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1].startswith(
        f"error: the study journal {journal} is corrupt at line 6 (")
    assert "Traceback" not in again.stderr


def start_sweep(args: list[str], cwd: Path, data_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "abalone.train", *args], cwd=cwd,
                            env=scrubbed_environ(ABALONE_DATA=str(data_file)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_identical_sweep_commands_share_the_study_and_never_draw_alike(tmp_path, data_file):
    # The documented way to add processes by hand, in a fresh folder: both create the SQLite
    # store and the journal at once. Random sampling seeded alike would draw the same sets.
    args = ["-m", "sweep=quick", "trainer.epochs=2", "trainer.patience=0", "trainer.verbose=0",
            "hydra.sweeper.sampler.name=random", "hydra.sweeper.pruner.name=none"]
    pids = set()
    for n_trials in (4, 10):  # then again, the store and the study there
        procs = [start_sweep([*args, f"hydra.sweeper.n_trials={n_trials}"], tmp_path, data_file)
                 for _ in range(2)]
        pids |= {p.pid for p in procs}
        outputs = [p.communicate(timeout=CLI_TIMEOUT)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        for output in outputs:
            assert "database is locked" not in output and "Traceback" not in output, output
        study = load_study(str(tmp_path / "optuna-studies.journal"))
        ran = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert len(ran) == n_trials
        drawn = [tuple(sorted(t.params.items())) for t in ran]
        assert len(set(drawn)) == len(drawn), drawn
        assert {t.user_attrs["pid"] for t in ran} <= pids
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,), runs = sweep_runs(client)
    assert parent.info.status == "FINISHED" and len(runs) == 10


@pytest.mark.slow
def test_a_locked_sqlite_store_is_named_by_its_file(tmp_path, data_file):
    store = tmp_path / "mlflow.db"
    made = run_cli(["trainer.epochs=1", "tracking.register=false"], cwd=tmp_path, data=data_file)
    assert made.returncode == 0, made.stderr[-3000:]
    holder = sqlite3.connect(store, isolation_level=None)  # another process holds it
    holder.execute("BEGIN EXCLUSIVE")
    try:
        done = run_cli(["trainer.epochs=1"], cwd=tmp_path, data=data_file)
    finally:
        holder.close()
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot use the MLflow store sqlite:///mlflow.db (config key tracking.uri), the "
        f"SQLite file {store}: (sqlite3.OperationalError) database is locked (another process "
        "held the file longer than SQLite waits: run again once it is done, or track on an "
        "MLflow server: tracking=server tracking.uri=http://HOST:5000)")
    assert "tracking server at" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, said", [
    (["-m", "model.unitz=choice(1,2)"],
     "error: hydra.sweeper.params: a trial's config cannot be composed from model.unitz=1: "
     "Could not override 'model.unitz'"),
    (["-m", "model=choice(wide,nosuch)"], "from model=nosuch: In 'config': Could not find "
                                          "'model/nosuch'"),
    (["-m", "sweep=nosuch"], "error: sweep=nosuch: there is no sweep named 'nosuch'; there are: "
                             "quick, search, size"),
    (["sweep=nosuch"], "error: sweep=nosuch: there is no sweep named 'nosuch'; there are: "
                       "quick, search, size"),
    (["-m", "sweep=quick", "hydra.sweeper.storage=postgresql+psycopg2://u:pw@127.0.0.1:1/db"],
     "its database driver psycopg2 is not installed (pip install 'abalone[postgres]')"),
])
def test_a_sweep_s_typos_are_refused_before_anything_exists(tmp_path, data_file, args, said):
    # A misspelt search-space key or option, an unknown sweep (with -m and without), a database
    # storage without its driver: one error line, no study, no run, however often it is rerun.
    blocker = tmp_path / "blocker" / "psycopg2"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        "raise ModuleNotFoundError('No module named psycopg2', name='psycopg2')\n")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "abalone.train", *args, "trainer.epochs=1"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                              env=scrubbed_environ(ABALONE_DATA=str(data_file),
                                                   PYTHONPATH=str(blocker.parent)))
        assert done.returncode == 1, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and said in errors[0], done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "pw@" not in done.stderr
    assert not (tmp_path / "optuna-studies.journal").exists()
    assert not list(tmp_path.glob("outputs/*/*/model.keras"))
    if (tmp_path / "mlflow.db").exists():
        assert not MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
            [e.experiment_id for e in MlflowClient(
                f"sqlite:///{tmp_path}/mlflow.db").search_experiments()])


@pytest.mark.slow
def test_a_password_in_a_url_is_written_nowhere(tmp_path, data_file, mlflow_server):
    # A run and a sweep tracking on a server whose URL carries user:password: nothing we, Hydra
    # or MLflow write (terminal, files under the folder, params, tags, artifacts) holds it.
    password = "S3CRETPW"
    secret_url = mlflow_server.replace("http://", f"http://alice:{password}@")
    said = ""
    server = ["tracking=server", f"tracking.uri={secret_url}"]
    for args in (["trainer.epochs=1", *server], [*GRID[:-1], *server],
                 ["trainer.epochs=1", "tracking=server",
                  f"tracking.uri=http://alice:{password}@127.0.0.1:9/"]):
        done = run_cli(args, cwd=tmp_path, data=data_file)
        said += done.stdout + done.stderr
        assert done.returncode == (1 if ":9/" in args[-1] else 0), done.stderr[-3000:]
    assert "error: cannot use the MLflow tracking server at http://alice:***@127.0.0.1:9" in said
    assert password not in said
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in written)
    for path in written:
        assert password.encode() not in path.read_bytes(), path
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 4  # the run, the parent and its two trials
    for run in runs:
        leaked = {k: v for k, v in {**run.data.params, **run.data.tags}.items() if password in v}
        assert not leaked, leaked
        artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"
                                                                            / run.info.run_id)))
        for path in artifacts.rglob("*"):
            assert not path.is_file() or password.encode() not in path.read_bytes(), path


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs as the working folder (mounting needs root, as CI runs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"the full-disk test mounts a tmpfs: {mounted.stderr}"
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_ends_with_one_error_line_and_the_next_command_ends_what_it_left(
        small_disk, data_file):
    first = run_cli(["trainer.epochs=1", "tracking.register=false"], cwd=small_disk,
                    data=data_file)
    assert first.returncode == 0, first.stderr[-3000:]
    for args, leave in ((["trainer.epochs=2"], 700_000),
                        (["-m", "sweep=quick", "hydra.sweeper.n_trials=3", "trainer.epochs=2"],
                         900_000)):
        filler = fill(small_disk, leave)
        done = run_cli(args, cwd=small_disk, data=data_file)
        assert done.returncode == 1, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, done.stderr[-3000:]
        assert errors[0].startswith("error: no space left on the device (writing ")
        assert str(small_disk) in errors[0] and errors[0] == done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stdout + done.stderr
    filler.unlink()
    # Space freed: the same commands again end FAILED what the full disk left RUNNING.
    for args in (["trainer.epochs=1", "tracking.register=false"],
                 ["-m", "sweep=quick", "hydra.sweeper.n_trials=3", "trainer.epochs=2"]):
        again = run_cli(args, cwd=small_disk, data=data_file)
        assert again.returncode == 0, again.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{small_disk}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    for run in runs:  # nothing FINISHED with missing data
        if run.info.status == "FINISHED" and "mlflow.parentRunId" in run.data.tags:
            assert "test_rmse" in run.data.metrics, run.info.run_name
    study = load_study(str(small_disk / "optuna-studies.journal"))
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_a_server_that_fails_every_metric_batch_ends_with_one_error_line(tmp_path, data_file,
                                                                        mlflow_server):
    # HTTP 500 on every runs/log-batch, everything else answered: a run and a sweep end with one
    # error: line naming the server, no traceback, the run and the parent run ended FAILED.
    from bench.faultproxy import FaultProxy

    proxy = FaultProxy(int(mlflow_server.rsplit(":", 1)[1]), 0, {"500": 1.0},
                       only=r"^POST /api/2\.0/mlflow/runs/log-batch")
    try:
        for args in (["trainer.epochs=2"],
                     ["-m", "sweep=quick", "hydra.sweeper.n_trials=2", "trainer.epochs=2"]):
            done = run_cli([*args, "tracking=server", f"tracking.uri={proxy.url}"],
                           cwd=tmp_path, data=data_file)
            assert done.returncode == 1, done.stderr[-3000:]
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1], \
                done.stderr[-3000:]
            assert f"the MLflow tracking server at {proxy.url}" in errors[0], errors[0]
            assert "Traceback" not in done.stdout + done.stderr
    finally:
        proxy.close()
    assert proxy.injected["500"] >= 2
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and not [r.info.run_name for r in runs if r.info.status in ("RUNNING",
                                                                              "FINISHED")]
    assert not client.search_registered_models()
