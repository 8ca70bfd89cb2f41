"""The `abalone_optuna` Hydra sweeper: one Optuna study, one MLflow parent run, trials run by the
configured launcher. The work is in `abalone.sweep`, imported when a sweep starts, so Hydra's
plugin discovery stays light."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf


class AbaloneOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        from abalone.sweep import run_sweep

        run_sweep(self.settings, arguments, self.config, self.hydra_context, self.launcher)
