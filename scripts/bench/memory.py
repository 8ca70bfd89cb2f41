"""Memory over a long sweep (issue #21): one process running N two-epoch trials of
`sweep=search` (n_jobs=1, so every trial runs in the sweeping process) in a fresh folder; the
process's resident memory (VmRSS of /proc/PID/status) is read as each trial's line appears on its
output, i.e. once the trial is recorded. Reports RSS after trial 20 and after trial N, the growth
between them and MiB per trial."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import base_env, with_overrides

# abalone/sweep/report.py's trial_line: "trial  12  COMPLETE  val_rmse ..."
TRIAL_LINE = re.compile(r"\btrial +\d+ +(COMPLETE|PRUNED|FAIL)\b")
REFERENCE_TRIAL = 20  # issue #21: RSS after trial 500 within 100 MiB of RSS after trial 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def bench_memory(args) -> dict:
    trials = args.memory_trials
    command = [sys.executable, "-m", "abalone.train", "-m", "sweep=search",
               *with_overrides({"hydra.sweeper.n_trials": trials, "hydra.sweeper.n_jobs": 1,
                                "trainer.epochs": 2}, args.sweep_overrides)]
    with tempfile.TemporaryDirectory(prefix="abalone-bench-memory-") as tmp:
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=tmp, env=base_env(args.data),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, rss = [], []
        for line in proc.stdout:
            lines.append(line)
            if TRIAL_LINE.search(line):
                rss.append(rss_mib(proc.pid))
        proc.wait()
        wall = time.monotonic() - start
    if proc.returncode != 0 or len(rss) != trials:
        raise RuntimeError(f"{' '.join(command)}: exit {proc.returncode}, {len(rss)} trial lines "
                           f"of {trials}:\n{''.join(lines)[-4000:]}")
    # A quick check with fewer trials compares against the middle trial instead.
    reference = min(REFERENCE_TRIAL, max(1, trials // 2))
    growth = rss[-1] - rss[reference - 1]
    result = {"trials": trials, "reference_trial": reference,
              "rss_at_reference_mib": rss[reference - 1], "rss_at_last_mib": rss[-1],
              "growth_mib": growth, "mib_per_trial": growth / (trials - reference),
              "rss_after_each_trial_mib": rss, "wall_seconds": wall,
              "load_average": os.getloadavg()[0]}
    print(f"memory, {trials} two-epoch trials in one process: RSS {rss[reference - 1]:.0f} MiB "
          f"after trial {reference}, {rss[-1]:.0f} MiB after trial {trials}: "
          f"{growth:+.0f} MiB, {result['mib_per_trial']:+.2f} MiB per trial", flush=True)
    return result
