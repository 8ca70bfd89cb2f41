"""What must hold after any sweep, whatever faults it met: one checker for the tests and the soak
(`--sections faults`). `sweep_breaches` returns each breach as a line (empty: all held).

- the study has one parent MLflow run and every trial exactly one run, nested under it;
- no run is left RUNNING;
- every metric of every trial run has each step once (no doubled epoch), epochs 1..n unbroken;
- the best trial's model is registered once (one version for its run) and holds `champion`
  (the model is the sweep's own, so the alias moved once, to it);
- the study's finished trials are `n_trials` (when the sweep exited 0), and no starting point was
  queued twice. The rule for failures: a trial failed by a transport fault (its `transport_fault`
  attribute, abalone.sweep.slots.transport_fault) was queued again and does not count; a trial
  failed by its own training counts towards n_trials, and no trial of the soak fails so, so with
  exit 0 every counted trial must have finished;
- the output folder in S3 of every trial run is complete or absent, never half there: a run of a
  COMPLETE trial has its folder with `_COMPLETE` and every file that manifest lists (sizes
  equal); any other run's folder, if its `_COMPLETE` is there, is whole too (an upload cut short
  leaves no `_COMPLETE`, and readers take it as absent);
- the command's exit code and last line agree (0 and the study's summary; else an `error:` or
  `interrupted:` line).
"""

from __future__ import annotations

from collections import Counter

# What the checks below looked at, by kind, since the process started (the soak reports it).
CHECKED: Counter = Counter()
EPOCH_METRICS = ("loss", "val_loss", "rmse", "val_rmse", "mae", "val_mae", "learning_rate",
                 "epoch_duration")


def run_breaches(client, experiment_id: str) -> tuple[list[str], dict, list]:
    """Breaches among the experiment's runs (one parent, nesting, none RUNNING, steps once);
    returns (breaches, trial runs by trial number, parent runs)."""
    from mlflow.entities import ViewType

    breaches = []
    runs = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=5000)
    parents = [r for r in runs if r.data.tags.get("abalone.role") == "sweep"]
    if len(parents) != 1:
        breaches.append(f"{len(parents)} parent runs (want 1): "
                        f"{[p.info.run_id for p in parents]}")
    parent_ids = {p.info.run_id for p in parents}
    by_number: dict[int, list] = {}
    CHECKED["runs"] += len(runs)
    for run in runs:
        if run.info.status == "RUNNING":
            breaches.append(f"run {run.info.run_id} ({run.info.run_name}) left RUNNING")
        number = run.data.tags.get("optuna.trial_number")
        if number is None:
            continue
        by_number.setdefault(int(number), []).append(run)
        if run.data.tags.get("mlflow.parentRunId") not in parent_ids:
            breaches.append(f"trial {number}'s run {run.info.run_id} is not nested under the "
                            "parent run")
        for key in EPOCH_METRICS:
            CHECKED["metric histories"] += 1
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            doubled = sorted(s for s, n in Counter(steps).items() if n > 1)
            if doubled:
                breaches.append(f"trial {number}: {key} has steps {doubled} more than once")
            if steps and sorted(set(steps)) != list(range(1, max(steps) + 1)):
                breaches.append(f"trial {number}: {key} misses epochs (steps "
                                f"{sorted(set(steps))})")
    for number, found in sorted(by_number.items()):
        if len(found) != 1:
            breaches.append(f"trial {number} has {len(found)} MLflow runs: "
                            f"{[r.info.run_id for r in found]}")
    return breaches, by_number, parents


def s3_breaches(s3, output_uri: str, runs: dict[str, bool]) -> list[str]:
    """Breaches among the output folders at `output_uri` (s3://bucket/prefix) of `runs` (run id
    -> whether its trial is COMPLETE), read through the boto3 client `s3`."""
    import json

    bucket, _, prefix = output_uri[len("s3://"):].partition("/")
    breaches = []
    for run_id, complete in sorted(runs.items()):
        CHECKED["s3 folders"] += 1
        base = "/".join(p for p in (prefix.strip("/"), run_id) if p)
        found = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=f"{base}/"):
            found.update({o["Key"][len(base) + 1:]: o["Size"] for o in page.get("Contents", [])})
        if "_COMPLETE" not in found:
            if complete:
                breaches.append(f"run {run_id} (COMPLETE) has no _COMPLETE in s3://{bucket}/"
                                f"{base}/ ({len(found)} objects there)")
            continue
        listed = json.loads(s3.get_object(Bucket=bucket, Key=f"{base}/_COMPLETE")["Body"]
                            .read())["files"]
        wrong = sorted(k for k, size in listed.items() if found.get(k) != size)
        if wrong or not listed:
            breaches.append(f"s3://{bucket}/{base}/ is half there: _COMPLETE lists "
                            f"{len(listed)} files, missing or of another size: {wrong}")
    return breaches


