"""Search features of the sweeper, each through real tiny sweeps of the CLI (journal file
storage, local MLflow store): samplers, multi-objective studies with a Pareto champion,
constraints, starting points, warm starts, conditional spaces and the stop rule."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import CLI_TIMEOUT, REPO, run_cli, scrubbed_environ, sweep_runs
from venvs import project_site_env, side_venv

MODEL = "abalone-tensorflow-model"
TWO_EPOCHS = ["trainer.epochs=2", "trainer.patience=0", "trainer.verbose=0"]
# The gp sampler and the terminator run on PyTorch, which the everyday .venv leaves out (PyPI's
# Linux wheel brings ~3 GB of CUDA libraries): their tests run it from a side venv that sees the
# project's packages. This pin takes a machine's local CPU-only wheel where pip's find-links
# offers one (2.13.0+cpu satisfies ==2.13.0), else PyPI's.
TORCH = ("torch==2.13.0",)


def torch_python() -> str:
    return str(side_venv("torch", *TORCH, sees_project=True) / "python")


def in_torch_venv(code: str) -> str:
    """What `code` prints, run by the PyTorch venv's Python beside this module (which it may
    import: `from test_search import ...`)."""
    done = subprocess.run([torch_python(), "-c", code], cwd=REPO / "tests", capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, env=scrubbed_environ(
                              **project_site_env(), PYTHONPATH=str(REPO / "scripts")))
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def load(tmp_path, name: str) -> optuna.Study:
    from abalone.study.storage import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(str(tmp_path / "s.journal")))


def sweep(tmp_path, data_file, *args: str, torch: bool = False):
    """The CLI's sweep with `args` (`torch`: run by the PyTorch venv's Python)."""
    done = run_cli(["-m", *TWO_EPOCHS, f"hydra.sweeper.storage={tmp_path / 's.journal'}", *args],
                   cwd=tmp_path, data=data_file, python=torch_python() if torch else sys.executable,
                   env=project_site_env() if torch else None)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def local_client(tmp_path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_multi_objective_sweep_crowns_the_best_feasible_pareto_trial(tmp_path, data_file):
    # 128-64 hidden units has ~9,700 parameters: over the bound, so infeasible whatever its RMSE.
    out = sweep(tmp_path, data_file, "hydra.sweeper.study_name=mo",
                "hydra.sweeper.metric=[val_rmse,params_count]",
                "hydra.sweeper.direction=[minimize,minimize]",
                "hydra.sweeper.constraints=['params_count <= 2000']",
                "hydra.sweeper.sampler.name=nsgaii", "hydra.sweeper.sampler.population_size=2",
                "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner.name=median",
                "model.units=choice(8, 128)", "model.depth=range(1,3)",
                "hydra.sweeper.starting_points=[{model.units:128,model.depth:2},"
                "{model.units:8,model.depth:1}]")
    assert "pruning is off: Optuna cannot prune a multi-objective study" in out
    study = load(tmp_path, "mo")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    assert trials[0].params == {"model.units": 128, "model.depth": 2}  # the starting points first
    assert trials[1].params == {"model.units": 8, "model.depth": 1}

    client = local_client(tmp_path)
    (parent,), runs = sweep_runs(client)
    run_of = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}
    for trial in trials:
        run = run_of[trial.number]
        # The second objective is the model's measured size, logged like a metric.
        assert trial.values[0] == pytest.approx(run.data.metrics["objective"])
        assert trial.values[1] == run.data.metrics["params_count"]
        assert run.data.metrics["predict_seconds"] > 0
        assert not trial.intermediate_values  # nothing reported to a pruner
        feasible = trial.values[1] <= 2000
        assert trial.constraints == {"params_count <= 2000": trial.values[1] - 2000}
        assert run.data.tags["optuna.feasible"] == str(feasible).lower()
    assert trials[0].values[1] > 2000 and "infeasible: breaks params_count <= 2000" in out

    feasible = [t for t in trials if t.values[1] <= 2000]
    front = [t for t in feasible if not any(
        o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
        for o in feasible)]
    champion = min(front, key=lambda t: (t.values[0], t.number))
    assert parent.data.tags["pareto_front"] == ", ".join(str(t.number) for t in front)
    assert parent.data.tags["best.trial_number"] == str(champion.number)
    assert parent.data.metrics["best_objective"] == pytest.approx(champion.values[0])
    for number, run in run_of.items():
        on_front = number in {t.number for t in front}
        assert (run.data.tags.get("optuna.pareto_front") == "true") == on_front
    assert parent.data.params["sweep.metric"] == "val_rmse, params_count"
    assert parent.data.params["sweep.pruner.name"] == "none"
    assert parent.data.params["sweep.constraints"] == "params_count <= 2000"

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/pareto_front.png", "optuna/pareto_front.csv",
            "optuna/optimization_history.png"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "optuna/pareto_front.csv",
                                      str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(open(table).read())))
    assert [int(r["trial"]) for r in rows] == [t.number for t in front]
    assert [float(r["params_count"]) for r in rows] == [t.values[1] for t in front]

    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert version.run_id == champion.user_attrs["mlflow_run_id"]
    assert version.tags["objective_metric"] == "val_rmse, params_count"


@pytest.mark.slow
def test_starting_points_stop_rule_and_warm_start(tmp_path, data_file):
    space = ["optimizer.lr=tag(log, interval(0.00001, 0.03))", "model.depth=range(1,3)"]
    first = [*space, "hydra.sweeper.study_name=first", "hydra.sweeper.sampler.name=qmc",
             "hydra.sweeper.stop.rule=no_improvement", "hydra.sweeper.stop.patience=1",
             "hydra.sweeper.starting_points=[{optimizer.lr:0.02},{optimizer.lr:0.00001}]"]
    sweep(tmp_path, data_file, *first, "hydra.sweeper.n_trials=3")
    study = load(tmp_path, "first")
    # A good learning rate, then a hopeless one: no improvement in 1 trial stops the study.
    assert [t.params["optimizer.lr"] for t in study.trials] == [0.02, 0.00001]
    assert study.trials[1].value > study.trials[0].value
    reason = study.user_attrs["stopped"]["reason"]
    assert "no better objective in the 1 trials after trial 0" in reason
    client = local_client(tmp_path)
    (parent,), _ = sweep_runs(client)
    assert parent.data.tags["stop.reason"] == reason and parent.info.status == "FINISHED"

    # Neither restarted nor its starting points queued again; a higher n_trials goes on.
    again = sweep(tmp_path, data_file, *first, "hydra.sweeper.n_trials=3")
    assert "raise hydra.sweeper.n_trials above 3 to go on" in again
    assert len(load(tmp_path, "first").trials) == 2
    sweep(tmp_path, data_file, *first, "hydra.sweeper.n_trials=4")
    first_trials = load(tmp_path, "first").trials
    assert len(first_trials) >= 3 and first_trials[2].state == TrialState.COMPLETE

    second = [*space, "hydra.sweeper.study_name=second", "hydra.sweeper.sampler.name=cmaes",
              "hydra.sweeper.n_trials=1", "hydra.sweeper.warm_start_from=first"]
    out = sweep(tmp_path, data_file, *second)
    assert f"warm start from study 'first': {len(first_trials)} trials copied now" in out
    sweep(tmp_path, data_file, *second)  # a rerun copies nothing twice
    study = load(tmp_path, "second")
    copies = [t for t in study.trials if "warm_start_of" in t.user_attrs]
    assert sorted(t.user_attrs["warm_start_of"] for t in copies) == [
        f"first#{t.number}" for t in first_trials]
    assert sorted(t.value for t in copies) == sorted(t.value for t in first_trials)
    (own,) = [t for t in study.trials if "warm_start_of" not in t.user_attrs]
    assert own.state == TrialState.COMPLETE  # copies do not use up n_trials
    # Copies only inform the sampler: the champion is one of the study's own trials.
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert own.user_attrs["mlflow_run_id"] in {v.run_id for v in versions}


@pytest.mark.slow
def test_conditional_space_samples_what_the_drawn_optimizer_needs(tmp_path, data_file):
    sweep(tmp_path, data_file, "hydra.sweeper.study_name=cond", "hydra.sweeper.n_trials=2",
          "hydra.sweeper.sampler.name=tpe", "optimizer=choice(sgd, adamw)",
          "hydra.sweeper.custom_search_space=abalone.search_spaces:optimizer_settings",
          "hydra.sweeper.starting_points=[{optimizer:sgd},{optimizer:adamw}]")
    sgd, adamw = load(tmp_path, "cond").trials
    assert set(sgd.params) == {"optimizer", "optimizer.momentum"}
    assert 0.5 <= sgd.params["optimizer.momentum"] <= 0.95
    assert set(adamw.params) == {"optimizer", "optimizer.weight_decay"}
    client = local_client(tmp_path)
    for trial, key, other in ((sgd, "optimizer.momentum", "optimizer.weight_decay"),
                              (adamw, "optimizer.weight_decay", "optimizer.momentum")):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.params[key] == str(trial.params[key])  # it reached the trial's config
        assert run.data.params[other] == "0.0"
        assert run.data.tags["optuna.sampled_keys"] == f"optimizer, {key}"


@pytest.mark.slow
def test_search_setting_errors_fail_before_any_trial(tmp_path, data_file):
    cases = [
        (["model=choice(wide, deep)", "hydra.sweeper.sampler.name=cmaes",
          "hydra.sweeper.n_trials=2"],
         "sampler.name=cmaes samples only interval() and integer range() parameters; model is "
         "categorical"),
        (["hydra.sweeper.metric=[val_rmse,params_count]", "optimizer.lr=0.01,0.02"],
         "names 2 metric(s) but hydra.sweeper.direction has 1"),
        (["hydra.sweeper.constraints=['params_count < 5']", "optimizer.lr=0.01,0.02"],
         "hydra.sweeper.constraints[0] = 'params_count < 5'"),
        (["hydra.sweeper.custom_search_space=abalone.nowhere:f", "optimizer.lr=0.01,0.02"],
         "hydra.sweeper.custom_search_space=abalone.nowhere:f"),
        (["hydra.sweeper.sampler.popsize=4", "optimizer.lr=0.01,0.02"], "popsize"),
    ]
    for args, words in cases:
        done = run_cli(["-m", *args], cwd=tmp_path, data=data_file)
        assert done.returncode != 0, args
        assert words in done.stderr, (args, done.stderr[-2000:])
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "optuna-studies.journal").exists()


@pytest.mark.slow
def test_gp_sampler_and_terminator_run_a_sweep(tmp_path, data_file):
    # Two random trials, then the Gaussian process proposes; the terminator is asked after each
    # trial from the third on and either lets the study run to n_trials or stops it, saying so.
    out = sweep(tmp_path, data_file, "hydra.sweeper.study_name=gp", "hydra.sweeper.n_trials=4",
                "optimizer.lr=tag(log, interval(0.001, 0.03))", "hydra.sweeper.sampler.name=gp",
                "hydra.sweeper.sampler.n_startup_trials=2", "hydra.sweeper.stop.rule=terminator",
                "hydra.sweeper.stop.patience=3", torch=True)
    study = load(tmp_path, "gp")
    trials = study.trials
    stopped = study.user_attrs.get("stopped")
    assert len(trials) == (4 if stopped is None else stopped["after_trial"] + 1), out[-3000:]
    assert len(trials) >= 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(0.001 <= t.params["optimizer.lr"] <= 0.03 for t in trials)
    if stopped:
        assert "Optuna's terminator" in stopped["reason"] and "the study stops early" in out
    (parent,), _ = sweep_runs(local_client(tmp_path))
    assert parent.data.params["sweep.sampler.name"] == "gp"
    assert parent.data.params["sweep.sampler.n_startup_trials"] == "2"


def test_gp_without_pytorch_names_the_extra(monkeypatch):
    from abalone.config import ConfigError
    from abalone.sweep.algorithms import require_torch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else find_spec(name, *args))
    with pytest.raises(ConfigError, match=re.escape(
            "hydra.sweeper.sampler.name=gp needs PyTorch, which is not installed: "
            "pip install 'abalone[gp]'")):
        require_torch("hydra.sweeper.sampler.name=gp")


def test_constraint_and_starting_point_checks_name_the_setting():
    from abalone.config import ConfigError
    from abalone.sweep.objectives import parse_constraints
    from abalone.sweep.space import check_starting_points, search_space

    (size, speed) = parse_constraints(["params_count <= 2e4", " predict_seconds>=0.5 "])
    assert (size.violation(25000), speed.violation(1.0)) == (5000, -0.5)
    assert str(size) == "params_count <= 20000"
    for lines, words in ((["val_rmse <= 3", "size <= 5"], "hydra.sweeper.constraints[1] must "
                          "be a validation metric"),
                         (["params_count <= many"], "hydra.sweeper.constraints[0] = "
                          "'params_count <= many': write 'NAME <= NUMBER'")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_constraints(lines)
    space, _, _ = search_space({"model": "choice(wide, deep)",
                                "optimizer.lr": "interval(0.001, 0.01)"}, [])
    check_starting_points([{"model": "wide"}, {"optimizer.lr": 0.005}], space, False)
    for points, conditional, words in (
            ([{"model": "wide"}, {"model": "huge"}], False,
             "hydra.sweeper.starting_points[1].model='huge' is outside the search space"),
            ([{"optimizer.lr": 0.5}], False, "starting_points[0].optimizer.lr=0.5 is outside"),
            ([{"optimizer.momentum": 0.9}], False,
             "starting_points[0].optimizer.momentum is not a swept parameter")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            check_starting_points(points, space, conditional)
    check_starting_points([{"optimizer.momentum": 0.9}], space, True)  # a custom function's


def draws_from_its_space(names: list[str]) -> None:
    """Each named sampler (of one and of two objectives) draws 3 trials inside its space."""
    from hydra_plugins.abalone_optuna_sweeper.config import SamplerConf, SamplerName

    from abalone.sweep.algorithms import make_sampler
    from abalone.sweep.space import search_space

    space, _, _ = search_space({"optimizer.lr": "tag(log, interval(0.001, 0.03))",
                                "model.depth": "range(1, 4)"}, [])
    for name in map(SamplerName, names):
        for directions in (["minimize"], ["minimize", "minimize"]):
            if name is SamplerName.cmaes and len(directions) > 1:
                continue
            sampler = make_sampler(SamplerConf(name=name, population_size=2), space, rank=1,
                                   n_objectives=len(directions))
            study = optuna.create_study(sampler=sampler, directions=directions)
            for _ in range(3):
                trial = study.ask(space)
                assert space["optimizer.lr"]._contains(trial.params["optimizer.lr"])
                assert trial.params["model.depth"] in (1, 2, 3)
                study.tell(trial, [trial.params["optimizer.lr"], 1.0][:len(directions)])


def test_every_sampler_but_gp_draws_from_its_space():
    from hydra_plugins.abalone_optuna_sweeper.config import SamplerName

    # grid: tests/test_sweeps.py; gp: test_gp_draws_and_the_terminator_stops_... (PyTorch)
    draws_from_its_space([n.value for n in SamplerName if n.value not in ("grid", "gp")])


def test_size_sweep_file_composes():
    from hydra import compose, initialize_config_dir

    from abalone.sweep.space import search_space

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=size"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert list(sweeper.metric) == ["val_rmse", "params_count"]
    assert list(sweeper.direction) == ["minimize", "minimize"]
    assert list(sweeper.constraints) == ["params_count <= 40000"]
    space, fixed, _ = search_space(dict(sweeper.params), [])
    assert len(space) == len(sweeper.params) and not fixed


def toy_study(xs: list[float]) -> optuna.Study:
    """A finished study of f(x) = (x - 0.3)², one trial per x, in this order."""
    study = optuna.create_study(direction="minimize")
    distributions = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for x in xs:
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=distributions,
                                                  value=(x - 0.3) ** 2))
    return study


def terminator_verdicts() -> list[str | None]:
    # Optuna's terminator (MedianErrorEvaluator's defaults) sets its noise level from trials
    # 10-29: 1% of the median regret bound of those prefixes. Here they crowd one corner, far
    # from the optimum, so the bound is large; 80 more trials across the whole range then pin
    # the optimum down (bound ~1e-4 against a level ~2e-3 when measured), while 10 more in the
    # corner leave it uncertain (bound ~0.1).
    from abalone.sweep.objectives import stagnation

    corner = [0.8 + 0.2 * i / 29 for i in range(30)]
    found = toy_study(corner + [i / 79 for i in range(80)])
    return [stagnation(found, "terminator", 3, 0, ["minimize"]),
            stagnation(toy_study(corner + corner[:10]), "terminator", 3, 0, ["minimize"]),
            # Fewer than stop.patience trials since an earlier stop (trials 108, 109): not asked.
            stagnation(found, "terminator", 3, 108, ["minimize"])]


@pytest.mark.slow
def test_gp_draws_and_the_terminator_stops_a_study_that_has_found_its_optimum_and_no_other():
    printed = in_torch_venv("import json; from test_search import draws_from_its_space, "
                            "terminator_verdicts; draws_from_its_space(['gp']); "
                            "print(json.dumps(terminator_verdicts()))")
    assert json.loads(printed.splitlines()[-1]) == [
        "Optuna's terminator: the regret bound fell below the noise level after 110 trials "
        "(stop.rule=terminator)", None, None]
