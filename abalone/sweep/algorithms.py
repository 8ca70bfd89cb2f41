"""Samplers and pruners from `hydra.sweeper.sampler` and `hydra.sweeper.pruner`: each name is an
Optuna class and the settings it takes (the others are ignored and not logged); samplers are
seeded per worker, and a space or a number of objectives a sampler cannot handle is refused by
setting rather than sampled in part at random."""

from __future__ import annotations

import importlib.util

import optuna
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution

from abalone.config import ConfigError
from abalone.sweep.space import grid_values

class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler whose exhaustion check is left to the sweep loop (n_trials = the grid's size):
    the stock one calls Study.stop(), which only works inside Study.optimize()."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


_GENETIC = ("seed", "population_size", "crossover_prob", "mutation_prob")
# name: (Optuna's class, the settings of hydra.sweeper.sampler it takes, fixed arguments)
SAMPLERS = {
    "tpe": (optuna.samplers.TPESampler, ("seed", "n_startup_trials"),
            {"multivariate": True, "constant_liar": True}),
    "random": (optuna.samplers.RandomSampler, ("seed",), {}),
    "grid": (_GridSampler, ("seed",), {}),
    "gp": (optuna.samplers.GPSampler, ("seed", "n_startup_trials", "deterministic_objective"),
           {}),
    "cmaes": (optuna.samplers.CmaEsSampler,
              ("seed", "n_startup_trials", "sigma0", "restart_strategy"),
              {"warn_independent_sampling": False}),
    "qmc": (optuna.samplers.QMCSampler, ("seed", "qmc_type", "scramble"),
            {"warn_asynchronous_seeding": False}),
    "nsgaii": (optuna.samplers.NSGAIISampler, _GENETIC, {}),
    "nsgaiii": (optuna.samplers.NSGAIIISampler, _GENETIC, {}),
}
PRUNERS = {"median": ("n_startup_trials", "n_warmup_steps"),
           "hyperband": ("min_resource", "reduction_factor"), "none": ()}
# The settings each sampler and pruner uses: what the parent run logs.
SETTINGS_USED = {**{name: settings for name, (_, settings, _) in SAMPLERS.items()}, **PRUNERS}


def _name(conf) -> str:
    return str(getattr(conf.name, "value", conf.name))


def check_sampler(name: str, space: dict[str, BaseDistribution], n_objectives: int) -> None:
    if name in ("cmaes", "qmc"):
        # Both would hand categorical parameters to an independent random sampler, silently.
        categorical = [k for k, d in space.items() if isinstance(d, CategoricalDistribution)]
        if categorical:
            raise ConfigError(f"hydra.sweeper.sampler.name={name} samples only interval() and "
                              f"integer range() parameters; {', '.join(categorical)} "
                              "is categorical: use tpe, gp or nsgaii for it")
    if name == "cmaes" and n_objectives > 1:
        raise ConfigError("hydra.sweeper.sampler.name=cmaes optimises one metric; use "
                          "nsgaii, tpe or gp for a multi-objective sweep")
    if name == "gp":
        require_torch("hydra.sweeper.sampler.name=gp")


def make_sampler(conf, space: dict[str, BaseDistribution], rank: int,
                 n_objectives: int = 1) -> optuna.samplers.BaseSampler:
    """The configured sampler, its seed offset by the worker's rank so workers differ."""
    name = _name(conf)
    check_sampler(name, space, n_objectives)
    sampler, used, fixed = SAMPLERS[name]
    settings = OmegaConf.to_container(OmegaConf.create(conf), enum_to_str=True)
    arguments = {key: settings[key] for key in used}
    if arguments["seed"] is not None:
        arguments["seed"] += rank
    if name == "grid":
        arguments["search_space"] = grid_values(space)
    return sampler(**arguments, **fixed)


def require_torch(setting: str) -> None:
    """Optuna's Gaussian process (gp sampler, terminator) runs on PyTorch, an extra."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{setting} needs PyTorch, which is not installed: "
                          "pip install 'abalone[gp]'")


def make_pruner(conf, epochs: int) -> optuna.pruners.BasePruner:
    name = _name(conf)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=conf.n_startup_trials,
                                           n_warmup_steps=conf.n_warmup_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=conf.min_resource, max_resource=epochs,
                                              reduction_factor=conf.reduction_factor)
    return optuna.pruners.NopPruner()
