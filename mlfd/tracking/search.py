"""``mlfd tune`` tracking: a parent run per search study (found again on ``--resume`` through ``OUT/tracking.json``),
the job's redacted input files, and under each parent the study's best trial with its test metrics and a loadable
model. The child run per trial is :mod:`mlfd.tune.mlflow_callback` (a Ray Tune logger callback)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from mlfd.config import to_dict
from mlfd.search import SearchPlan
from mlfd.tracking.client import PENDING_PREFIX, TAG_STAGE, TAG_STUDY, Tracker, _transient, flatten, git_commit
from mlfd.tracking.redaction import redact_text

_logger = logging.getLogger(__name__)

STATE_FILE = "tracking.json"


def _load_state(out: Path) -> dict:
    f = Path(out) / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_state(out: Path, state: dict) -> None:
    from mlfd.store import atomic_write_text

    atomic_write_text(Path(out) / STATE_FILE, json.dumps(state, indent=1))


def trial_error(trial) -> str:
    """The last line of a failed Ray trial's error file (the exception), or its error message."""
    try:
        path = getattr(trial, "error_file", None)
        if path and os.path.isfile(path):
            text = Path(path).read_text().strip().splitlines()
            return text[-1] if text else "failed"
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "failed")


class SearchTracking:
    """The hooks ``mlfd.tune.launch.run_search`` calls: a parent run per study, trial runs, the best student."""

    def __init__(self, out: Path, register: str | None = None):
        self.out = Path(out)
        self.register = register
        self.tracker: Tracker | None = None
        self.parents: dict[str, str] = {}

    def open(self, plan: SearchPlan) -> None:
        """Check the tracking server and open the experiment (before the output directory is claimed)."""
        Tracker.check_reachable(plan.tracking_uri)
        self.out.mkdir(parents=True, exist_ok=True)  # the default SQLite database lives there
        self.tracker = Tracker(plan.tracking_uri, plan.job.name, self.out / "mlflow_pending.jsonl")

    def parent(self, plan: SearchPlan, study: str | None) -> str:
        """The study's parent run: created once, found again on --resume (its id is kept in OUT/tracking.json)."""
        key = plan.study_key(study)
        state = _load_state(self.out)
        rid = state.get("parents", {}).get(key)
        t = self.tracker
        if rid is not None:
            t.call("update_run", rid, status="RUNNING")
        else:
            tags = {TAG_STUDY: key, TAG_STAGE: plan.job.stage, "mlfd.job_file": plan.job_file}
            commit = git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = commit
            rid = t.start_run(f"search-{key}", tags)
            t.log_params(rid, {f"job.{k}": v for k, v in flatten(to_dict(plan.job)).items()})
            from mlfd.store import atomic_write_text

            for f in (plan.job_file, plan.space_file, plan.pipeline_file):
                # Logged as redacted copies: a job file may hold a tracking URI with user:password@.
                copy = self.out / "inputs" / Path(f).name
                atomic_write_text(copy, redact_text(Path(f).read_text()))
                t.log_artifact(rid, copy, "inputs")
            state.setdefault("parents", {})[key] = rid
            _save_state(self.out, state)
        self.parents[key] = rid
        return rid

    def trial_runs_args(self, plan: SearchPlan, study: str | None) -> dict:
        """Keyword arguments of ``mlfd.tune.mlflow_callback.TrialRuns`` for a new study: where its trials' runs go."""
        parent = self.parent(plan, study)
        return {"uri": self.tracker.uri, "experiment": self.tracker.experiment_name,
                "journal": str(self.tracker.journal), "parent_id": parent, "study": study,
                "stage": plan.job.stage, "experiment_id": self.tracker.experiment_id}

    def interrupted(self, status: str = "KILLED") -> None:
        """End the open parent runs (Ctrl-C: KILLED, an error: FAILED); never masks the exception on its way."""
        for key, rid in self.parents.items():
            if key in _load_state(self.out).get("finished", []):
                continue
            try:
                self.tracker.end_run(rid, status)
            except Exception as e:  # noqa: BLE001
                _logger.warning("could not mark the MLflow run of study %r %s: %s", key, status, e)

    def close(self) -> None:
        """At the end of a search: replay what waits in the journal (waiting up to DRAIN_S for the server); say
        where the rest is kept if the server is still away."""
        if self.tracker is None:
            return
        left = self.tracker.drain()
        if left:
            _logger.warning("%d MLflow calls are still in %s; the next mlfd tune --resume --out %s replays them", left,
                            self.tracker.journal, self.out)

    def finish_study(self, plan: SearchPlan, study: str | None, best_yaml: Path | None) -> None:
        """Log the study's best trial under the parent: test metrics, weights, a loadable model, the YAML."""
        key = plan.study_key(study)
        rid = self.parents[key]
        t = self.tracker
        state = _load_state(self.out)
        if key in state.get("finished", []):  # a resumed search passes finished studies again: log them once
            t.end_run(rid, "FINISHED")
            return
        if best_yaml is not None and best_yaml.is_file():
            t.log_artifact(rid, best_yaml, "best")
            art = best_artifact(plan, best_yaml, study)
            if art is not None:
                try:
                    # The model goes through MLflow's own client, not the journal: only once the journal is empty
                    # (calls in order) and the parent run exists on the server.
                    if t.drain() or t.resolve_id(rid).startswith(PENDING_PREFIX):
                        raise ConnectionError("earlier tracking calls are still waiting in the journal")
                    log_best_model(t, t.resolve_id(rid), best_yaml, art, study, self.register)
                except Exception as e:  # noqa: BLE001 - the search is done; a model upload must not undo it
                    if not _transient(e):
                        raise
                    warnings.warn(f"MLflow unreachable: the best model of study {key!r} was not logged ({e})",
                                  RuntimeWarning, stacklevel=2)
                    _logger.warning("MLflow unreachable; the best model of study %r was not logged (its weights are in "
                                    "%s)", key, art.path)
        trials = self.out / "trials.parquet"
        if trials.is_file():
            t.log_artifact(rid, trials)
        t.end_run(rid, "FINISHED")
        state.setdefault("finished", []).append(key)
        _save_state(self.out, state)


