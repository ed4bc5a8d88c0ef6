"""MLflow tracking: one experiment per job, one parent run per search study (or pipeline run), one child per trial/stage.

The only package that imports mlflow (with :mod:`mlfd.tune.mlflow_callback`). All calls go through one
:class:`MlflowClient` bound to the job's tracking URI (no process-wide state), and every call that fails because the
server went away is kept in a local JSONL journal and retried later, with a warning, so a search never dies because
tracking did.

The package: :mod:`~mlfd.tracking.client` (the client, its journal of failed calls, run tags),
:mod:`~mlfd.tracking.redaction` (credentials kept out of params, tags and logged files),
:mod:`~mlfd.tracking.search` (``mlfd tune``: a parent run per study, the best model),
:mod:`~mlfd.tracking.pipeline` (``mlfd run``: a parent run, a child per stage).
"""

from mlfd.tracking.client import (PENDING_PREFIX, TAG_DATASET, TAG_LEVEL, TAG_NODE, TAG_PARENT, TAG_ROLE, TAG_SEED,
                                  TAG_STAGE, TAG_STUDY, TAG_TRIAL, Tracker, default_uri, flatten)
from mlfd.tracking.pipeline import PipelineTracking
from mlfd.tracking.redaction import redact, redact_text, safe_uri
from mlfd.tracking.search import STATE_FILE, TAG_PARETO, SearchTracking, best_artifact, log_best_model, trial_error

__all__ = ["PENDING_PREFIX", "STATE_FILE", "TAG_DATASET", "TAG_LEVEL", "TAG_NODE", "TAG_PARENT", "TAG_PARETO",
           "TAG_ROLE", "TAG_SEED", "TAG_STAGE", "TAG_STUDY", "TAG_TRIAL", "PipelineTracking", "SearchTracking",
           "Tracker", "best_artifact", "default_uri", "flatten", "log_best_model", "redact", "redact_text", "safe_uri",
           "trial_error"]
