"""End to end: `python -m abalone.train -m ...` sweeps through our Optuna sweeper, real stores."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from abalone.sweep.slots import retried_number
from conftest import CLI_TIMEOUT, REPO, load_study, run_cli, scrubbed_environ, sweep_runs

EXPERIMENT = "abalone-tensorflow-experiment"
MODEL = "abalone-tensorflow-model"
# A study small enough for CI: three-epoch trials, no per-epoch lines.
SMALL = ["trainer.epochs=3", "trainer.patience=0", "trainer.verbose=0"]


def assert_total_honoured(study: optuna.Study, n_trials: int) -> None:
    from abalone.sweep.slots import slot_holders

    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    holders = slot_holders(trials)
    assert len(holders) == n_trials, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
               for t in holders)


@pytest.mark.slow
def test_quick_sweep_on_an_mlflow_server(tmp_path, data_file, mlflow_server):
    done = run_cli(["-m", "sweep=quick", *SMALL, "hydra.sweeper.n_trials=3",
                    "tracking=server", f"tracking.uri={mlflow_server}"], cwd=tmp_path,
                   data=data_file)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    study = load_study(str(tmp_path / "optuna-studies.journal"))
    assert study.study_name.startswith("quick-")
    assert_total_honoured(study, 3)
    # What a person watching sees: the MLflow link and the dashboard command before the first
    # trial, n/N on every trial line (with an ETA while trials remain), the wall time at the end.
    lines = out.splitlines()
    first_trial = next(i for i, line in enumerate(lines) if "] trial " in line)
    assert any(f"look: {mlflow_server}/#/experiments/" in line for line in lines[:first_trial])
    assert any(f"watch the study: optuna-dashboard {tmp_path / 'optuna-studies.journal'}"
               in line for line in lines[:first_trial])
    trial_lines = [line for line in lines if "] trial " in line]
    assert [re.search(r"  (\d)/3(  eta \S+)?$", line).group(1) for line in trial_lines] == [
        "1", "2", "3"], trial_lines
    assert "eta " in trial_lines[0] and "eta" not in trial_lines[-1]
    assert re.search(r"the sweep took \d+(m\d\ds|s) \(FINISHED\)$", lines[-1]) or any(
        re.search(r"the sweep took \d+(m\d\ds|s) \(FINISHED\)", line) for line in lines)
    assert ".lock" not in out and "\r" not in out

    client = MlflowClient(tracking_uri=mlflow_server)
    (parent,), trials = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == study.study_name
    assert parent.data.tags["optuna.storage"] == str(tmp_path / "optuna-studies.journal")
    settings = {k: v for k, v in parent.data.params.items() if k.startswith("sweep.s")}
    assert settings == {  # the search space as written; only the settings that apply
        "sweep.study_name": study.study_name,
        "sweep.storage": str(tmp_path / "optuna-studies.journal"),
        "sweep.sampler.name": "tpe", "sweep.sampler.seed": "42",
        "sweep.sampler.n_startup_trials": "3",
        "sweep.space.model": "choice(baseline, wide)",
        "sweep.space.optimizer.lr": "tag(log, interval(0.001, 0.03))",
        "sweep.space.trainer.batch_size": "choice(32, 64)"}
    assert {k: v for k, v in parent.data.params.items() if k.startswith("sweep.pruner.")} == {
        "sweep.pruner.name": "median", "sweep.pruner.n_startup_trials": "2",
        "sweep.pruner.n_warmup_steps": "3"}
    assert parent.data.params["sweep.n_trials"] == "3"
    best = study.best_trial
    # The parent's best so far has a name of its own: sorting by `objective` ranks trials only.
    assert parent.data.metrics["best_objective"] == pytest.approx(best.value)
    assert "objective" not in parent.data.metrics and "best_val_rmse" not in parent.data.metrics
    assert parent.data.tags["best.trial_number"] == str(best.number)
    assert {f"best.params.{k}" for k in best.params} <= set(parent.data.tags)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png",
            "optuna/parallel_coordinate.png"} <= plots

    assert len(trials) == 3
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trials}
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.run_name == f"{study.study_name}-t{trial.number}"
        history = client.get_metric_history(run.info.run_id, "val_rmse")
        assert len(history) == (3 if trial.state == TrialState.COMPLETE else len(
            trial.intermediate_values))
        (objective,) = client.get_metric_history(run.info.run_id, "objective")
        if trial.state == TrialState.COMPLETE:  # the kept weights' value: the best epoch's
            kept = min(history, key=lambda m: m.value)
            assert trial.value == pytest.approx(kept.value)
            assert trial.value == pytest.approx(run.data.metrics["best_val_rmse"], rel=1e-4)
            assert (objective.step, objective.value) == (kept.step, pytest.approx(trial.value))
            assert run.data.metrics["kept_epoch"] == kept.step
        assert run.data.params["objective_metric"] == "val_rmse"
        assert run.data.params["optimizer.lr"] == str(trial.params["optimizer.lr"])
        # The sampled group choice under the key the user wrote, beside what it expands to.
        assert run.data.params["model"] == trial.params["model"]
        assert run.data.params["model.units"] == {"baseline": "64", "wide": "256"}[
            trial.params["model"]]
        assert run.data.tags["optuna.sampled_keys"] == "model, optimizer.lr, trainer.batch_size"
        assert run.data.params["sweep"] == "quick" and run.data.params["optimizer"] == "adam"
    for number in by_number:
        assert f"trial {number:3d}" in out
    assert "top trials by val_rmse" in out and by_number[best.number].info.run_id in out
    assert (f"look: {mlflow_server}/#/experiments/{parent.info.experiment_id}/runs?workflowType="
            f"machine_learning&searchFilter=tags.%60optuna.study_name%60%20%3D%20%27"
            f"{study.study_name}%27") in out
    assert "View run" not in out and "list index out of range" not in out

    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert version.run_id == by_number[best.number].info.run_id
    assert version.tags["sweep"] == "quick" and version.tags["trial"] == str(best.number)
    assert "test_rmse" in version.tags
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    assert "as champion: there was no champion" in out


@pytest.mark.slow
def test_objective_is_the_metric_of_the_weights_early_stopping_keeps(tmp_path, data_file):
    # A trial keeps the epoch of the best value of the sweep's metric (val_mae here, not
    # val_loss), early stopping watches that value, and the trial is ranked by it.
    done = run_cli(["-m", "trainer.epochs=8", "trainer.patience=3", "trainer.verbose=0",
                    "optimizer.lr=0.05,0.02", "hydra.sweeper.metric=val_mae",
                    f"hydra.sweeper.storage={tmp_path / 'study.journal'}"],
                   cwd=tmp_path, data=data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(str(tmp_path / "study.journal"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs["mlflow_run_id"]
        by_step = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
                   for key in ("val_loss", "val_mae")}
        kept_step = min(by_step["val_mae"], key=by_step["val_mae"].get)
        assert trial.value == pytest.approx(by_step["val_mae"][kept_step])
        run = client.get_run(run_id)
        assert trial.value == pytest.approx(run.data.metrics["best_val_mae"], rel=1e-4)
        assert run.data.metrics["kept_epoch"] == kept_step
        # Stopped 3 epochs after its best val_mae (patience 3), unless the 8 ran out first.
        assert max(by_step["val_mae"]) in (8, kept_step + 3)
        # Named `objective` whatever the metric, at the kept epoch.
        (objective,) = client.get_metric_history(run_id, "objective")
        assert (objective.step, objective.value) == (kept_step, pytest.approx(trial.value))
        assert run.data.params["objective_metric"] == "val_mae"


def grid_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["-m", *SMALL, f"hydra.sweeper.storage={tmp_path / 'study.journal'}", *extra]


@pytest.mark.slow
def test_plain_grid_is_one_parent_and_pruning_prunes(tmp_path, data_file):
    # A hopeless learning rate next to a good one: with the median pruner watching from the
    # first epoch, the hopeless trials that follow a finished good one must be pruned.
    done = run_cli(grid_args(tmp_path, "optimizer.lr=0.02,0.000001", "trainer.seed=1,2,3",
                             "hydra.sweeper.pruner.name=median",
                             "hydra.sweeper.pruner.n_startup_trials=1",
                             "hydra.sweeper.pruner.n_warmup_steps=0"),
                   cwd=tmp_path, data=data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(str(tmp_path / "study.journal"))
    assert study.study_name.startswith("grid-")
    assert_total_honoured(study, 6)  # the grid's size
    assert Counter((t.params["optimizer.lr"], t.params["trainer.seed"]) for t in study.trials) \
        == Counter({(lr, seed): 1 for lr in (0.02, 0.000001) for seed in (1, 2, 3)})
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    hopeless = [t for t in study.trials if t.params["optimizer.lr"] == 0.000001 and t.number > 0]
    assert hopeless and all(t.state == TrialState.PRUNED for t in hopeless), [
        (t.number, t.state.name, t.params, t.intermediate_values) for t in study.trials]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,), runs = sweep_runs(client)
    assert len(runs) == 6
    for trial in pruned:
        (run,) = [r for r in runs if r.info.run_id == trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
        assert len(client.get_metric_history(run.info.run_id, "val_rmse")) < 3
        # What a pruned trial still records: the value and epoch it was pruned at, and why.
        epoch, value = max(trial.intermediate_values.items())
        (objective,) = client.get_metric_history(run.info.run_id, "objective")
        assert (objective.step, objective.value) == (epoch + 1, pytest.approx(value))
        assert run.data.tags["mlflow.note.content"].startswith(
            f"Pruned at epoch {epoch + 1} with val_rmse {value:.4f}")
        # Its curves are its per-epoch metrics; no plots, no model.
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml"}


def assert_stopped_run_artifacts(client: MlflowClient, run_id: str) -> None:
    """A failed trial logs the config and its learning curves so far, no model."""
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"config.yaml", "plots"}
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curves.png"}


@pytest.mark.slow
def test_trials_log_their_model_only_when_best_so_far(tmp_path, data_file):
    # Two hopeless learning rates among two good ones, in the grid sampler's shuffled order.
    done = run_cli(grid_args(tmp_path, "optimizer.lr=0.000001,0.02", "trainer.seed=1,2"),
                   cwd=tmp_path, data=data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(str(tmp_path / "study.journal"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    with_model = {m.source_run_id for m in client.search_logged_models([experiment_id])}
    best_so_far, skipped = float("inf"), 0
    for trial in sorted(study.trials, key=lambda t: t.number):  # one process: in this order
        assert trial.state == TrialState.COMPLETE
        run_id = trial.user_attrs["mlflow_run_id"]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        run = client.get_run(run_id)
        # Every trial keeps its config, params, per-epoch and held-out metrics.
        assert len(client.get_metric_history(run_id, "val_rmse")) == 3
        assert "test_rmse" in run.data.metrics and run.data.params["optimizer.lr"]
        output = tmp_path / "multirun"
        (trial_dir,) = [p.parent for p in output.glob(f"*/*/{trial.number}/config.yaml")]
        if trial.value <= best_so_far:
            best_so_far = trial.value
            assert artifacts == {"config.yaml", "plots"} and run_id in with_model
            assert trial.user_attrs["mlflow_model_uri"].startswith("models:/")
            assert (trial_dir / "model.keras").is_file()
        else:
            skipped += 1
            assert artifacts == {"config.yaml"} and run_id not in with_model
            assert "mlflow_model_uri" not in trial.user_attrs
            assert not (trial_dir / "model.keras").exists()
    assert skipped, "the grid's order left no trial worse than an earlier one"
    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert version.run_id == study.best_trial.user_attrs["mlflow_run_id"]

    # hydra.sweeper.log_models=all: every finished trial logs its model.
    done = run_cli(grid_args(tmp_path, "optimizer.lr=0.000001,0.02",
                             "hydra.sweeper.log_models=all",
                             f"hydra.sweeper.storage={tmp_path / 'all.journal'}"),
                   cwd=tmp_path, data=data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(str(tmp_path / "all.journal"))
    with_model = {m.source_run_id for m in client.search_logged_models([experiment_id])}
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "plots"}
        assert run_id in with_model and "mlflow_model_uri" in trial.user_attrs
    parent = client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.params["sweep.log_models"] == "all"


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_best_trial_always_passed_the_model_check(direction):
    # Trials finishing at once in several processes: each checks against the COMPLETE trials it
    # sees, then reports. Whatever the interleaving, the study's best trial logged its model.
    import random

    from abalone.study.trials import model_check

    rng = random.Random(0)
    skipped = 0
    for _ in range(100):
        study = optuna.create_study(direction=direction)
        values = [round(rng.uniform(0, 5), 1) for _ in range(8)]  # ties happen
        trials = [study.ask() for _ in values]
        steps = [0] * len(trials)  # 0: to check, 1: to report, 2: done
        logged = set()
        while any(step < 2 for step in steps):
            i = rng.choice([i for i, step in enumerate(steps) if step < 2])
            if steps[i] == 0:
                if model_check(study, every_model=False)(values[i]):
                    logged.add(trials[i].number)
            else:
                study.tell(trials[i], values[i])
            steps[i] += 1
        assert study.best_trial.number in logged
        skipped += len(trials) - len(logged)
    assert skipped > 100  # most trials skip their model
    assert model_check(study, every_model=True)(-1e9 if direction == "maximize" else 1e9)


@pytest.mark.slow
def test_failing_trial_does_not_stop_the_sweep(tmp_path, data_file):
    done = run_cli(grid_args(tmp_path, "optimizer=sgd", "optimizer.momentum=0.9",
                             "optimizer.lr=0.01,1e12"), cwd=tmp_path, data=data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(str(tmp_path / "study.journal"))
    states = {t.params["optimizer.lr"]: t.state for t in study.trials}
    assert states == {0.01: TrialState.COMPLETE, 1e12: TrialState.FAIL}
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert "NaN" in failed.user_attrs["error"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
    assert run.data.tags["mlflow.note.content"] == (
        "Failed after 1 epoch: TrainingDiverged: training loss became NaN or infinite; lower "
        "optimizer.lr or change the model")
    assert "objective" not in run.data.metrics
    assert_stopped_run_artifacts(client, run.info.run_id)
    assert "FAIL" in done.stdout + done.stderr


@pytest.mark.slow
def test_failure_budget_stops_the_sweep(tmp_path, data_file):
    done = run_cli(grid_args(tmp_path, "optimizer=sgd", "optimizer.lr=1e12,1e13",
                             "hydra.sweeper.max_failures=2"), cwd=tmp_path, data=data_file)
    assert done.returncode == 1
    assert "2 trials failed in this process (hydra.sweeper.max_failures=2)" in done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,), _ = sweep_runs(client)
    assert parent.info.status == "FAILED"
    assert client.search_registered_models() == []


def start_sweep(args: list[str], cwd: Path, data_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "abalone.train", *args], cwd=cwd,
                            env=scrubbed_environ(ABALONE_DATA=str(data_file)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_trials(storage: str, proc: subprocess.Popen, finished: int) -> int:
    """Wait until `finished` trials are done and the next has an MLflow run; its number."""
    deadline = time.monotonic() + CLI_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        try:
            trials = load_study(storage).get_trials(deepcopy=False)
        except (ValueError, KeyError):
            trials = []
        done = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == TrialState.RUNNING
                   and "mlflow_run_id" in t.user_attrs]
        if len(done) >= finished and running:
            return running[0].number
        time.sleep(0.2)
    raise AssertionError("the sweep did not get that far")


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_total(tmp_path, data_file, how):
    args = grid_args(tmp_path, "optimizer.lr=0.01,0.02", "trainer.seed=1,2",
                     "trainer.epochs=20")
    storage = str(tmp_path / "study.journal")
    proc = start_sweep(args, tmp_path, data_file)
    interrupted = wait_for_trials(storage, proc, finished=1)
    os.killpg(proc.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    output = proc.communicate(timeout=120)[0]
    study = load_study(storage)
    first = study.trials[interrupted]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,), _ = sweep_runs(client)
    if how == "ctrl-c":
        # As the README says: exit 130, the running trial's run and the parent run KILLED.
        assert proc.returncode == 130, output[-4000:]
        assert "interrupted" in output
        assert first.state == TrialState.FAIL  # ended by the process itself
        run = client.get_run(first.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
        assert run.data.tags["mlflow.note.content"].startswith("Interrupted (Ctrl-C) after ")
        assert parent.info.status == "KILLED"
    else:
        assert proc.returncode == -signal.SIGKILL
        assert first.state == TrialState.RUNNING  # nobody was left to end it
        assert parent.info.status == "RUNNING"
    finished_before = {t.number: t.value for t in study.trials if t.state.is_finished()
                       and t.state != TrialState.FAIL}

    done = run_cli(args[:], cwd=tmp_path, data=data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(storage)
    assert_total_honoured(study, 4)
    # Finished trials were kept, not rerun; the interrupted one's parameters were retried.
    for number, value in finished_before.items():
        assert study.trials[number].value == value
    assert study.trials[interrupted].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if retried_number(t) == interrupted]
    assert retry.params == study.trials[interrupted].params
    assert retry.state == TrialState.COMPLETE
    run = client.get_run(study.trials[interrupted].user_attrs["mlflow_run_id"])
    assert run.info.status in ("KILLED", "FAILED")
    parents, runs = sweep_runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # resumed, not a new one
    assert all(r.info.status != "RUNNING" for r in runs)

    again = run_cli(args[:], cwd=tmp_path, data=data_file)  # a finished sweep adds nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(load_study(storage).trials) == len(study.trials)


@pytest.mark.slow
def test_a_rerun_whose_only_unfinished_trial_was_left_running_retries_it(tmp_path, data_file):
    # The last trial of a two-point grid left RUNNING by a killed process holds the study's
    # last slot: the rerun must fail it and run its retry, not find the study done.
    args = grid_args(tmp_path, "optimizer.lr=0.01,0.02", "trainer.epochs=20")
    storage = str(tmp_path / "study.journal")
    proc = start_sweep(args, tmp_path, data_file)
    last = wait_for_trials(storage, proc, finished=1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert [t.state for t in load_study(storage).trials if not t.state.is_finished()] == [
        TrialState.RUNNING]

    done = run_cli(args, cwd=tmp_path, data=data_file)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = load_study(storage)
    assert_total_honoured(study, 2)
    assert study.trials[last].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if retried_number(t) == last]
    assert retry.state == TrialState.COMPLETE and retry.params == study.trials[last].params


@pytest.mark.slow
def test_champion_alias_only_for_a_better_test_rmse(tmp_path, data_file):
    good = run_cli(grid_args(tmp_path, "optimizer.lr=0.02,0.01", "trainer.epochs=8"),
                   cwd=tmp_path, data=data_file)
    assert good.returncode == 0, good.stderr[-3000:]
    worse = run_cli(grid_args(tmp_path, "optimizer.lr=0.00001,0.00002", "trainer.epochs=2"),
                    cwd=tmp_path, data=data_file)
    assert worse.returncode == 0, worse.stderr[-3000:]
    out = worse.stdout + worse.stderr
    assert "without the champion alias" in out and "does not beat champion version 1" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                          registry_uri=f"sqlite:///{tmp_path}/mlflow.db")
    versions = {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(map(int, versions)) == [1, 2]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert float(versions[2].tags["test_rmse"]) > float(versions[1].tags["test_rmse"])


@pytest.mark.slow
def test_sweep_setting_errors_fail_before_any_trial(tmp_path, data_file):
    cases = [
        (["-m", "sweep=quick", "hydra.sweeper.metric=test_rmse"], "must be a validation metric"),
        (["-m", "sweep=quick", "hydra.sweeper.samplr.name=tpe"], "samplr"),
        (["-m", "sweep=quick", "hydra.sweeper.pruner.name=sometimes"], "pruner.name"),
        (["-m", "optimizer.lr=interval(0.001, 0.01)"], "sampler.name=grid needs choice()"),
        (["-m", "trainer.epochs=3"], "nothing to sweep"),
    ]
    for args, words in cases:
        done = run_cli(args, cwd=tmp_path, data=data_file)
        assert done.returncode != 0, args
        assert words in done.stderr, (args, done.stderr[-2000:])
    assert not (tmp_path / "mlflow.db").exists()


def test_sweep_files_compose():
    from hydra import compose, initialize_config_dir

    for name in ("quick", "search"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"sweep={name}"],
                          return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper.sweep_name == name and sweeper.n_trials >= 3
        assert sweeper.metric == "val_rmse" and sweeper.params
        from abalone.sweep.space import search_space

        space, fixed, written = search_space(dict(sweeper.params), [])
        assert len(space) == len(sweeper.params) and not fixed
        assert written == dict(sweeper.params)  # the sweep file's expressions, as written
    space, fixed, written = search_space({"model": "choice(baseline, wide)"},
                                         ["model=wide,deep", "trainer.epochs=3"])
    assert written == {"model": "wide,deep"} and fixed == ["trainer.epochs=3"]


def trial_pids(study: optuna.Study) -> set[int]:
    return {t.user_attrs["pid"] for t in study.trials if "pid" in t.user_attrs}


@pytest.mark.parametrize("storage_kind", [
    "journal file", pytest.param("postgresql", marks=pytest.mark.postgres)])
@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path, data_file, mlflow_server, storage_kind,
                                       request):
    storage = (str(tmp_path / "shared.journal") if storage_kind == "journal file"
               else request.getfixturevalue("postgres_url"))
    args = ["-m", "sweep=quick", *SMALL, "hydra.sweeper.n_trials=5",
            f"hydra.sweeper.storage={storage}", "tracking=server", f"tracking.uri={mlflow_server}"]
    procs = [start_sweep(args, tmp_path, data_file) for _ in range(2)]
    outputs = [p.communicate(timeout=CLI_TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    study = load_study(storage)
    assert_total_honoured(study, 5)
    # Every trial ran in one of the two (which one gets how many is the scheduler's choice: a
    # process may even find the study finished), and both worked on this one study.
    assert 1 <= len(trial_pids(study)) and trial_pids(study) <= {p.pid for p in procs}
    for output in outputs:
        assert f"study '{study.study_name}'" in output, output[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    (parent,), runs = sweep_runs(client)  # one parent: the processes agreed on it
    assert parent.info.status == "FINISHED"
    ran = [t for t in study.trials if "mlflow_run_id" in t.user_attrs]
    assert sorted(r.info.run_id for r in runs) == sorted(t.user_attrs["mlflow_run_id"] for t in ran)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1


@pytest.mark.slow
def test_n_jobs_runs_trials_in_parallel_processes(tmp_path, data_file):
    proc = start_sweep(["-m", "sweep=quick", *SMALL, "hydra.sweeper.n_trials=4",
                        "hydra.sweeper.n_jobs=2"], tmp_path, data_file)
    output = proc.communicate(timeout=CLI_TIMEOUT)[0]
    assert proc.returncode == 0, output[-4000:]
    study = load_study(str(tmp_path / "optuna-studies.journal"))
    assert_total_honoured(study, 4)
    # The command and the one process it started (its failure would fail the command): how the
    # trials fall between the two is the scheduler's choice (the command starts on trials
    # while the other process imports).
    assert 1 <= len(trial_pids(study)) <= 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,), runs = sweep_runs(client)
    assert parent.info.status == "FINISHED" and len(runs) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    # All trials' outputs land in the one sweep folder, one subfolder per trial number.
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
