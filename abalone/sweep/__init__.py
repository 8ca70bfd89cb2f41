"""Optuna studies behind `-m` sweeps: the plan (`plan`), the loop of trials (`loop`), the
workers' coordinator (`coordinator`), the terminal report and champion (`report`), and the pieces
they use: the search space (`space`), the launchers (`launchers`), samplers (`algorithms`),
objectives and the Pareto front (`objectives`), and the `n_trials` slots (`slots`). The study's
storage, its pruner and the model check are abalone.study's, which a trial's job opens too.

`n_trials` is the study's total, whoever ran the trials, so a rerun resumes and several processes
or hosts share one total. The Hydra plugin (hydra_plugins/abalone_optuna_sweeper) calls
`run_sweep`.
"""

from abalone.sweep.loop import run_sweep

__all__ = ["run_sweep"]
