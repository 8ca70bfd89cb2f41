"""Conditional search spaces for `hydra.sweeper.custom_search_space=abalone.search_spaces:NAME`.

Each function gets the Optuna trial after the sweep's `params` are sampled (`trial.params`),
may sample more with `trial.suggest_*` (recorded like any sampled parameter) and returns the
config overrides those values make.
"""

from __future__ import annotations

import optuna


def optimizer_settings(trial: optuna.Trial) -> dict:
    """The setting that matters for the optimizer drawn: SGD's momentum, AdamW's weight decay
    (Adam gets neither); needs `optimizer` in the sweep's params."""
    optimizer = trial.params["optimizer"]
    if optimizer == "sgd":
        return {"optimizer.momentum": trial.suggest_float("optimizer.momentum", 0.5, 0.95)}
    if optimizer == "adamw":
        return {"optimizer.weight_decay": trial.suggest_float("optimizer.weight_decay", 1e-6,
                                                              1e-3, log=True)}
    return {}
