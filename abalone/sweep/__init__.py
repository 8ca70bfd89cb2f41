"""Optuna studies behind `-m` sweeps: the plan (`plan`), the loop of trials (`loop`), the
workers' coordinator (`coordinator`), the terminal report and champion (`report`), and the pieces
they use: the search space (`space`), storages (`storage`), samplers and pruners (`algorithms`),
objectives and the Pareto front (`objectives`), and the `n_trials` slots (`slots`).

`n_trials` is the study's total, whoever ran the trials, so a rerun resumes and several processes
or hosts share one total. The Hydra plugin (hydra_plugins/abalone_optuna_sweeper) calls
`run_sweep`.
"""

import warnings

import optuna

# Optuna calls long-stable features "experimental" (samplers' multivariate and constant-liar
# modes, the heartbeat and its retry callback) and warns that a storage's heartbeat is meant for
# Study.optimize, while this package runs it around ask and tell itself (abalone.sweep.slots).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")

from abalone.sweep.loop import run_sweep  # noqa: E402

__all__ = ["run_sweep"]
