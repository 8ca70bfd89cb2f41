"""Hydra sweeper plugin `abalone_optuna`: Optuna studies over Hydra-composed configs.

Hydra finds it in the `hydra_plugins` namespace package; `config` registers the schema under
`hydra/sweeper`, `sweeper` holds the plugin.
"""
