"""What every process that runs a study's trials judges them by: copies from another study,
feasibility, the trials that may become the champion, which finished trials log their model, and
the pruner that stops a trial between epochs."""

from __future__ import annotations

from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

# User attribute of a trial copied from another study (warm_start_from): "<study>#<number>".
WARM_START_OF = "warm_start_of"
# hydra.sweeper.pruner's choices and the settings each takes.
PRUNERS = {"median": ("n_startup_trials", "n_warmup_steps"),
           "hyperband": ("min_resource", "reduction_factor"),
           "successive_halving": ("min_resource", "reduction_factor"), "none": ()}


def node_name(conf) -> str:
    """A sampler's or pruner's name, from its config node (an enum in the plugin's schema)."""
    return str(getattr(conf.name, "value", conf.name))


def is_feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that may become the champion: this study's own COMPLETE, feasible trials (copies
    from `warm_start_from` only inform the sampler)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_feasible(t) and WARM_START_OF not in t.user_attrs]


def model_check(study: optuna.Study, every_model: bool) -> Callable[[float], bool]:
    """Whether a finished trial with a value of the first metric logs its model: with every
    model kept, or when it is at least as good as every trial that may become the champion so
    far (`candidates`). Those stay candidates, and the champion is the best of them on the first
    metric (also within a Pareto front), so it always passed this check, also when several
    processes finish trials at once (ties log both)."""
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE

    def logs_model(value: float) -> bool:
        values = [t.values[0] for t in candidates(study)]
        if every_model or not values:
            return True
        return value >= max(values) if maximize else value <= min(values)

    return logs_model


def make_pruner(conf, epochs: int) -> optuna.pruners.BasePruner:
    name = node_name(conf)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=conf.n_startup_trials,
                                           n_warmup_steps=conf.n_warmup_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=conf.min_resource, max_resource=epochs,
                                              reduction_factor=conf.reduction_factor)
    if name == "successive_halving":  # Hyperband's one bracket: ASHA
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=conf.min_resource,
                                                      reduction_factor=conf.reduction_factor)
    return optuna.pruners.NopPruner()
