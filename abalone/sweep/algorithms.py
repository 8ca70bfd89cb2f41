"""Samplers and pruners from `hydra.sweeper.sampler` and `hydra.sweeper.pruner`: each sampler a
config node with `_target_` to its Optuna class and the settings it takes (the others are
ignored and not logged); a sampler is seeded per process of the study, by a rank its storage
hands out, and a space or a number of objectives a sampler cannot handle is refused by setting
rather than sampled in part at random."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from typing import Optional

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution

from abalone.config import ConfigError
from abalone.study.trials import PRUNERS, node_name
from abalone.sweep.lock import study_lock
from abalone.sweep.space import grid_values


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler whose exhaustion check is left to the sweep loop (n_trials = the grid's size):
    the stock one calls Study.stop(), which only works inside Study.optimize()."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


# Each sampler a config node with `_target_` to its Optuna class, as Hydra's own Optuna sweeper
# has them: its fields are the settings of `hydra.sweeper.sampler` it takes (the others are
# ignored and not logged) and the arguments we fix (multivariate, constant-liar TPE: processes
# that ask at once do not all draw the same point).


@dataclass
class TPESamplerNode:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    multivariate: bool = True
    constant_liar: bool = True


@dataclass
class RandomSamplerNode:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class GridSamplerNode:  # its search space is the sweep's, given when it is made
    _target_: str = f"{__name__}._GridSampler"
    seed: Optional[int] = None


@dataclass
class GPSamplerNode:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False


@dataclass
class CmaEsSamplerNode:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 1
    sigma0: Optional[float] = None
    restart_strategy: Optional[str] = None
    warn_independent_sampling: bool = False  # refused instead: check_sampler


@dataclass
class QMCSamplerNode:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: Optional[int] = None
    qmc_type: str = "sobol"
    scramble: bool = True
    warn_asynchronous_seeding: bool = False  # seeded per process: make_sampler


@dataclass
class NSGAIISamplerNode:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: Optional[int] = None
    population_size: int = 50
    crossover_prob: float = 0.9
    mutation_prob: Optional[float] = None


@dataclass
class NSGAIIISamplerNode(NSGAIISamplerNode):
    _target_: str = "optuna.samplers.NSGAIIISampler"


SAMPLERS = {"tpe": TPESamplerNode, "random": RandomSamplerNode, "grid": GridSamplerNode,
            "gp": GPSamplerNode, "cmaes": CmaEsSamplerNode, "qmc": QMCSamplerNode,
            "nsgaii": NSGAIISamplerNode, "nsgaiii": NSGAIIISamplerNode}
# The settings of hydra.sweeper.sampler (and .pruner) each one takes: what the parent run logs.
FIXED = {"_target_", "multivariate", "constant_liar", "warn_independent_sampling",
         "warn_asynchronous_seeding"}
SETTINGS_USED = {**{name: tuple(f.name for f in fields(node) if f.name not in FIXED)
                    for name, node in SAMPLERS.items()}, **PRUNERS}
# The study's system attribute counting the processes that have run it (`process_rank`).
PROCESSES = "abalone.processes"


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


def sampler_node(conf) -> DictConfig:
    """The node of the sampler `conf.name` names, with the settings of `conf` it takes."""
    name = node_name(conf)
    settings = OmegaConf.to_container(OmegaConf.create(conf), enum_to_str=True)
    node = OmegaConf.structured(SAMPLERS[name])
    return OmegaConf.merge(node, {key: settings[key] for key in SETTINGS_USED[name]})


def make_sampler(conf, space: dict[str, BaseDistribution], rank: int,
                 n_objectives: int = 1) -> optuna.samplers.BaseSampler:
    """The configured sampler, its seed offset by the process's rank (`process_rank`) so no two
    processes of a study draw the same sequence; except the grid sampler's: its seed shuffles
    the grid, and a trial's grid id means the same point only under the same shuffle (a rerun
    with another seed ran one point twice and skipped another)."""
    name = node_name(conf)
    check_sampler(name, space, n_objectives)
    node = sampler_node(conf)
    if node.seed is not None and name != "grid":
        node.seed += rank
    extra = {"search_space": grid_values(space)} if name == "grid" else {}
    return instantiate(node, **extra, _convert_="all")


def process_rank(study: optuna.Study) -> int:
    """This process's place among every process that has run the study (0 for the first),
    handed out by the study's storage under its lock: processes started at once, or a rerun,
    each get their own, whatever rank their command line gave."""
    storage = study._storage
    with study_lock(storage, f"{study.study_name}.processes"):
        rank = storage.get_study_system_attrs(study._study_id).get(PROCESSES, 0)
        storage.set_study_system_attr(study._study_id, PROCESSES, rank + 1)
    return rank


def require_torch(setting: str) -> None:
    """Optuna's Gaussian process (gp sampler, terminator) runs on PyTorch, an extra."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{setting} needs PyTorch, which is not installed: "
                          "pip install 'abalone[gp]'")
