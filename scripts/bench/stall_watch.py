"""A Hydra callback that watches each trial of a real sweep from the moment its process asks the
study for it to the moment its job starts (issue #33: a sweep's process once stood still 77 s
there), for the benchmark's sweeps (`bench.stalls`, `bench.throughput`): the sweep command and its
worker processes get `+hydra.callbacks.stall_watch._target_=bench.stall_watch.StallWatch` and
ABALONE_BENCH_WATCH=DIR (scripts/ is on their PYTHONPATH).

Per process, DIR/trials-PID.jsonl gets one line per trial: its number, when the ask began and
ended and when its job started (epoch seconds; the study's `datetime_start` is read afterwards),
and the garbage collector's pauses of 0.1 s or more in that span. Should the span pass
`LIMIT` seconds, `faulthandler` writes the stacks of all the process's threads to DIR/stacks-PID.txt
(again every LIMIT seconds while it lasts): what the process was doing, not a guess. Where
py-spy is installed (`pip install py-spy`, beside this Python or on PATH), a small monitor
process also writes the process's native stacks (C and C++ frames: the garbage collector,
TensorFlow) to DIR/native-PID.txt every LIMIT seconds while a span lasts longer: faulthandler
sees only Python frames.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

ENV = "ABALONE_BENCH_WATCH"
LIMIT = 5.0  # seconds from the ask to the job's start before the stacks are dumped
GC_PAUSE = 0.1  # collections at least this long are recorded


class StallWatch(Callback):
    def __init__(self) -> None:
        self.folder = Path(os.environ[ENV])
        self.folder.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        self.trials = open(self.folder / f"trials-{pid}.jsonl", "a", buffering=1)
        self.stacks = open(self.folder / f"stacks-{pid}.txt", "a", buffering=1)
        self.span: dict = {}
        self.pauses: list[dict] = []
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        seconds = time.perf_counter() - self._gc_start
        if seconds >= GC_PAUSE:
            self.pauses.append({"generation": info.get("generation"), "seconds": seconds,
                                "collected": info.get("collected"), "at": time.time()})

    def on_multirun_start(self, config, **kwargs) -> None:
        import optuna

        py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                             f"{os.environ.get('PATH', '')}")
        if py_spy:  # a daemon of its own: it ends when this process does
            subprocess.Popen([sys.executable, "-c", MONITOR, py_spy, str(os.getpid()),
                              self.stacks.name, str(self.folder / f"native-{os.getpid()}.txt"),
                              str(LIMIT)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)

        asked = optuna.Study.ask
        watch = self

        def ask(study, *args, **kw):
            watch.pauses = []
            watch.span = {"ask_begin": time.time()}
            watch.stacks.write(f"--- armed at {watch.span['ask_begin']:.3f} (ask)\n")
            faulthandler.dump_traceback_later(LIMIT, repeat=True, file=watch.stacks)
            trial = asked(study, *args, **kw)
            watch.span.update(ask_end=time.time(), asked_trial=trial.number)
            return trial

        optuna.Study.ask = ask

    def on_job_start(self, config, **kwargs) -> None:
        faulthandler.cancel_dump_traceback_later()
        now = time.time()
        self.stacks.write(f"--- disarmed at {now:.3f} (trial {config.hydra.job.num}'s job)\n")
        self.trials.write(json.dumps({"pid": os.getpid(), "trial": int(config.hydra.job.num),
                                      **self.span, "job_start": now,
                                      "gc_pauses": self.pauses}) + "\n")
        self.span, self.pauses = {}, []


# The monitor: while the watched process's last span marker is an `armed` line older than LIMIT
# seconds, `py-spy dump --native` every LIMIT seconds.
MONITOR = """
import os, subprocess, sys, time
py_spy, pid, stacks, native, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
last = 0.0
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    with open(stacks, errors="replace") as f:
        marks = [line for line in f if line.startswith("--- ")]
    if marks and marks[-1].startswith("--- armed at "):
        armed = float(marks[-1].split()[3])
        if time.time() - armed > limit and time.time() - last > limit:
            last = time.time()
            dump = subprocess.run([py_spy, "dump", "--native", "--pid", str(pid)],
                                  capture_output=True, text=True)
            with open(native, "a") as out:
                out.write(f"--- {time.time():.3f}, {time.time() - armed:.1f} s after the ask\\n")
                out.write(dump.stdout + dump.stderr)
    time.sleep(1.0)
"""


def read(folder: Path) -> tuple[list[dict], list[str]]:
    """Every process's trial records, and the stack dumps (the text between an `armed` line
    and its `disarmed` line, when there is any)."""
    records = [json.loads(line) for path in sorted(folder.glob("trials-*.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]
    dumps = []
    for path in sorted(folder.glob("stacks-*.txt")):
        block: list[str] = []
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("--- armed"):
                block = [f"{path.name}: {line}"]
            elif line.startswith("--- disarmed"):
                if len(block) > 1:
                    dumps.append("\n".join([*block, line]))
                block = []
            elif block:
                block.append(line)
        if len(block) > 1:  # a dump the process never disarmed
            dumps.append("\n".join(block))
    return records, dumps
