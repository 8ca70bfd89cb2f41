"""The cost of our MLflow callback: the default run's training untracked and tracked against a
real `mlflow server`, alternating in one interpreter; and the sample's one request per metric
against the same server, for contrast."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.measure import REPO, base_env, in_fresh_interpreter
from bench.sample import sample_run
from bench.services import start_mlflow_server, stop


def bench_callback(args) -> dict:
    """Our callback's cost: the default run's training, untracked and with our MlflowLogger
    against a real server, alternating in one fresh interpreter (see `callback_pairs`); and the
    sample's one-request-per-metric logging against the same server, for contrast."""
    with tempfile.TemporaryDirectory(prefix="abalone-bench-server-") as root:
        url, server = start_mlflow_server(Path(root), "--artifacts-destination",
                                          f"{root}/artifacts")
        try:
            pairs, _ = in_fresh_interpreter(
                "callback:callback_pairs",
                (args.data, url, args.callback_epochs, args.callback_pairs), REPO,
                base_env(args.data))
            sample_off = sample_run(args.data, args.callback_epochs)
            sample_on = sample_run(args.data, args.callback_epochs, tracking_uri=url)
        finally:
            stop(server)
    ratios = [on / off - 1 for off, on in pairs]
    return {"epochs": args.callback_epochs, "pairs": len(pairs), "pair_seconds": pairs,
            "untracked_fit_seconds": statistics.median(p[0] for p in pairs),
            "tracked_fit_seconds": statistics.median(p[1] for p in pairs),
            "overhead_fraction": statistics.median(ratios),
            "overhead_quartiles": [min(ratios), max(ratios)] if len(ratios) < 2 else
            statistics.quantiles(ratios, n=4)[::2],
            "sample_style_untracked_fit_seconds": sample_off["fit_seconds"],
            "sample_style_tracked_fit_seconds": sample_on["fit_seconds"],
            "sample_style_requests": sample_on["metric_requests"],
            "sample_style_overhead_fraction":
                sample_on["fit_seconds"] / sample_off["fit_seconds"] - 1}


def callback_pairs(data_path: str, url: str, epochs: int, pairs: int) -> list[tuple[float, float]]:
    """(untracked, tracked) model.fit seconds of the default run's model and data, `pairs` times.

    Built as `python -m abalone.train` builds them (same config, model, tf.data input; tracked:
    a new run and our MlflowLogger with a real MlflowClient), but in one interpreter, alternating
    which of a pair goes first: a fresh process per fit adds more noise than the callback costs.
    A first pair warms the interpreter and is not counted.
    """
    import mlflow
    from hydra import compose, initialize_config_dir

    from abalone import data, dataset
    from abalone.callbacks import MlflowLogger
    from abalone.keras_setup import import_keras
    from abalone.run import build_model
    from abalone.train import CONF_DIR

    keras = import_keras()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer.epochs={epochs}", "trainer.patience=0",
                                           f"data.path={data_path}"])
    ds = dataset.load(cfg.data)
    train = (ds.inputs(ds.splits.train, "train"), ds.targets(ds.splits.train))
    val = (ds.inputs(ds.splits.val, "val"), ds.targets(ds.splits.val))
    client = mlflow.MlflowClient(tracking_uri=url)
    experiment_id = client.create_experiment(f"benchmark-callback-{time.time_ns()}")

    def fit_seconds(tracked: bool) -> float:
        keras.utils.set_random_seed(cfg.trainer.seed)
        model = build_model(cfg, ds, keras)
        callbacks = [keras.callbacks.TerminateOnNaN()]
        if tracked:
            run_id = client.create_run(experiment_id).info.run_id
            callbacks.append(MlflowLogger(client, run_id))
        start = time.perf_counter()
        model.fit(**data.fit_arguments(train, val, cfg.trainer.batch_size, cfg.trainer.seed,
                                       keras.backend.backend()),
                  epochs=epochs, verbose=0, callbacks=callbacks)
        seconds = time.perf_counter() - start
        if tracked:
            client.set_terminated(run_id)
        return seconds

    results = []
    for i in range(pairs + 1):
        first = i % 2 == 0
        a, b = fit_seconds(first), fit_seconds(not first)
        if i:
            results.append((b, a) if first else (a, b))
    return results

