"""The study storage's own cost per trial in one process: a journal file, and PostgreSQL when
given (the calls a trial makes: ask, owner attributes, one report per epoch, tell)."""

from __future__ import annotations

import tempfile
import time


def bench_storage(args) -> dict:
    """Seconds of storage work per trial (ask, owner attributes, one report per epoch, tell)."""
    import optuna

    from abalone.study.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    targets = {"journal_file": None}
    if args.postgres_url:
        targets["postgresql"] = args.postgres_url
    result = {}
    with tempfile.TemporaryDirectory(prefix="abalone-bench-storage-") as tmp:
        for name, url in targets.items():
            storage = make_storage(url or f"{tmp}/bench.journal")
            study = optuna.create_study(study_name=f"bench-{time.time_ns()}", storage=storage)
            space = {"x": optuna.distributions.FloatDistribution(0, 1)}
            start = time.perf_counter()
            for _ in range(args.storage_trials):
                trial = study.ask(space)
                for key in ("host", "pid", "heartbeat"):
                    trial.set_user_attr(key, 1)
                for epoch in range(20):
                    trial.report(float(epoch), epoch)
                study.tell(trial, 1.0)
            result[name] = (time.perf_counter() - start) / args.storage_trials
    return {"seconds_per_trial": result, "reports_per_trial": 20}

