"""The fault soak (`--sections faults --seed S --minutes M`): real sweeps (`python -m abalone.train
-m`) against a real `mlflow server` behind the fault proxy (bench/faultproxy.py), each under a
random schedule drawn from the seed, for M minutes. After each sweep (and after its resume, when
a fault outlasted it) the invariants (bench/invariants.py) are checked; a breach is printed with
the schedule's seed, which `--sections faults --seed <that seed> --minutes 0` replays as the
first sweep. Process kills (trial, worker, coordinator, server, PostgreSQL) are not in it yet."""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.faultproxy import FaultProxy
from bench.invariants import sweep_breaches
from bench.measure import base_env
from bench.services import start_mlflow_server, stop

N_TRIALS = 2
SWEEP = ["-m", "sweep=quick", "trainer.epochs=3", "trainer.patience=0",
         "hydra.sweeper.pruner.name=none", "hydra.sweeper.sampler.name=random",
         f"hydra.sweeper.n_trials={N_TRIALS}", "tracking=server", "tracking.outage_grace=60"]


def schedule(seed: int) -> dict:
    """Fault rates per request, drawn from `seed`: some sweeps meet mostly lost replies, others
    throttling or cuts."""
    rng = random.Random(seed)
    return {"drop": rng.choice((0.0, 0.02, 0.05)), "reset": rng.choice((0.0, 0.02)),
            "delay": rng.choice((0.0, 0.05)), "503": rng.choice((0.0, 0.02)),
            "429": rng.choice((0.0, 0.02)), "cut": rng.choice((0.0, 0.003))}


def one_sweep(number: int, seed: int, port: int, server_url: str, data: str, root: Path) -> dict:
    import mlflow
    import optuna

    from abalone.sweep.storage import make_storage

    rates = schedule(seed)
    proxy = FaultProxy(port, seed, rates, delay=0.3, cut_seconds=2.0)
    cwd = root / f"sweep-{number}"
    cwd.mkdir()
    names = [f"tracking.experiment=soak-{number}", f"tracking.registered_model=soak-{number}",
             f"hydra.sweeper.study_name=soak-{number}"]
    attempts = []
    try:
        for uri in (proxy.url, server_url):  # a sweep a fault stopped resumes without faults
            done = subprocess.run([sys.executable, "-m", "abalone.train", *SWEEP, *names,
                                   f"tracking.uri={uri}"], cwd=cwd, env=base_env(data),
                                  capture_output=True, text=True, timeout=1800)
            lines = (done.stdout + done.stderr).strip().splitlines() or [""]
            attempts.append((done.returncode, lines[-1]))
            if done.returncode == 0:
                break
    finally:
        proxy.close()
    storage = make_storage(str(cwd / "optuna-studies.journal"))
    study = optuna.load_study(study_name=f"soak-{number}", storage=storage)
    client = mlflow.MlflowClient(tracking_uri=server_url, registry_uri=server_url)
    code, last = attempts[-1]
    breaches = sweep_breaches(client, f"soak-{number}", study, N_TRIALS, f"soak-{number}",
                              exit_code=code, last_line=last)
    if code != 0:
        breaches.append(f"the sweep did not complete even without faults: exit {code}, {last!r}")
    return {"seed": seed, "rates": rates, "injected": dict(proxy.injected),
            "requests": proxy.requests, "attempts": attempts, "breaches": breaches}


def bench_faults(args) -> dict:
    rng = random.Random(args.seed)
    injected: Counter = Counter()
    sweeps, breaches = [], []
    deadline = time.monotonic() + args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="abalone-bench-faults-") as tmp:
        root = Path(tmp)
        url, server = start_mlflow_server(root / "mlflow", "--artifacts-destination",
                                          str(root / "mlflow" / "artifacts"))
        try:
            while not sweeps or time.monotonic() < deadline:
                seed = args.seed if not sweeps else rng.randrange(2 ** 31)
                result = one_sweep(len(sweeps), seed, int(url.rsplit(":", 1)[1]), url,
                                   args.data, root)
                sweeps.append(result)
                injected.update(result["injected"])
                breaches += [f"seed {seed}: {b}" for b in result["breaches"]]
                print(f"  sweep {len(sweeps)} seed {seed}: {result['requests']} requests, "
                      f"faults {dict(result['injected']) or 'none'}, exits "
                      f"{[a[0] for a in result['attempts']]}, breaches "
                      f"{len(result['breaches'])}", flush=True)
        finally:
            stop(server)
    summary = {"seed": args.seed, "minutes": args.minutes, "sweeps_completed": len(sweeps),
               "resumed": sum(len(s["attempts"]) > 1 for s in sweeps),
               "faults_injected": dict(injected), "breaches": breaches, "sweeps": sweeps}
    print(f"faults: {len(sweeps)} sweeps, {summary['resumed']} resumed after a fault stopped "
          f"them; faults injected {dict(injected)}; breaches {len(breaches)}", flush=True)
    for line in breaches:
        print(f"  BREACH {line}", flush=True)
    return summary