def best_artifact(plan: SearchPlan, best_yaml: Path, study: str | None):
    """The stored artifact of the exported best trial (students and teachers: its trained model)."""
    from mlfd.config import load_pipeline
    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore

    stage = plan.job.stage
    if stage not in ("students", "teachers"):
        return None
    ctx = Context(spec=load_pipeline(best_yaml), store=ArtifactStore(plan.store), progress=False)
    return StageTrial(ctx, stage, study).artifact()


def log_best_model(t: Tracker, run_id: str, best_yaml: Path, art, study: str, register: str | None) -> None:
    """State dict, an MLflow PyTorch model with an input example, and test metrics (evaluated once, at build)."""
    import mlflow
    import numpy as np

    from mlfd.config import load_pipeline
    from mlfd.data import load_dataset
    from mlfd.models import create_model
    from mlfd.stages.common import read_metrics
    from mlfd.store import load_torch

    spec = load_pipeline(best_yaml)
    ds = spec.dataset(study)
    data = load_dataset(ds)
    model_spec = ds.student_net if art.kind == "student" else ds.model
    metrics = read_metrics(art)
    t.log_metrics(run_id, {f"test/{k}": v for k, v in metrics["test"].items()}, step=0)
    t.log_metrics(run_id, {f"best/val/{k}": v for k, v in metrics["val"].items()}, step=0)
    t.log_artifact(run_id, art.file("model.pt"), "best")
    net = create_model(type(model_spec)(**{**to_dict(model_spec), "checkpoint": None, "pretrained": False}),
                       data.num_classes)
    net.load_state_dict(load_torch(art.file("model.pt")))
    net.eval()
    # The model takes normalized [B, 3, S, S] float input (see the dataset's mean/std in the logged YAML). MLflow 3
    # saves it with torch.export, which traces the example: a batch of 1 would specialize the batch dimension to 1
    # (the loaded model then refuses any other batch size), so the example holds 2 images.
    example = np.zeros((2, 3, model_spec.input_size, model_spec.input_size), dtype=np.float32)
    prev = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(t.uri)
        with mlflow.start_run(run_id=run_id, experiment_id=t.experiment_id):
            # Explicit requirements: inferring them reloads the model in a subprocess (20+ s per study on a CPU),
            # and the exported graph needs only torch.
            info = mlflow.pytorch.log_model(net, name="student" if art.kind == "student" else "teacher",
                                            input_example=example,
                                            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                                            registered_model_name=register)
            mlflow.set_tag("mlfd.best_model_uri", info.model_uri)
            mlflow.log_dict({"mean": list(data.mean), "std": list(data.std), "input_size": model_spec.input_size,
                             "classes": data.classes}, "best/preprocessing.json")
    finally:
        mlflow.set_tracking_uri(prev)
