"""The sweep's pure logic on toy studies, in-process and without TensorFlow: the search space,
constraints, the Pareto champion, the model check, the stop rule, `n_trials` slots and stale
trials, samplers, the plan's checks and the workers' command line."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from abalone.config import ConfigError
from abalone import accidents
from abalone.study.trials import WARM_START_OF, candidates, model_check
from abalone.sweep import algorithms, objectives, plan, slots, space
from abalone.sweep.coordinator import worker_argv
from hydra_plugins.abalone_optuna_sweeper.config import AbaloneOptunaSweeperConf, SamplerConf

optuna.logging.set_verbosity(optuna.logging.WARNING)


def settings(**changes):
    """hydra.sweeper as a sweep file and the command line would make it."""
    return OmegaConf.merge(OmegaConf.structured(AbaloneOptunaSweeperConf), changes)


# -- the search space ---------------------------------------------------------------------------

def test_search_space_from_the_override_grammar():
    swept, fixed, written = space.search_space(
        {"model": "choice(wide, deep)", "optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
         "trainer.batch_size": "range(32, 129, 32)", "model.dropout": "interval(0.0, 0.5)",
         "model.units": "int(interval(16, 64))"},
        ["trainer.epochs=3", "model=wide,deep,mlp"])
    assert swept["model"] == CategoricalDistribution(["wide", "deep", "mlp"])  # command line wins
    assert swept["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert swept["trainer.batch_size"] == IntDistribution(32, 128, step=32)
    assert swept["model.dropout"] == FloatDistribution(0.0, 0.5)
    assert swept["model.units"] == IntDistribution(16, 64)
    assert fixed == ["trainer.epochs=3"]
    assert written["model"] == "wide,deep,mlp"


def test_a_fixed_value_on_the_command_line_replaces_a_swept_one():
    swept, fixed, written = space.search_space({"model": "choice(wide, deep)"}, ["model=mlp"])
    assert swept == {} and written == {} and fixed == ["model=mlp"]


@pytest.mark.parametrize("expression, words", [
    ("range(5, 1)", "range(5, 1) is empty"),
    ("glob(*)", "Glob is not supported; use choice()"),
    ("choice(16, 32),64", "a sweep inside a sweep"),
    ("range(16, 48, 16),64", "a sweep inside a sweep"),
])
def test_bad_sweep_expressions_are_refused_by_key(expression, words):
    with pytest.raises(ConfigError, match=r"sweep parameter model\.units: .*" + re.escape(words)):
        space.search_space({"model.units": expression}, [])


def test_starting_points_must_lie_in_the_space():
    swept, _, _ = space.search_space({"optimizer.lr": "interval(0.001, 0.1)"}, [])
    space.check_starting_points([{"optimizer.lr": 0.01}], swept, conditional=False)
    with pytest.raises(ConfigError, match=r"starting_points\[0\]\.optimizer\.lr=0\.5 is outside"):
        space.check_starting_points([{"optimizer.lr": 0.5}], swept, conditional=False)
    with pytest.raises(ConfigError, match=r"starting_points\[1\]\.model is not a swept"):
        space.check_starting_points([{}, {"model": "wide"}], swept, conditional=False)
    space.check_starting_points([{"model": "wide"}], swept, conditional=True)


# -- objectives -------------------------------------------------------------------------------

def test_constraints_parse_and_measure_their_violation():
    small, fast = objectives.parse_constraints(["params_count <= 20000",
                                                "predict_seconds>=0.001"])
    assert (small.name, small.bound, small.at_most) == ("params_count", 20000, True)
    assert small.violation(25000) == 5000 and small.violation(100) < 0
    assert fast.violation(0.0005) > 0 and str(fast) == "predict_seconds >= 0.001"
    for line, words in [("params_count < 5", "write 'NAME <= NUMBER'"),
                        ("test_rmse <= 2", "the test rows never choose a trial"),
                        ("params_count <= nan", "write 'NAME <= NUMBER'")]:
        with pytest.raises(ConfigError, match=r"constraints\[0\]"):
            objectives.parse_constraints([line])
        with pytest.raises(ConfigError, match=re.escape(words)):
            objectives.parse_constraints([line])


def study_of(values: list[list[float]], directions: list[str], constraints=None):
    study = optuna.create_study(directions=directions)
    for i, point in enumerate(values):
        study.add_trial(optuna.trial.create_trial(
            values=point, params={"x": float(i)},
            distributions={"x": FloatDistribution(0, 100)},
            system_attrs=({"constraints": constraints[i]} if constraints else {})))
    return study


def test_pareto_front_and_champion():
    study = study_of([[2.0, 10.0], [1.0, 20.0], [3.0, 5.0], [2.5, 12.0], [1.0, 20.0]],
                     ["minimize", "minimize"])
    front = objectives.pareto_front(candidates(study), ["minimize", "minimize"])
    assert sorted(t.number for t in front) == [0, 1, 2, 4]  # 3 is dominated by 0
    champion = objectives.champion(front, ["minimize", "minimize"])
    assert champion.number == 1  # best first metric; the lower number breaks the tie with 4
    maximize = objectives.champion(front, ["maximize", "minimize"])
    assert maximize.number == 2
    assert objectives.champion([], ["minimize"]) is None


def test_infeasible_and_copied_trials_never_become_champion():
    study = study_of([[1.0], [2.0], [3.0]], ["minimize"], constraints=[[5.0], [0.0], [-1.0]])
    study.add_trial(optuna.trial.create_trial(values=[0.5], user_attrs={
        WARM_START_OF: "other#0"}))
    assert [t.number for t in candidates(study)] == [1, 2]


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_model_check_logs_only_a_best_so_far(direction):
    study = study_of([[2.0], [3.0]], [direction])
    check = model_check(study, every_model=False)
    better, worse = (1.0, 4.0) if direction == "minimize" else (4.0, 1.0)
    assert check(better) and not check(worse)
    assert check(2.0 if direction == "minimize" else 3.0)  # a tie logs too
    assert model_check(study, every_model=True)(worse)
    assert model_check(optuna.create_study(direction=direction), False)(worse)


def test_no_improvement_stops_after_patience_trials_without_a_better_value():
    study = study_of([[2.0], [1.0], [1.5], [1.6]], ["minimize"])
    assert objectives.stagnation(study, "no_improvement", 3, 0, ["minimize"]) is None
    study.add_trial(optuna.trial.create_trial(values=[1.2]))
    reason = objectives.stagnation(study, "no_improvement", 3, 0, ["minimize"])
    assert reason.startswith("no better objective in the 3 trials after trial 1")
    # After an earlier stop at trial 4, only trials from 5 on count towards the patience.
    assert objectives.stagnation(study, "no_improvement", 3, 5, ["minimize"]) is None


# -- slots and stale trials -------------------------------------------------------------------

def finished_pid() -> int:
    """A pid no process of this machine has (the quick tier starts no process to get one)."""
    pid = int(open("/proc/sys/kernel/pid_max").read()) - 1
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


def test_slots_count_retries_once_and_skip_surplus_and_copies():
    study = optuna.create_study()
    done = study.ask({"x": FloatDistribution(0, 1)})
    study.tell(done, 0.5)
    surplus = study.ask()
    surplus.set_user_attr("surplus", True)
    study.tell(surplus, state=TrialState.FAIL)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)  # its training raised: it keeps its slot
    interrupted = study.ask({"x": FloatDistribution(0, 1)})
    slots.fail_and_retry(study, interrupted)
    study.add_trial(optuna.trial.create_trial(values=[0.1], user_attrs={
        WARM_START_OF: "other#3"}))
    trials = study.get_trials(deepcopy=False)
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert slots.retried_number(retry) == interrupted.number
    assert retry.params == study.trials[interrupted.number].params
    assert [t.number for t in slots.slot_holders(trials)] == [done.number, failed.number,
                                                              retry.number]
    assert retry.number > interrupted.number
    assert slots.work_left(study, 3)  # the queued retry runs whatever the total
    study.tell(study.ask(), 0.2)  # the retry
    assert not slots.work_left(study, 3) and slots.work_left(study, 4)
    assert slots.within_total(study, 100, 4) and not slots.within_total(study, 100, 3)


def test_a_dead_process_s_trial_fails_at_once_and_a_silent_one_after_stale_after():
    study = optuna.create_study()
    dead, silent, alive = (study.ask({"x": FloatDistribution(0, 1)}) for _ in range(3))
    for trial in (dead, silent, alive):
        slots.mark_owner(trial)
    dead.set_user_attr("pid", finished_pid())
    silent.set_user_attr("host", "another-host")
    silent.set_user_attr("heartbeat", time.time() - 100)
    alive.set_user_attr("pid", os.getppid())  # a live process of this host, not this one
    ended = []
    failed = slots.fail_stale_trials(study, 60, ended.append)
    assert failed == [dead.number, silent.number]
    assert [t.number for t in ended] == failed
    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == states[silent.number] == TrialState.FAIL
    assert states[alive.number] == TrialState.RUNNING
    retried = {slots.retried_number(t) for t in study.trials if t.state == TrialState.WAITING}
    assert retried == {dead.number, silent.number}
    assert slots.fail_stale_trials(study, 60, ended.append) == []  # once


def test_a_trial_no_process_marked_is_failed_and_queued_again_once_it_has_aged(tmp_path,
                                                                              monkeypatch):
    """A process that died (or lost the database's reply) between ask and mark_owner leaves a
    RUNNING trial that Optuna's heartbeat never fails (it has no beat): it would hold its slot
    for ever, and a rerun would end 'complete' with a trial short."""
    from abalone.study.storage import make_storage

    study = optuna.create_study(storage=make_storage(f"sqlite:///{tmp_path / 'study.db'}",
                                                     stale_after=600))
    orphan = study.ask({"x": FloatDistribution(0, 1)})
    orphan.set_user_attr("host", accidents.HOST)  # its process died in mark_owner, before the pid
    mine = study.ask({"x": FloatDistribution(0, 1)})
    slots.mark_owner(mine)
    monkeypatch.setattr(slots, "UNMARKED_AFTER", 2.0)
    assert slots.fail_stale_trials(study, 600, lambda t: None) == []  # it may be marked yet
    ended, start = [], time.monotonic()
    assert slots.wait_out_unmarked(study, 600, ended.append)
    assert 1.0 <= time.monotonic() - start < 10
    assert [t.number for t in ended] == [orphan.number]
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL and states[mine.number] == TrialState.RUNNING
    (retry,) = [t for t in study.trials if t.state == TrialState.WAITING]
    assert slots.retried_number(retry) == orphan.number
    assert not slots.wait_out_unmarked(study, 600, ended.append)  # none left: no wait


def _raised(make):
    try:
        make()
    except Exception as err:  # noqa: BLE001 - the error as the sweep would get it
        return err
    raise AssertionError("nothing raised")


def test_a_transport_fault_is_told_from_a_trial_s_own_error():
    """Which failed trials are queued again rather than counted (abalone.sweep.slots)."""
    import botocore.exceptions
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from abalone.aws import AwsError
    from abalone.tracking import TrackingError

    def mlflow_lost():
        try:
            raise requests.exceptions.ConnectionError("('Connection aborted.', "
                                                      "ConnectionResetError(104))")
        except requests.exceptions.ConnectionError as err:
            raise MlflowException(f"API request to http://x failed with exception {err}")

    def s3_says(status):
        def upload():
            try:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                    "PutObject")
            except botocore.exceptions.ClientError as err:
                raise AwsError("uploading run to s3://b/p failed") from err
        return upload

    def database_gone():
        try:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(
                "server closed the connection unexpectedly"))
        except sqlalchemy.exc.OperationalError as err:
            raise optuna.exceptions.StorageInternalError("during the commit") from err

    transport = {
        "mlflow": _raised(mlflow_lost),
        "mlflow 503": MlflowException("503", error_code=TEMPORARILY_UNAVAILABLE),
        "s3 503": _raised(s3_says(503)), "s3 429": _raised(s3_says(429)),
        "database": _raised(database_gone), "reset": ConnectionResetError(104, "reset"),
        "outage": TrackingError("the MLflow tracking server was unreachable for 600s")}
    for name, error in transport.items():
        assert slots.transport_fault(error), name
    assert slots.transport_fault(transport["mlflow"]).startswith("ConnectionError: ")
    own = {"s3 403": _raised(s3_says(403)), "value": ValueError("loss is NaN"),
           "mlflow 400": MlflowException("bad", error_code=INVALID_PARAMETER_VALUE),
           "none": None}
    for name, error in own.items():
        assert slots.transport_fault(error) is None, name


def test_optuna_s_heartbeat_fails_a_silent_trial_of_a_database_storage(tmp_path):
    from abalone.study.storage import make_storage

    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", stale_after=3)
    study = optuna.create_study(storage=storage)
    assert slots.has_heartbeat(study)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    trial.set_user_attr("host", "another-host")
    with slots.Heartbeat(study, trial, 0.2):
        time.sleep(1)
        assert slots.fail_stale_trials(study, 3, lambda t: None) == []  # it beats
    time.sleep(4.6)  # past the grace period in SQLite's whole seconds
    assert slots.fail_stale_trials(study, 3, lambda t: None) == [trial.number]
    (retry,) = [t for t in study.trials if t.state == TrialState.WAITING]
    assert slots.retried_number(retry) == trial.number


# -- samplers and the plan --------------------------------------------------------------------

def test_samplers_are_seeded_per_rank_and_refuse_what_they_cannot_sample():
    swept, _, _ = space.search_space({"optimizer.lr": "interval(0.001, 0.1)",
                                      "model": "choice(wide, deep)"}, [])
    tpe = algorithms.make_sampler(SamplerConf(name="tpe", seed=42), swept, rank=3)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert tpe._rng.rng.get_state()[1][0] == optuna.samplers.TPESampler(seed=45)._rng.rng \
        .get_state()[1][0]
    grid = algorithms.make_sampler(SamplerConf(name="grid"), {"model": swept["model"]}, rank=0)
    assert isinstance(grid, optuna.samplers.GridSampler)
    for name, words in [("cmaes", "model is categorical"), ("qmc", "model is categorical")]:
        with pytest.raises(ConfigError, match=f"sampler.name={name} .*{words}"):
            algorithms.make_sampler(SamplerConf(name=name), swept, rank=0)
    with pytest.raises(ConfigError, match="cmaes optimises one metric"):
        algorithms.make_sampler(SamplerConf(name="cmaes"), {"optimizer.lr": swept["optimizer.lr"]},
                                rank=0, n_objectives=2)
    with pytest.raises(ConfigError, match="needs hydra.sweeper.sampler.name=grid|grid needs"):
        algorithms.make_sampler(SamplerConf(name="grid"), swept, rank=0)


@pytest.mark.parametrize("changes, words", [
    ({}, "nothing to sweep"),
    ({"params": {"model": "choice(wide, deep)"}, "sampler": {"name": "tpe"}},
     "n_trials is required with the tpe sampler"),
    ({"params": {"model": "choice(wide, deep)"}, "n_trials": 0}, "n_trials must be >= 1, got 0"),
    ({"params": {"model": "choice(wide, deep)"}, "n_trials": 2, "n_jobs": 0},
     "hydra.sweeper.n_jobs must be >= 1, got 0"),
    ({"params": {"model": "choice(wide, deep)"}, "n_trials": 2,
      "metric": ["val_rmse", "params_count"]}, "names 2 metric(s) but"),
    ({"params": {"model": "choice(wide, deep)"}, "n_trials": 2, "metric": "test_rmse"},
     "must be a validation metric"),
    ({"params": {"model": "choice(wide, deep)"}, "n_trials": 2, "metric": "val_accuracy"},
     "val_accuracy is better higher: set hydra.sweeper.direction=maximize"),
    ({"params": {"model": "choice(wide, deep)"}, "n_trials": 2,
      "stop": {"rule": "no_improvement", "patience": 0}}, "stop.patience must be >= 1"),
    ({"params": {"model": "choice(wide, deep)"}, "sampler": {"name": "grid"},
      "custom_search_space": "abalone.search_spaces:optimizer_settings"},
     "cannot add parameters to a grid"),
    ({"params": {"model": "choice(wide, deep)"}, "n_trials": 2,
      "custom_search_space": "abalone.nowhere:f"}, "custom_search_space=abalone.nowhere:f"),
])
def test_the_plan_refuses_bad_settings_by_key(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        plan.make_plan(settings(**changes), [])


def test_the_plan_names_a_study_by_its_space_so_a_rerun_resumes_it():
    made = plan.make_plan(settings(params={"model": "choice(wide, deep)"}, sweep_name="quick",
                                   n_trials=4), ["trainer.epochs=2"])
    again = plan.make_plan(settings(params={"model": "choice(wide, deep)"}, sweep_name="quick",
                                    n_trials=8), ["trainer.epochs=2"])
    other = plan.make_plan(settings(params={"model": "choice(wide, mlp)"}, sweep_name="quick",
                                    n_trials=4), ["trainer.epochs=2"])
    assert made.study_name.startswith("quick-") and made.study_name == again.study_name
    assert other.study_name != made.study_name
    grid = plan.make_plan(settings(params={"model": "choice(wide, deep)",
                                           "trainer.batch_size": "range(32, 97, 32)"},
                                   sampler={"name": "grid"}), [])
    assert grid.n_trials == 6  # the grid's size
    params = made.params("local")
    assert params["sweep.space.model"] == "choice(wide, deep)"
    assert params["sweep.sampler.name"] == "tpe" and "sweep.sampler.sigma0" not in params


def test_a_worker_s_command_line_names_the_study_and_runs_its_trials_itself(tmp_path):
    argv = ["-m", "sweep=quick", "workers=container", "workers.count=3", "hydra.sweeper.n_jobs=4",
            "hydra.sweeper.storage=old", "trainer.epochs=2"]
    local = worker_argv(argv, "quick-1", "postgresql://u@h/db", tmp_path)
    assert local == ["-m", "sweep=quick", "trainer.epochs=2", "workers=local",
                     "hydra.sweeper.n_jobs=1", "hydra.sweeper.study_name=quick-1",
                     "hydra.sweeper.storage='postgresql://u@h/db'",
                     f"hydra.sweep.dir={tmp_path.resolve()}"]
    remote = worker_argv(argv, "quick-1", "it's", None)
    assert remote[-1] == "hydra.sweeper.storage='it\\'s'" and not any(
        a.startswith("hydra.sweep.dir=") for a in remote)


def test_a_worker_s_state_names_its_exit_code_or_signal(tmp_path):
    from abalone.workers.base import exit_status

    log = tmp_path / "worker.log"
    log.write_text("training\nerror: first\nerror: data file not found\n")
    assert exit_status(None, log) == "running"
    assert exit_status(0, log) == "finished"
    assert exit_status(1, log) == "failed: exit code 1, error: data file not found"
    assert exit_status(-9, None) == "failed: killed by SIGKILL"
    assert exit_status(-100, None) == "failed: killed by signal 100"


def finished_trial(state: TrialState, seconds: float, **attrs) -> optuna.trial.FrozenTrial:
    import datetime

    start = datetime.datetime(2026, 1, 1)
    return optuna.trial.FrozenTrial(
        number=0, state=state, value=1.0 if state == TrialState.COMPLETE else None,
        datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=seconds),
        params={}, distributions={}, user_attrs=attrs, system_attrs={},
        intermediate_values={0: 3.0, 1: 2.5} if state == TrialState.PRUNED else {},
        trial_id=0)


def test_a_trial_line_shows_progress_eta_and_a_pruned_trials_value():
    from abalone.sweep.report import duration_text, progress_text, shown_values

    assert [duration_text(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
    done = [finished_trial(TrialState.COMPLETE, s) for s in (10, 20, 30)]
    pruned = finished_trial(TrialState.PRUNED, 4)
    copied = finished_trial(TrialState.COMPLETE, 1, **{WARM_START_OF: "other"})
    # 4 of 10 count (the warm-start copy does not); median of 10, 20, 30, 4 is 15 s; 6 left, 2 jobs
    assert progress_text([*done, pruned, copied], 10, False, 2) == "4/10  eta 45s"
    assert progress_text([*done, pruned], 10, True, 1) == "4/≤10  eta 1m30s"
    assert progress_text(done, 3, False, 1) == "3/3"  # nothing left: no ETA
    assert progress_text([], 5, False, 1) == "0/5"
    assert shown_values(["val_rmse"], "PRUNED", None, pruned) == "val_rmse 2.5000 at epoch 2"
    assert shown_values(["val_rmse", "params_count"], "COMPLETE", [2.0, 1000.0], done[0]) == (
        "val_rmse 2.0000  params_count 1000")
    assert shown_values(["val_rmse"], "FAIL", None, done[0]) == "val_rmse -"


def test_each_pruner_is_made_from_its_settings():
    from abalone.study.trials import make_pruner
    from hydra_plugins.abalone_optuna_sweeper.config import PrunerConf

    made = {name: make_pruner(OmegaConf.structured(PrunerConf(name=name)), 30)
            for name in ("median", "hyperband", "successive_halving", "none")}
    assert isinstance(made["median"], optuna.pruners.MedianPruner)
    assert isinstance(made["hyperband"], optuna.pruners.HyperbandPruner)
    halving = made["successive_halving"]
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)
    assert (halving._min_resource, halving._reduction_factor) == (3, 3)
    assert isinstance(made["none"], optuna.pruners.NopPruner)
    assert algorithms.SETTINGS_USED["successive_halving"] == ("min_resource", "reduction_factor")


def test_every_process_of_a_grid_study_shares_its_shuffle():
    # A trial's grid id names a point of the sampler's shuffled grid: a process (or a rerun)
    # with another rank must map ids to the same points, or it runs one point twice.
    swept = {"optimizer.lr": CategoricalDistribution([0.02, 0.01, 0.005]),
             "model": CategoricalDistribution(["wide", "deep"])}
    grids = [algorithms.make_sampler(SamplerConf(name="grid"), swept, rank=rank)._all_grids
             for rank in (0, 1, 5)]
    assert grids[0] == grids[1] == grids[2]
    others = [algorithms.make_sampler(SamplerConf(name="random"), swept, rank=rank)
              for rank in (0, 1)]
    assert others[0]._rng.rng.random() != others[1]._rng.rng.random()  # they differ per rank
