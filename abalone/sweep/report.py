"""What a sweep tells people: a terminal line per trial, the best objective on the parent run,
the top-trials table, and at the end the study's tallies, plots and champion, registered once."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from mlflow.entities import Metric, RunTag
from optuna.trial import FrozenTrial, TrialState

from abalone.config import AbaloneError
from abalone.study.trials import WARM_START_OF, candidates
from abalone.sweep import objectives, slots
from abalone.sweep.lock import study_lock
from abalone.sweep.state import SweepState
from abalone.tracking import sweep_runs, where_to_look
from abalone.tracking.registry import IDENTITY
from abalone.trial import BEST_OBJECTIVE

log = logging.getLogger(__name__)


def value_text(metric: str, value: Any) -> str:
    """A metric's value as the terminal shows it: 4 decimals for val_ metrics."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if metric.startswith("val_") else f"{value:.4g}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best(sweep: SweepState):
    """(the Pareto front of the study's own feasible COMPLETE trials, the champion)."""
    front = objectives.pareto_front(candidates(sweep.study), sweep.plan.directions)
    return front, objectives.champion(front, sweep.plan.directions)


def best_text(plan, front, champion) -> str:
    if champion is None:
        return "best -"
    if len(plan.metrics) > 1:
        return f"Pareto front {len(front)}, champion trial {champion.number}"
    return f"best {champion.values[0]:.4f} (trial {champion.number})"


def duration_text(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: what a person reads at a glance in a log."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_text(trials: list[FrozenTrial], n_trials: int, may_stop_early: bool,
                  n_jobs: int) -> str:
    """`12/50  eta 3m20s`: the trials finished of those that count towards n_trials (a resumed
    study's earlier ones included; `≤50` when a stop rule may end the study sooner) and the time
    left, the remaining trials times the median of the last 10 finished ones, over n_jobs."""
    finished = [t for t in slots.slot_holders(trials) if t.state.is_finished()]
    total = f"{'≤' if may_stop_early else ''}{n_trials}"
    remaining = max(n_trials - len(finished), 0)
    ended = sorted((t for t in finished if t.datetime_start and t.datetime_complete),
                   key=lambda t: t.datetime_complete)[-10:]
    if not remaining or not ended:
        return f"{len(finished)}/{total}"
    typical = statistics.median((t.datetime_complete - t.datetime_start).total_seconds()
                                for t in ended)
    return f"{len(finished)}/{total}  eta {duration_text(remaining * typical / n_jobs)}"


def shown_values(metrics: list[str], state: str, values, frozen: FrozenTrial) -> str:
    """The trial's values; a pruned trial's at the epoch it was stopped."""
    if state == "COMPLETE":
        return "  ".join(f"{m} {value_text(m, v)}" for m, v in zip(metrics, values))
    if state == "PRUNED" and frozen.intermediate_values:
        step = max(frozen.intermediate_values)  # KerasPruningCallback's: the epoch from 0
        return (f"{metrics[0]} {value_text(metrics[0], frozen.intermediate_values[step])} "
                f"at epoch {step + 1}")
    return "  ".join(f"{m} -" for m in metrics)


def trial_line(sweep: SweepState, trial, state: str, values, error, seconds: float, note: str) -> None:
    """The trial's line, and the best objective so far on the parent run."""
    plan = sweep.plan
    front, champion = best(sweep)
    frozen = sweep.study._storage.get_trial(trial._trial_id)
    progress = progress_text(sweep.study.get_trials(deepcopy=False), plan.n_trials,
                             plan.stop_rule != "none", plan.settings.n_jobs)
    reason = (f"  {type(error).__name__}: {error}" + (note and f" ({note})") if state == "FAIL"
              else note and f"  {note}")
    log.info("trial %3d  %-8s  %s  %s  %.1fs  %s%s", trial.number, state,
             shown_values(plan.metrics, state, values, frozen), best_text(plan, front, champion),
             seconds, progress, reason)
    if sweep.client and champion is not None:
        try:
            sweep.client.log_metric(sweep.parent_run_id, BEST_OBJECTIVE, champion.values[0],
                                    step=slots.finished_count(sweep.study))
        except Exception as err:  # noqa: BLE001 - a report never stops the sweep
            log.warning("could not log %s on the parent MLflow run: %s", BEST_OBJECTIVE, err)


