"""A trial's job in another process (hydra/launcher=joblib or submitit_slurm): how the sweep
hands it its trial (`trial_override`: the `ABALONE_TRIAL` environment variable, abalone.trial),
how the job rebuilds the trial's context from the shared study (`open_context`), and how it
records the way it ended on the trial itself (`run_job`), for the sweep to read even when the
launcher loses the job's return value. The entry point runs such a job without importing the
sweep (abalone.sweep.launchers launches them).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from typing import Any, Callable

import optuna
from omegaconf import OmegaConf

from abalone.config import ConfigError
from abalone.study.storage import make_storage
from abalone.study.trials import make_pruner, model_check
from abalone.trial import TRIAL_ENV, TrialContext


def trial_override(fields: dict[str, Any]) -> str:
    """The override that hands a job its trial: URL-safe base64 of JSON, so no quote, comma or
    `${` of a study name can reach Hydra's grammar or OmegaConf's interpolation. A Hydra key
    (`++`: added beside the user's own env_set), so it is in no job folder's name or params."""
    encoded = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()
    return f"++hydra.job.env_set.{TRIAL_ENV}='{encoded}'"


def open_context(encoded: str, epochs: int) -> TrialContext:
    """In the job: its trial, on the study the sweep shares (for each epoch's report and the
    pruner's verdict), and the rule for logging its model. A job stops on its own SIGINT or
    SIGTERM; the sweep's Ctrl-C event cannot reach another process."""
    fields = json.loads(base64.urlsafe_b64decode(encoded))
    storage = make_storage(fields["storage"], fields["storage_password_secret"])
    pruner = (make_pruner(OmegaConf.create(fields["pruner"]), epochs) if fields["prune"]
              else optuna.pruners.NopPruner())
    study = optuna.load_study(study_name=fields["study_name"], storage=storage, pruner=pruner)
    trial = optuna.Trial(study, fields["trial_id"])
    if trial.number != fields["trial_number"]:
        raise ConfigError(f"{TRIAL_ENV} names trial {fields['trial_number']}, but trial id "
                          f"{fields['trial_id']} of study {fields['study_name']} is trial "
                          f"{trial.number}")
    return TrialContext(trial, fields["parent_run_id"], fields["study_name"], fields["metric"],
                        threading.Event(), tuple(fields["measures"]), fields["prune"],
                        logs_model=model_check(study, fields["log_models"] == "all"))


OUTCOME = "outcome"  # the trial's user attribute where its job records how it ended
SLURM_JOB = "slurm_job_id"  # where a SLURM job records its id, for the sweep to see it still runs


def run_job(context: TrialContext, train: Callable[[TrialContext], Any]) -> dict[str, float]:
    """Train the trial and record how it ended on the trial itself, for a sweep whose launcher
    lost the job's return value (one job of a SLURM array cancelled fails the whole batch)."""
    if "SLURM_JOB_ID" in os.environ:  # as squeue and scancel name it: 123_4 in an array
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        context.trial.set_user_attr(SLURM_JOB, "_".join(array) if all(array)
                                    else os.environ["SLURM_JOB_ID"])
    try:
        measured = train(context).measured
    except optuna.TrialPruned:
        context.trial.set_user_attr(OUTCOME, {"state": "PRUNED"})
        raise
    except Exception as err:
        context.trial.set_user_attr(OUTCOME, {"state": "FAIL",
                                              "error": f"{type(err).__name__}: {err}"[:500]})
        raise
    context.trial.set_user_attr(OUTCOME, {"state": "COMPLETE", "measured": measured})
    return measured
