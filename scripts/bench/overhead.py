"""A sweep trial's overhead, broken down into its parts: `sweep=search` with two-epoch trials
(n_jobs=1, no pruner) in one fresh interpreter per store, each trial run by the launcher
`hydra_plugins.abalone_bench.phase_timing_launcher.PhaseTimingLauncher`, which calls
`abalone.run`'s phases in sequence and times each (and before this package, a table of the
functions the parts call, each replaced by a timed wrapper)."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.measure import base_env, in_fresh_interpreter
from bench.services import start_mlflow_server, stop

OTHER = "other (between the named parts)"


def trial_breakdown(data_path: str, tracking_uri: str, trials: int,
                    overrides: tuple[str, ...] = ()) -> dict:
    """Run the sweep in this interpreter; per trial after the first (which pays the imports):
    its wall time (from the previous trial's end to its own), fit time (first epoch's start to
    last epoch's end, as `total_training_time`), tracing (first epoch minus second, part of fit
    time), its overhead (wall minus fit time; and the CPU seconds of all threads outside fit
    time, steadier than wall seconds on a busy machine) and each part; OTHER is what no part
    names. Medians of them, and every trial's figures."""
    os.environ["ABALONE_DATA"] = data_path
    import abalone.train
    from hydra_plugins.abalone_bench import phase_timing_launcher as launcher

    sys.argv = ["abalone.train", "-m", "sweep=search", f"hydra.sweeper.n_trials={trials}",
                "hydra.sweeper.n_jobs=1", "hydra.sweeper.pruner.name=none", "trainer.epochs=2",
                f"tracking.uri={tracking_uri}", "hydra.sweeper.storage=optuna.journal",
                "hydra.launcher._target_=hydra_plugins.abalone_bench.phase_timing_launcher."
                "PhaseTimingLauncher", *overrides]
    abalone.train.main()
    records = []
    for trial in launcher.TRIALS:
        record = {key: value for key, value in trial.items() if key != "parts"}
        record.update(trial["parts"])
        record["overhead"] = record["wall"] - record["fit time"]
        record[OTHER] = record["overhead"] - sum(trial["parts"].values())
        records.append(record)
    parts = {label: statistics.median(r[label] for r in records) for label in launcher.PARTS}
    summary = {key: statistics.median(r[key] for r in records)
               for key in ("wall", "fit time", "tracing of the first epoch", "overhead",
                           "overhead CPU", OTHER)}
    return {"trials": len(records), "parts": parts, **summary, "per_trial": records,
            "load_average": os.getloadavg()[0]}


def bench_overhead(args) -> dict:
    """Per-trial overhead of two-epoch trials (see `trial_breakdown`), each in a fresh
    interpreter: with the local SQLite store, with an `mlflow server` on 127.0.0.1, and with the
    SQLite store logging every trial's model and plots (`log_models=all`, as before issue #13;
    by default only a trial that is the best so far does)."""
    result = {}
    for name, overrides in (("sqlite", ()), ("sqlite, log_models=all",
                                             ("hydra.sweeper.log_models=all",))):
        with tempfile.TemporaryDirectory(prefix="abalone-bench-overhead-") as tmp:
            result[name], _ = in_fresh_interpreter(
                "overhead:trial_breakdown",
                (args.data, "sqlite:///mlflow.db", args.overhead_trials, overrides),
                Path(tmp), base_env(args.data))
    with tempfile.TemporaryDirectory(prefix="abalone-bench-overhead-") as tmp:
        url, server = start_mlflow_server(Path(tmp) / "server", "--artifacts-destination",
                                          f"{tmp}/server/artifacts")
        try:
            result["server"], _ = in_fresh_interpreter(
                "overhead:trial_breakdown", (args.data, url, args.overhead_trials), Path(tmp),
                base_env(args.data))
        finally:
            stop(server)
    return result
