"""Stalls (issue #33): `sweep=search` as a user runs it (`n_jobs: 2`), several times in a row,
each in a fresh folder, every trial watched from its creation in the study (its
`datetime_start`, from the study's journal) to the start of its job (bench/stall_watch.py). A
trial whose gap passes `stall_watch.LIMIT` seconds has its process's stacks dumped; the section
prints each sweep's worst gap, the trials over the limit, the garbage collector's longest pause
and the machine's load, and keeps every dump in OUT/stalls/."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import stall_watch
from bench.measure import base_env, run_measured, with_overrides

WATCH = f"+hydra.callbacks.stall_watch._target_={stall_watch.__name__}.StallWatch"


def watched_overrides() -> list[str]:
    return [WATCH]


def trial_gaps(folder: Path, watch_dir: Path) -> dict:
    """Per trial of the sweep run in `folder`: the seconds from its creation in the study to its
    job's start, and from the ask's start to the job's start; the stack dumps."""
    import optuna

    from abalone.study.storage import make_storage

    storage = make_storage(f"{folder}/optuna-studies.journal")
    (summary,) = [s for s in optuna.get_all_study_summaries(storage)
                  if not s.study_name.endswith(".lock")]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    created = {t.number: t.datetime_start.timestamp() for t in study.trials
               if t.datetime_start is not None}
    records, dumps = stall_watch.read(watch_dir)
    gaps = []
    for record in records:
        if record["trial"] in created:
            gaps.append({"trial": record["trial"], "pid": record["pid"],
                         "gap": record["job_start"] - created[record["trial"]],
                         "ask_to_job": record["job_start"] - record.get("ask_begin",
                                                                      record["job_start"]),
                         "gc_pauses": record["gc_pauses"]})
    return {"gaps": sorted(gaps, key=lambda g: g["trial"]), "dumps": dumps,
            "trials": len(created)}


def watched_sweep(args, overrides: list[str], out: Path) -> dict:
    """One watched `sweep=search` in a fresh folder; its wall time, gaps and dumps."""
    with tempfile.TemporaryDirectory(prefix="abalone-bench-stalls-") as tmp:
        folder = Path(tmp)
        watch_dir = folder / "watch"
        env = base_env(args.data, **{stall_watch.ENV: str(watch_dir)})
        load = os.getloadavg()
        command = [sys.executable, "-m", "abalone.train", "-m", "sweep=search", *overrides,
                   *watched_overrides()]
        measured = run_measured(command, folder, env)
        found = trial_gaps(folder, watch_dir)
        if found["dumps"]:
            out.mkdir(parents=True, exist_ok=True)
            for path in [*watch_dir.glob("stacks-*.txt"), *watch_dir.glob("native-*.txt")]:
                shutil.copy(path, out / path.name)
    worst = max(found["gaps"], key=lambda g: g["gap"], default=None)
    pauses = [p["seconds"] for g in found["gaps"] for p in g["gc_pauses"]]
    return {"wall_seconds": measured["wall_seconds"], "trials": found["trials"],
            "watched": len(found["gaps"]), "max_gap": worst["gap"] if worst else None,
            "max_gap_trial": worst["trial"] if worst else None,
            "median_gap": statistics.median(g["gap"] for g in found["gaps"]),
            "over_limit": [g for g in found["gaps"] if g["gap"] > stall_watch.LIMIT],
            "longest_gc_pause": max(pauses, default=0.0), "dumps": found["dumps"],
            "load_before": load[0], "load_after": os.getloadavg()[0],
            "output": measured["output"][-2000:]}


def bench_stalls(args) -> dict:
    overrides = with_overrides({"hydra.sweeper.n_trials": args.sweep_trials},
                               args.sweep_overrides)
    sweeps = []
    for index in range(args.stall_sweeps):
        sweep = watched_sweep(args, overrides, args.out / "stalls" / f"sweep-{index + 1}")
        sweep.pop("output")
        sweeps.append(sweep)
        print(f"stalls, sweep {index + 1}/{args.stall_sweeps}: {sweep['trials']} trials in "
              f"{sweep['wall_seconds']:.1f} s; gap from a trial's creation to its job's start: "
              f"median {sweep['median_gap']:.2f} s, max {sweep['max_gap']:.2f} s (trial "
              f"{sweep['max_gap_trial']}); {len(sweep['over_limit'])} over "
              f"{stall_watch.LIMIT:g} s; longest GC pause {sweep['longest_gc_pause']:.2f} s; "
              f"load {sweep['load_before']:.1f} -> {sweep['load_after']:.1f}", flush=True)
        for dump in sweep["dumps"]:
            print(dump[:3000], flush=True)
    return {"sweeps": sweeps, "limit_seconds": stall_watch.LIMIT,
            "max_gap": max(s["max_gap"] for s in sweeps),
            "over_limit": sum(len(s["over_limit"]) for s in sweeps),
            "command": "python -m abalone.train -m sweep=search " + " ".join(overrides)}
