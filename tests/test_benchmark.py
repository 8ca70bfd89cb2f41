"""The benchmark's smoke mode (tiny sizes) produces every figure, and so do the sections run only
when named (throughput against the plain Optuna peer, memory); the figures themselves are
measured by running scripts/benchmark.py in full, never asserted as timings here."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow
import pytest
from bench.measure import with_overrides
from bench.overhead import OTHER

from conftest import REPO
from hydra_plugins.abalone_bench.phase_timing_launcher import PARTS



def numbers(tree, path=""):
    """Every leaf of the results, with its path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from numbers(value, f"{path}[{index}]")
    else:
        yield path, tree


@pytest.mark.slow
@pytest.mark.postgres
def test_smoke_benchmark_produces_every_figure(tmp_path, data_file, postgres_url):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--smoke",
                           "--data", str(data_file), "--out", str(tmp_path / "out"),
                           "--postgres-url", postgres_url],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    d, c = results["default_vs_sample"], results["callback"]
    for side in ("sample", "ours"):
        for key in ("fit_seconds", "seconds_per_epoch", "epochs", "test_rmse", "test_mae",
                    "test_r2", "peak_rss_mib"):
            assert isinstance(d[side][key], (int, float)) and d[side][key] > -100, (side, key)
    assert d["ours"]["first_epoch_seconds"] > 0 and d["fit_speedup"] > 0
    assert d["ours"]["first_epoch_seconds_existing_store"] > 0
    assert d["ours_jax"]["fit_seconds"] > 0  # jax is in the dev extra
    assert c["tracked_fit_seconds"] > 0 and c["untracked_fit_seconds"] > 0
    assert c["pairs"] == 1 and len(c["pair_seconds"]) == 1 and len(c["overhead_quartiles"]) == 2
    # Per epoch: loss, mae, val_loss, val_mae, epoch_duration, avg_epoch_duration, learning_rate.
    assert c["sample_style_requests"] == 2 * 7
    overhead = results["overhead"]
    assert set(overhead) == {"sqlite", "server", "sqlite, log_models=all"}
    for store in overhead.values():
        assert store["trials"] == 2 and len(store["per_trial"]) == 2  # the trials after the first
        assert 0 < store["overhead"] < store["wall"] and 0 < store["fit time"] < store["wall"]
        assert store["overhead CPU"] > 0 and store["load_average"] >= 0
        # Every part of a trial, each timed (the phases of abalone/run.py among them).
        assert list(store["parts"]) == list(PARTS)
        for part, seconds in store["parts"].items():
            assert seconds > 0, part
        # Named parts never overlap: in every trial they fit in its overhead.
        assert all(trial[OTHER] > -0.01 for trial in store["per_trial"])
    assert [s["n_jobs"] for s in results["sweeps"]] == [1, 2]
    for sweep in results["sweeps"]:
        assert sweep["wall_seconds"] > 0 and sweep["trials_per_minute"] > 0
        assert 0 <= sweep["pruned_fraction"] <= 1 and sweep["champion_test_rmse"] > 0
    assert set(results["storage"]["seconds_per_trial"]) == {"journal_file", "postgresql"}
    fleet = results["fleet_storage"]
    for kind in ("postgresql", "grpc_proxy"):
        (run,) = fleet[kind]
        assert run["workers"] == 2 and run["trials"] == 4 and run["failed_workers"] == 0, run
        assert 0 < run["trials_per_second"] < run["ideal_trials_per_second"]
        assert run["peak_connections"] >= 1 and run["database_cpu_seconds_per_trial"] > 0
        operations = run["operations"]
        assert set(operations) == {"start", "between_trials", "report"}
        # The sweeper's loop: a trial is a worker's first or follows its previous one; every
        # epoch is reported (sweep=search's pruner waits 8 epochs, the smoke has 3).
        start, between = (operations[k]["calls_per_trial"] for k in ("start", "between_trials"))
        assert start + between == 1 and start <= 2 / 4
        assert operations["report"]["calls_per_trial"] == fleet["epochs"]
        for span in operations.values():
            assert 0 < span["p50_ms"] <= span["p90_ms"] <= span["p99_ms"]
        assert 0 < run["storage_seconds_per_trial"] and run["worker_cpu_seconds_per_trial"] > 0
    assert "proxy_cpu_seconds_per_trial" in fleet["grpc_proxy"][0]
    assert "proxy_cpu_seconds_per_trial" not in fleet["postgresql"][0]
    serving = results["serving"]
    assert serving["ready_seconds"] > 0
    assert [b["rows"] for b in serving["batches"]] == [1, 100, 10_000]
    for batch in serving["batches"]:
        assert batch["requests"] == 3 and batch["rows_per_second"] > 0
        assert 0 < batch["median_ms"] <= batch["p90_ms"]
    assert all(value is not None for key, value in numbers(results)
               if key not in (".settings.postgres_url", ".settings.container_image"))
    met = {t["target"]: t["met"] for t in results["targets"]}
    # default run (4), callback, overhead (2 stores), 2 per sweep, 1 more for n_jobs=2 (#13)
    assert len(met) == 5 + 2 + 2 * 2 + 1
    assert met["50-trial sweep=search within 5 min (n_jobs=1)"].startswith("n/a (2 trials")
    assert met["50-trial sweep=search within 2 min, champion's test RMSE <= 2.10 (n_jobs=2)"
               ].startswith("n/a (2 trials")
    assert {met["per-trial overhead <= 0.5 s (two-epoch trials, sqlite)"]} <= {"yes", "NO"}
    assert {met["our callback adds <= 5% to fit time"]} <= {"yes", "NO"}
    report = (tmp_path / "out" / "benchmark.md").read_text()
    assert "fit speed-up" in report and "| 2 |" in report and "postgresql" in report
    assert "| our callback adds <= 5% to fit time |" in report
    assert "## Serving" in report and "| 10000 |" in report
    assert "| postgresql | 2 |" in report and "| grpc_proxy | 2 |" in report
    assert "## Per-trial overhead" in report and f"| {PARTS[2]} |" in report


