"""Equal work against the peer (issue #33): the frameworks' own cost, without the search's. The
same N parameter sets of sweeps/search.yaml's space, drawn once with a seeded random sampler, are
trained by both sides with no pruning and 2 workers each, `--equal-epochs` epochs: ours as
`sweep=search` with the sets as its `starting_points` (a sweep file written beside the run, given
with `--config-dir`), the peer (bench/peer_optuna.py) with them enqueued. The arithmetic is the
same, so the wall-time ratio is what each framework adds around it.

Our steady-state cost per trial beyond its epochs: per trial, its wall time in the study (its
creation to its end) minus the sum of its logged `epoch_duration`s; the median over trials 6..N
(the first ones pay the compiled programs' traces).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from bench.measure import REPO, SCRIPTS, base_env, run_measured

WORKERS = 2
WARM_FROM = 6  # trials before this one may pay a trace


def parameter_sets(count: int, seed: int) -> list[dict]:
    """`count` points of sweeps/search.yaml's space, drawn by Optuna's seeded random sampler."""
    import optuna

    from abalone.sweep import space

    params = yaml.safe_load((REPO / "sweeps" / "search.yaml").read_text())["hydra"]["sweeper"][
        "params"]
    distributions, _, _ = space.search_space(params, [])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sets = []
    for _ in range(count):
        trial = study.ask(distributions)
        sets.append(dict(trial.params))
        study.tell(trial, 0.0)
    return sets


def our_costs(folder: Path) -> dict:
    """Per trial of the sweep run in `folder`: its wall seconds and the seconds of its epochs."""
    import mlflow
    import optuna

    from abalone.study.storage import make_storage

    storage = make_storage(f"{folder}/optuna-studies.journal")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    trials = []
    for trial in sorted(study.trials, key=lambda t: t.number):
        epochs = [m.value for m in client.get_metric_history(trial.user_attrs["mlflow_run_id"],
                                                             "epoch_duration")]
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        trials.append({"number": trial.number, "state": trial.state.name, "wall": wall,
                       "epochs": len(epochs), "epoch_seconds": sum(epochs)})
    return {"trials": trials,
            "beyond_epochs": [t["wall"] - t["epoch_seconds"] for t in trials
                              if t["number"] >= WARM_FROM - 1]}


def bench_equal_work(args) -> dict:
    sets = parameter_sets(args.equal_sets, args.seed)
    epochs = args.equal_epochs
    with tempfile.TemporaryDirectory(prefix="abalone-bench-equal-") as tmp:
        folder = Path(tmp)
        search = yaml.safe_load((REPO / "sweeps" / "search.yaml").read_text())
        sweeper = search["hydra"]["sweeper"]
        sweeper.update({"sweep_name": "equal", "n_trials": len(sets), "n_jobs": WORKERS,
                        "starting_points": sets, "pruner": {"name": "none"}})
        search["trainer"]["epochs"] = epochs
        (folder / "conf" / "sweep").mkdir(parents=True)
        (folder / "conf" / "sweep" / "equal.yaml").write_text(
            "# @package _global_\n" + yaml.safe_dump(search, sort_keys=False))
        command = [sys.executable, "-m", "abalone.train", "-m", "sweep=equal",
                   f"--config-dir={folder / 'conf'}"]
        load_ours = os.getloadavg()[0]
        measured = run_measured(command, folder, base_env(args.data))
        costs = our_costs(folder)
    ours = {"wall_seconds": measured["wall_seconds"], "load_before": load_ours,
            "trials": len(costs["trials"]),
            "epochs": sum(t["epochs"] for t in costs["trials"]),
            "median_cost_beyond_epochs": statistics.median(costs["beyond_epochs"]),
            "command": "python -m abalone.train -m sweep=equal (search.yaml, the sets as "
                       f"starting_points, pruner none, {epochs} epochs, n_jobs {WORKERS})"}
    with tempfile.TemporaryDirectory(prefix="abalone-bench-equal-peer-") as tmp:
        (Path(tmp) / "sets.json").write_text(json.dumps(sets))
        load_peer = os.getloadavg()[0]
        measured = run_measured(
            [sys.executable, str(SCRIPTS / "bench" / "peer_optuna.py"), "--data", args.data,
             "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--trials", str(len(sets)),
             "--epochs", str(epochs), "--n-jobs", str(WORKERS), "--enqueue",
             str(Path(tmp) / "sets.json"), "--no-pruning"], Path(tmp), base_env(args.data))
    reported = json.loads(measured["output"].split("RESULT ", 1)[1].splitlines()[0])
    peer = {"wall_seconds": measured["wall_seconds"], "load_before": load_peer,
            "trials": reported["trials"], "complete": reported["complete"]}
    result = {"sets": len(sets), "epochs": epochs, "ours": ours, "peer": peer,
              "speedup": peer["wall_seconds"] / ours["wall_seconds"]}
    print(f"equal work, the same {len(sets)} parameter sets x {epochs} epochs, no pruning, "
          f"{WORKERS} workers each: ours {ours['wall_seconds']:.1f} s ({ours['epochs']} epochs; "
          f"median cost per trial beyond its epochs, trials {WARM_FROM}-{len(sets)}: "
          f"{ours['median_cost_beyond_epochs']:.2f} s; load {load_ours:.1f}), peer "
          f"{peer['wall_seconds']:.1f} s (load {load_peer:.1f}); peer/ours "
          f"{result['speedup']:.2f}x", flush=True)
    return result
