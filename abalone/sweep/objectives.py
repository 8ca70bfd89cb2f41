"""What a sweep optimises: its metrics and constraints, the Pareto front and the champion, and
the stop rules (feasibility and the model check: abalone.study.trials)."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from abalone.config import ConfigError
from abalone.study.trials import WARM_START_OF, candidates
from abalone.trial import MEASURED

# Study user attribute set when the stop rule ends the study: reason, n_trials, after_trial.
STOPPED = "stopped"
# Classification's per-epoch metrics a sweep maximises (log_loss, rmse, mae: minimised).
HIGHER_IS_BETTER = ("accuracy", "auc", "f1")


@dataclass(frozen=True)
class Constraint:
    """`name <= bound` or `name >= bound` on a measured value."""

    name: str
    bound: float
    at_most: bool

    def violation(self, value: float) -> float:
        """> 0: broken. Stored with Trial.set_constraint, where tpe, gp, nsgaii and nsgaiii
        read it (the other samplers ignore constraints)."""
        return value - self.bound if self.at_most else self.bound - value

    def __str__(self) -> str:
        return f"{self.name} {'<=' if self.at_most else '>='} {self.bound:g}"


def parse_constraints(lines: list[str]) -> list[Constraint]:
    parsed = []
    for i, line in enumerate(lines):
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(<=|>=)\s*(\S+)\s*", str(line))
        try:
            bound = float(match.group(3)) if match else math.nan
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound):
            raise ConfigError(f"hydra.sweeper.constraints[{i}] = {line!r}: write "
                              "'NAME <= NUMBER' or 'NAME >= NUMBER'")
        check_measure(match.group(1), f"hydra.sweeper.constraints[{i}]")
        parsed.append(Constraint(match.group(1), bound, match.group(2) == "<="))
    return parsed


def check_measure(name: str, key: str) -> None:
    """A value a sweep may optimise or constrain: a validation metric or a measured property."""
    if not (str(name).startswith("val_") or name in MEASURED):
        raise ConfigError(f"{key} must be a validation metric (val_...: the test rows never "
                          f"choose a trial) or a measured property ({', '.join(MEASURED)}), "
                          f"got {name!r}")


def stagnation(study: optuna.Study, rule: str, patience: int, since: int,
               directions: list[str]) -> str | None:
    """Why the stop rule ends the study now, or None. Only trials numbered from `since` (after
    an earlier stop) count towards the `patience` trials run before the rule is checked."""
    own = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                              TrialState.PRUNED))
           if WARM_START_OF not in t.user_attrs]
    if sum(1 for t in own if t.number >= since) < patience:
        return None
    if rule == "no_improvement":
        best = champion(pareto_front(candidates(study), directions), directions)
        if best is None:
            return None
        after = sum(1 for t in own if t.number > best.number)
        if after < patience:
            return None
        return (f"no better objective in the {after} trials after trial {best.number} "
                f"(stop.rule=no_improvement, stop.patience={patience})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # optuna.terminator: removal in Optuna 6
        from optuna.terminator import MedianErrorEvaluator, RegretBoundEvaluator, Terminator

        improvement = RegretBoundEvaluator()
        terminator = Terminator(improvement, MedianErrorEvaluator(improvement),
                                min_n_trials=patience)
        if not terminator.should_terminate(study):
            return None
    return (f"Optuna's terminator: the regret bound fell below the noise level after "
            f"{len(own)} trials (stop.rule=terminator)")


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    signs = [1 if d == "minimize" else -1 for d in directions]
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_front(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    return [t for t in trials
            if not any(dominates(o.values, t.values, directions) for o in trials)]


def champion(front: list[FrozenTrial], directions: list[str]) -> FrozenTrial | None:
    """The best trial on the first metric within the Pareto front (for one metric the front is
    the best trial(s)); the lowest number breaks ties."""
    if not front:
        return None
    sign = 1 if directions[0] == "minimize" else -1
    return min(front, key=lambda t: (sign * t.values[0], t.number))
