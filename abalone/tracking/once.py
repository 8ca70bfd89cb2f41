"""Creations that happen once however often their reply is lost: an MLflow run and a model
version. MLflow's REST API has no idempotency key, so each creation carries one of ours, a
random id in the tag `abalone.request_id`, set in the create request itself; when the outage
layer reports that a create's reply was lost (`ReplyLost`: the server may have acted), the
creation is looked up by that tag (runs: search_runs; versions: search_model_versions by run,
then the tag) and sent again only if the server holds none. A create the server runs after the
lookup (a reply lost while the request still waited in the server) would make two: the creator
then keeps the one with the smallest id and deletes the others, so both paths converge. A
registration that a signal interrupted deletes its version before the interrupt goes on.
"""

from __future__ import annotations

import logging
import uuid

import mlflow
from mlflow.entities import ViewType

from abalone import interrupts
from abalone.tracking.connection import ReplyLost, TrackingError

log = logging.getLogger(__name__)

REQUEST_TAG = "abalone.request_id"
ATTEMPTS = 5  # creations sent, at most; each lost reply is followed by a lookup


def reply_lost(error: BaseException) -> bool:
    """Whether `error` (MLflow wraps what the request function raises, without a cause) comes
    from a reply lost after the server may have acted."""
    while error is not None:
        if isinstance(error, ReplyLost):
            return True
        error = error.__cause__ or error.__context__
    return False


def _create(send, look_up, what: str):
    """Send a creation until it is answered or found; return (the created thing, whether a reply
    was lost on the way)."""
    lost = False
    for _ in range(ATTEMPTS):
        try:
            return send(), lost
        except Exception as error:  # noqa: BLE001 - MLflow raises MlflowException around ours
            if not reply_lost(error):
                raise
            log.info("the reply to creating %s was lost; looking it up before sending it again",
                     what)
            lost = True
        found = look_up()
        if found:
            return found[0], lost
    raise TrackingError(f"creating {what}: {ATTEMPTS} replies in a row were lost")


def create_run(client: mlflow.MlflowClient, experiment_id: str, run_name: str | None,
               tags: dict[str, str], parent_run_id: str | None = None):
    """A new run, exactly once, with MLflow's context tags (user, source, as mlflow.start_run
    sets them) and `tags`, nested under `parent_run_id` when given."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    request_id = uuid.uuid4().hex
    tags = dict(tags)
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    if run_name:
        tags[MLFLOW_RUN_NAME] = run_name
    tags = {**resolve_tags(tags), REQUEST_TAG: request_id}

    def look_up():
        runs = client.search_runs([experiment_id], f"tags.`{REQUEST_TAG}` = '{request_id}'",
                                  run_view_type=ViewType.ALL)
        return sorted(runs, key=lambda r: r.info.run_id)

    run, lost = _create(lambda: client.create_run(experiment_id, tags=tags, run_name=run_name),
                        look_up, f"run {run_name or ''} in experiment {experiment_id}")
    if lost:
        keep, *extra = look_up() or [run]
        for other in extra:
            client.delete_run(other.info.run_id)
        run = keep
    return run


def register_version(model_uri: str, name: str, run_id: str, tags: dict[str, str]):
    """A new version of registered model `name` for `model_uri`, exactly once, tagged with its
    run and `tags`."""
    request_id = uuid.uuid4().hex
    tags = {**tags, "run_id": run_id, REQUEST_TAG: request_id}
    client = mlflow.MlflowClient()

    def look_up():
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return sorted((v for v in versions if v.tags.get(REQUEST_TAG) == request_id),
                      key=lambda v: int(v.version))

    # A signal waits for the registration's end, which then takes its version back: an
    # interrupted run registers nothing, and no version is left of a run that did not finish.
    with interrupts.deferred():
        version, lost = _create(lambda: mlflow.register_model(model_uri, name, tags=tags),
                                look_up, f"a version of {name} for run {run_id}")
        keep, *extra = (look_up() or [version]) if lost else [version]
        for other in extra:
            client.delete_model_version(name, other.version)
        if interrupts.received():
            for other in look_up():
                client.delete_model_version(name, other.version)
            log.info("interrupted while registering: %s version %s deleted", name, keep.version)
            raise KeyboardInterrupt
    return keep