def sweep_breaches(client, experiment: str, study, n_trials: int | None, model: str | None,
                   starting_points: list[dict] = (), exit_code: int | None = None,
                   last_line: str = "", s3=None, output_uri: str | None = None) -> list[str]:
    """Every breach of the sweep's invariants (see the module's docstring)."""
    from mlflow.exceptions import MlflowException
    from optuna.trial import TrialState

    from abalone.sweep.slots import retried_number

    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [f"no MLflow experiment {experiment!r}"]
    breaches, by_number, _ = run_breaches(client, found.experiment_id)
    trials = study.get_trials(deepcopy=False)
    CHECKED["trials"] += len(trials)
    numbers = [t.number for t in trials]
    if len(set(numbers)) != len(numbers):
        breaches.append(f"duplicate trial numbers: {sorted(numbers)}")
    by_trial = {t.number: t for t in trials}
    for trial in trials:
        # A retry starts with the failed trial's attributes (Optuna's retry callback copies
        # them): its run id is its own only once its run replaced it.
        previous = by_trial.get(retried_number(trial))
        run_id = trial.user_attrs.get("mlflow_run_id")
        own_run = run_id is not None and (previous is None
                                          or previous.user_attrs.get("mlflow_run_id") != run_id)
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and \
                trial.number not in by_number and own_run:
            breaches.append(f"trial {trial.number} ({trial.state.name}) has no MLflow run")
    retried = {retried_number(t) for t in trials}
    for trial in trials:
        if trial.state == TrialState.FAIL and "transport_fault" in trial.user_attrs \
                and trial.number not in retried:
            breaches.append(f"trial {trial.number} failed by a transport fault "
                            f"({trial.user_attrs['transport_fault']}) but was not queued again")
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if exit_code == 0 and n_trials is not None and len(finished) != n_trials:
        errors = [f"trial {t.number}: {t.user_attrs.get('error')}" for t in trials
                  if t.state == TrialState.FAIL]
        breaches.append(f"{len(finished)} finished trials, n_trials={n_trials}; failed: {errors}")
    if n_trials is not None and len(finished) > n_trials:
        breaches.append(f"{len(finished)} finished trials exceed n_trials={n_trials}")
    for point in starting_points:
        # A retried trial (Optuna's `failed_trial` attr) repeats its parameters on purpose.
        queued = [t.number for t in trials if t.system_attrs.get("fixed_params") == point
                  and "failed_trial" not in t.system_attrs]
        if len(queued) > 1:
            breaches.append(f"starting point {point} queued {len(queued)} times: "
                            f"trials {queued}")
    if model and exit_code == 0 and any(t.state == TrialState.COMPLETE for t in trials):
        best_run = study.best_trial.user_attrs.get("mlflow_run_id")
        versions = client.search_model_versions(f"name = '{model}' and run_id = '{best_run}'")
        CHECKED["champions"] += 1
        if len(versions) != 1:
            breaches.append(f"the best trial's run {best_run} has {len(versions)} versions of "
                            f"{model} (want 1)")
        # `model` is the sweep's own (no champion before it): its one move names that version.
        try:
            champion = client.get_model_version_by_alias(model, "champion").version
        except MlflowException:
            champion = None
        if [champion] != [v.version for v in versions]:
            breaches.append(f"{model}'s champion alias names version {champion}, not the best "
                            f"trial's {[v.version for v in versions]}")
    if s3 is not None and output_uri:
        runs = {}
        for trial in trials:
            for run in by_number.get(trial.number, ()):
                runs[run.info.run_id] = trial.state == TrialState.COMPLETE
        breaches += s3_breaches(s3, output_uri, runs)
    if exit_code is not None:
        CHECKED["exits"] += 1
        ok = exit_code == 0
        said = last_line.strip()
        if ok and said.startswith(("error:", "interrupted:")):
            breaches.append(f"exit 0 but the last line says {said!r}")
        if not ok and not said.startswith(("error:", "interrupted:")):
            breaches.append(f"exit {exit_code} but the last line says {said!r}")
    return breaches
