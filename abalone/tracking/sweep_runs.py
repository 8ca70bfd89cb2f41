"""A sweep's own MLflow records: the parent run that nests its trials' runs, the runs of trials
that ended without their process, Optuna's study plots and the Pareto table, and the champion's
registration with the `champion` alias."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import mlflow

from abalone.tracking import once, registry
from abalone.tracking.runs import register

log = logging.getLogger(__name__)


def open_parent_run(client, experiment_id: str, study_name: str, storage: str,
                    params: dict[str, str]) -> str:
    """The sweep's parent run: the study's existing one (resumed), else a new one.

    Processes that start the same sweep at once may each create one; all then agree on the
    oldest and the others delete theirs, so a study keeps one parent run.
    """
    from mlflow.entities import Param

    query = (f"tags.`optuna.study_name` = '{study_name}' and tags.`optuna.storage` = '{storage}'"
             " and tags.`abalone.role` = 'sweep'")

    def oldest():
        runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"])
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

    found = oldest()
    if found is None:
        mine = once.create_run(client, experiment_id, study_name, {
            "optuna.study_name": study_name, "optuna.storage": storage, "abalone.role": "sweep"})
        found = oldest()
        if found.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
    try:  # the creator's params, or a resumed run's that an error kept from them
        if not found.data.params:
            client.log_batch(found.info.run_id,
                             params=[Param(k, v[:6000]) for k, v in params.items()])
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
    except Exception:
        with contextlib.suppress(Exception):  # the server refused: do not leave it RUNNING
            client.set_terminated(found.info.run_id, "FAILED")
        raise
    return found.info.run_id


def end_trial_runs(client, run_ids: list[str]) -> None:
    """End FAILED the runs of trials failed without their process (a dead worker, an outage
    that outlasted the grace), tagged with their Optuna state."""
    for run_id in run_ids:
        client.set_tag(run_id, "optuna.state", "FAIL")
        client.set_terminated(run_id, "FAILED")


def runs_left_running(client, experiment_id: str, study_name: str) -> dict[str, str]:
    """The study's trial runs still RUNNING: Optuna trial number -> run id."""
    runs = client.search_runs([experiment_id], f"tags.`optuna.study_name` = '{study_name}' and "
                              "attributes.status = 'RUNNING'")
    return {run.data.tags["optuna.trial_number"]: run.info.run_id for run in runs
            if "optuna.trial_number" in run.data.tags}


def save_study_plots(study, out_dir: Path, metrics: list[str]) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG
    (of the first metric in a multi-objective study, which adds the Pareto front for two or
    three metrics, infeasible trials greyed); a plot Optuna cannot draw for this study (too few
    trials) is skipped with a log line."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    target = ({"target": lambda t: t.values[0], "target_name": metrics[0]}
              if len(metrics) > 1 else {})
    plots = dict.fromkeys(("plot_optimization_history", "plot_param_importances",
                           "plot_parallel_coordinate"), target)
    if 1 < len(metrics) <= 3:
        plots["plot_pareto_front"] = {
            "target_names": metrics,
            "constraints_func": lambda t: list(t.constraints.values()) or [0.0]}
    for name, options in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(optuna_plots, name)(study, **options)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.info("skipped %s: %s", name, err)
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        path = out_dir / f"{name.removeprefix('plot_')}.png"
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def save_pareto_table(front, metrics: list[str], path: Path) -> Path:
    """The Pareto front's trials: number, MLflow run, values, parameters; one row each."""
    import csv

    keys = sorted({k for t in front for k in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "mlflow_run_id", *metrics, *keys])
        for t in sorted(front, key=lambda t: t.number):
            writer.writerow([t.number, t.user_attrs.get("mlflow_run_id", ""), *t.values,
                             *(t.params.get(k, "") for k in keys)])
    return path


def register_champion(client, name: str, run_id: str, model_uri: str,
                      metrics: dict[str, float], tags: dict[str, str]) -> str:
    """Register the run's model (once) and give it the `champion` alias only if its task's
    primary held-out metric (test_rmse; test_log_loss when classifying; both lower is better)
    beats the current champion's; return what was done and why. A name whose latest version or
    champion is a model of another table (`tags`' target, task and inputs) is refused first
    (registry.RegistryError): versions of other tables are never compared."""
    gate = "test_log_loss" if "test_log_loss" in metrics else "test_rmse"
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not existing:
        registry.check(client, name, {k: tags.get(k) for k in registry.IDENTITY})
    version = existing[0] if existing else register(model_uri, name, run_id, metrics, tags)
    what = f"{name} version {version.version} (run {run_id})"
    what = ("already registered: " if existing else "registered ") + what
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    new = metrics.get(gate, float("inf"))
    if champion is not None and str(champion.version) == str(version.version):
        return f"{what}; it is already the champion"
    if champion is not None:
        old = float(champion.tags.get(gate)
                    or client.get_run(champion.run_id).data.metrics.get(gate, "inf"))
        if not new < old:
            return (f"{what} without the champion alias: its {gate} {new:.4f} does not beat "
                    f"champion version {champion.version} ({old:.4f})")
        reason = f"its {gate} {new:.4f} beats version {champion.version} ({old:.4f})"
    else:
        reason = "there was no champion"
    client.set_registered_model_alias(name, "champion", str(version.version))
    return f"{what} as champion: {reason}"
