"""One journey for every trial, whatever the launcher: ask (abalone/sweep/loop.py) → the
overrides of its config → launch (abalone/sweep/launchers.py: in this process a batch of one, as
Hydra's own Optuna sweeper runs it; in other processes a batch of jobs) → tell the study how it
ended, and its terminal line.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from abalone.config import ConfigError
from abalone.sweep import launchers, report, slots, space
from abalone.sweep.state import SweepState

log = logging.getLogger(__name__)


def run_batch(sweep: SweepState, trials: list[optuna.Trial]) -> list[str]:
    """Launch the trials' training runs and tell the study how each ended: their states."""
    overrides = [config_overrides(sweep, trial) for trial in trials]
    start = time.monotonic()
    jobs, lost = launchers.launch(sweep, trials, overrides)
    seconds = time.monotonic() - start
    states, queued_again = [], []
    for trial, job in zip(trials, jobs):
        outcome = launchers.job_outcome(sweep, trial, job, lost)
        if outcome.queued_again:
            state, values, note = "FAIL", None, ""
            queued_again.append(trial.number)
        else:
            state, values, note = tell(sweep, trial, outcome.measured, outcome.error)
        report.trial_line(sweep, trial, state, values, outcome.error, seconds, note)
        states.append(state)
    launchers.check_lost(sweep, queued_again, lost)
    return states


def config_overrides(sweep: SweepState, trial: optuna.Trial) -> list[str]:
    """The trial's config: the fixed overrides and its parameters; it is marked this
    process's."""
    slots.mark_owner(trial)
    extra = conditional_overrides(sweep, trial) if sweep.plan.custom_space else {}
    # Parameters the custom function sampled are recorded by Optuna; what it returns is
    # what the trial's config gets.
    swept = {k: v for k, v in trial.params.items() if k in sweep.plan.space}
    return [*sweep.plan.fixed, *space.trial_overrides({**swept, **extra})]


def conditional_overrides(sweep: SweepState, trial: optuna.Trial) -> dict[str, Any]:
    """The custom_search_space function's overrides; it samples more from `trial`."""
    try:
        overrides = sweep.plan.custom_space(trial)
        if not isinstance(overrides, dict):
            raise TypeError(f"it must return a dict of config overrides, not "
                            f"{type(overrides).__name__}")
    except Exception as err:
        sweep.study.tell(trial, state=TrialState.FAIL)
        raise ConfigError(f"hydra.sweeper.custom_search_space="
                          f"{sweep.settings.custom_search_space}: {type(err).__name__}: "
                          f"{err}") from err
    return overrides


def tell(sweep: SweepState, trial: optuna.Trial, measured: dict[str, float] | None,
         error: BaseException | None) -> tuple[str, list[float] | None, str]:
    """Record how the trial ended in the study: (state, its values, a note)."""
    values = [measured[m] for m in sweep.plan.metrics] if measured else None
    if isinstance(error, optuna.TrialPruned):
        sweep.study.tell(trial, state=TrialState.PRUNED)
        return "PRUNED", values, ""
    if error is not None or not values or not all(math.isfinite(v) for v in values):
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
        fault = slots.transport_fault(error)
        if fault:  # its parameters were not judged: run them again (abalone.sweep.slots)
            trial.set_user_attr("transport_fault", fault)
            slots.fail_and_retry(sweep.study, trial)
            return "FAIL", values, f"queued again: {fault}"
        sweep.study.tell(trial, state=TrialState.FAIL)
        return "FAIL", values, ""
    broken = []
    for constraint in sweep.plan.constraints:
        violation = constraint.violation(measured[constraint.name])
        trial.set_constraint(str(constraint), violation)
        if violation > 0:
            broken.append(str(constraint))
    note = f"infeasible: breaks {', '.join(broken)}" if broken else ""
    sweep.study.tell(trial, values if len(values) > 1 else values[0])
    if sweep.plan.constraints and sweep.client and "mlflow_run_id" in trial.user_attrs:
        try:  # after tell: the study holds the trial whatever the server does
            sweep.client.set_tag(trial.user_attrs["mlflow_run_id"], "optuna.feasible",
                                 str(not note).lower())
        except Exception as err:  # noqa: BLE001 - a tag never stops the sweep
            log.warning("could not tag trial %d's run feasible: %s", trial.number, err)
    return "COMPLETE", values, note