def test_sections_set_their_own_overrides_once():
    assert with_overrides({"hydra.sweeper.n_jobs": 1, "trainer.epochs": 2},
                          ["trainer.epochs=5", "+trainer.epochs=7", "model.units=64"]) == [
        "hydra.sweeper.n_jobs=1", "trainer.epochs=2", "model.units=64"]


FIGURE = r"(\d+(?:\.\d+)?)"


@pytest.mark.slow
def test_throughput_and_memory_sections_print_their_figures(tmp_path, data_file):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--sections",
                           "throughput,memory", "--sweep-trials", "2", "--epochs", "2",
                           "--memory-trials", "3", "--sweep-overrides", "trainer.verbose=0",
                           "--data", str(data_file), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    line = re.search(
        rf"throughput, 2 trials of 2 epochs: ours {FIGURE} s \(champion test RMSE {FIGURE}; "
        rf"(\d+) complete, (\d+) pruned, (\d+) failed, (\d+) epochs\), peer {FIGURE} s \(best "
        rf"trial's test RMSE {FIGURE}; (\d+) complete, (\d+) pruned, (\d+) failed, (\d+) "
        rf"epochs\); peer/ours {FIGURE}x, per trained epoch {FIGURE}x; our trials' epochs took "
        rf"{FIGURE} s in all", done.stdout)
    assert line, done.stdout[-3000:]
    ours_wall, ours_rmse, *ours_work = map(float, line.groups()[:6])
    peer_wall, peer_rmse, *peer_work = map(float, line.groups()[6:12])
    assert ours_wall > 0 and peer_wall > 0 and ours_rmse > 0 and peer_rmse > 0
    # Two epochs never reach the pruner's eight warm-up epochs: both sides finish both trials,
    # and each reports both epochs of each trial.
    assert ours_work == [2, 0, 0, 4] and peer_work == [2, 0, 0, 4]
    ratio, per_epoch = float(line.group(13)), float(line.group(14))
    assert ratio == pytest.approx(peer_wall / ours_wall, rel=0.05)
    assert per_epoch == pytest.approx(ratio, rel=0.05)  # the same epochs on both sides
    training = float(line.group(15))
    assert 0 < training < ours_wall  # four epochs' durations, read back from MLflow
    line = re.search(rf"memory, 3 two-epoch trials in one process: RSS {FIGURE} MiB after trial "
                     rf"1, {FIGURE} MiB after trial 3: ([+-]\d+) MiB, ([+-]\d+\.\d+) MiB per "
                     "trial", done.stdout)
    assert line, done.stdout[-3000:]
    first, last, growth, per_trial = map(float, line.groups())
    assert first > 100 and last > 100  # a process with TensorFlow loaded
    assert growth == pytest.approx(last - first, abs=1) and per_trial == pytest.approx(
        growth / 2, abs=0.6)
    results = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert len(results["memory"]["rss_after_each_trial_mib"]) == 3
    assert "trainer.verbose=0" in results["throughput"]["ours"]["command"]
    met = {t["target"]: t["met"] for t in results["targets"]}
    assert all(m.startswith("n/a (") for m in met.values()) and len(met) == 3, met
    report = (tmp_path / "out" / "benchmark.md").read_text()
    assert "## Throughput" in report and "## Memory over a long sweep" in report


@pytest.mark.slow
def test_the_peer_tracks_every_trial_as_a_user_would(tmp_path, data_file):
    """The peer does the tracking it is compared with: a parent run, one nested run per trial
    with its params, every epoch's metrics and its test RMSE."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "peer_optuna.py"),
                           "--data", str(data_file), "--tracking-uri", uri, "--trials", "2",
                           "--epochs", "3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["trials"] == result["complete"] == 2 and result["best_test_rmse"] > 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("peer-optuna")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in trials) == ["0", "1"]
    for run in trials:
        assert len(run.data.params) == 10 and run.data.tags["state"] == "COMPLETE"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mae")] == [0, 1, 2]
        assert run.data.metrics["test_rmse"] > 0