def print_table(plan, candidates, front) -> None:
    """The top feasible trials by the first metric; `*` marks the Pareto front."""
    sign = -1 if plan.directions[0] == "maximize" else 1
    top = sorted(candidates, key=lambda t: sign * t.values[0])[:10]
    multi = len(plan.metrics) > 1
    on_front = {t.number for t in front}
    log.info("top trials by %s%s:", plan.metrics[0], " (* on the Pareto front)" * multi)
    log.info("  trial  %s  mlflow run id                     params",
             "  ".join(f"{m:>10}" for m in plan.metrics))
    for trial in top:
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        values = "  ".join(f"{value_text(m, v):>10}" for m, v in zip(plan.metrics, trial.values))
        mark = "*" if multi and trial.number in on_front else " "
        log.info(" %s%5d  %s  %-32s  %s", mark, trial.number, values,
                 trial.user_attrs.get("mlflow_run_id", "-"), params)


def register(sweep: SweepState, champion: FrozenTrial, champion_run) -> None:
    """Register the champion's model, and say so on the terminal and the parent run."""
    plan, client = sweep.plan, sweep.client
    metrics = {k: v for k, v in champion_run.data.metrics.items()
               if k.startswith(("test_", "best_val_"))}
    # Processes of one study that end together each get here: one registers, the next finds
    # the version there.
    with study_lock(sweep.storage, f"{plan.study_name}.registration"):
        message = sweep_runs.register_champion(
            client, sweep.tracking_cfg.registered_model, champion.user_attrs["mlflow_run_id"],
            champion.user_attrs["mlflow_model_uri"], metrics,
            tags={**{k: champion_run.data.tags[k] for k in IDENTITY
                     if k in champion_run.data.tags},
                  "sweep": str(plan.settings.sweep_name), "study": plan.study_name,
                  "trial": str(champion.number),
                  "objective": ", ".join(f"{v:.4g}" for v in champion.values),
                  "objective_metric": plan.metric_label})
    log.info("%s", message)
    client.set_tag(sweep.parent_run_id, "registration", message)


def finish(sweep: SweepState) -> None:
    """Once no process runs trials of the study: its tallies, the top trials, the study's plots
    on the parent run, and the champion registered; the parent run ends FINISHED."""
    plan, study = sweep.plan, sweep.study
    tally = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        if not (trial.user_attrs.get("surplus") or WARM_START_OF in trial.user_attrs):
            tally[trial.state.name] += 1
    stop = study.user_attrs.get(objectives.STOPPED)
    stopped = stop is not None and plan.n_trials <= stop["n_trials"]
    if tally["RUNNING"] or (tally["WAITING"] and not stopped):
        log.info("other processes are still running trials of this study; the last one "
                 "to finish registers the best model")
        return
    log.info("study %r: %d COMPLETE, %d PRUNED, %d FAIL", plan.study_name, tally["COMPLETE"],
             tally["PRUNED"], tally["FAIL"])
    front, champion = best(sweep)
    client, parent = sweep.client, sweep.parent_run_id
    if champion is None:
        if client:
            client.set_terminated(parent, "FAILED")
        feasible = " feasible" if tally["COMPLETE"] else ""
        raise AbaloneError(f"study {plan.study_name!r} has no{feasible} COMPLETE trial; "
                           "nothing to register")
    print_table(plan, candidates(study), front)
    if not client:
        return
    run_id = champion.user_attrs["mlflow_run_id"]
    champion_run = client.get_run(run_id)
    now = int(time.time() * 1000)
    metrics = [Metric(f"trials_{key.lower()}", count, now, 0) for key, count in tally.items()]
    metrics.append(Metric(BEST_OBJECTIVE, champion.values[0], now, slots.finished_count(study)))
    for key in ("test_rmse", "test_log_loss"):  # the task's primary held-out metric
        if key in champion_run.data.metrics:
            metrics.append(Metric(f"best_trial_{key}", champion_run.data.metrics[key], now, 0))
    tags = [RunTag("best.trial_number", str(champion.number)), RunTag("best.run_id", run_id)]
    tags += [RunTag(f"best.params.{k}", str(v)) for k, v in champion.params.items()]
    out_dir = sweep.sweep_dir / "optuna"
    artifacts = sweep_runs.save_study_plots(study, out_dir, plan.metrics)
    if len(plan.metrics) > 1:
        tags.append(RunTag("pareto_front", ", ".join(str(t.number) for t in front)))
        for trial in front:
            client.set_tag(trial.user_attrs["mlflow_run_id"], "optuna.pareto_front", "true")
        artifacts.append(sweep_runs.save_pareto_table(front, plan.metrics,
                                                      out_dir / "pareto_front.csv"))
    client.log_batch(parent, metrics=metrics, tags=tags)
    for path in artifacts:
        client.log_artifact(parent, str(path), artifact_path="optuna")
    if sweep.tracking_cfg.register:
        register(sweep, champion, champion_run)
    client.set_terminated(parent, "FINISHED")
    log.info("look: %s", where_to_look(
        sweep.experiment_id, f"tags.`optuna.study_name` = '{plan.study_name}'"))
