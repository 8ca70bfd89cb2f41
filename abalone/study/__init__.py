"""The Optuna study as every process that runs its trials opens it, the sweeping one and a
trial's job alike (abalone.trial_job): its storage (`storage`, with the journal file `journal`),
and what its trials are judged by (`trials`: feasibility, the model check, the pruner).
"""

import warnings

import optuna

# Optuna calls long-stable features "experimental" (samplers' multivariate and constant-liar
# modes, the heartbeat and its retry callback) and warns that a storage's heartbeat is meant for
# Study.optimize, while abalone.sweep.slots runs it around ask and tell itself. Here, where the
# retry callback is made, so that every process that opens a study filters them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
