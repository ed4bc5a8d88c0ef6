"""A Ray Tune logger callback that records each trial as a nested MLflow run under its study's parent run.

It pickles without its client (Ray stores callbacks with the experiment), so a restored search gets a working copy;
a resumed trial continues the run that carries its trial id instead of opening a new one.
"""

from __future__ import annotations

from pathlib import Path

from ray.tune.logger import LoggerCallback

from mlfd.config import to_dict
from mlfd.errors import SpecError
from mlfd.search import SearchPlan
from mlfd.tracking import (TAG_DATASET, TAG_LEVEL, TAG_NODE, TAG_PARENT, TAG_STAGE, TAG_STUDY, TAG_TRIAL,
                           SearchTracking, Tracker, flatten, trial_error)

LOGGED_PREFIXES = ("val/", "train/")


class TrialRuns(LoggerCallback):
    """One MLflow child run per trial: params = the flattened resolved pipeline, metrics every epoch."""

    def __init__(self, uri: str, experiment: str, journal: str, parent_id: str, context: dict, study: str | None,
                 stage: str, experiment_id: str | None = None):
        self.uri, self.experiment, self.journal = uri, experiment, journal
        self.parent_id, self.context, self.study, self.stage = parent_id, context, study, stage
        self.experiment_id = experiment_id
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}
        self._ended: set[str] = set()
        self._last_step: dict[str, int] = {}
        self._node: dict[str, str] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tracker"], state["_runs"], state["_ended"], state["_last_step"] = None, {}, set(), {}
        state["_node"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"experiment_id": None, "_ended": set(), "_last_step": {}, "_node": {}, **state})

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:  # with the experiment id known, no lookup that could fail if the server is away
            self._tracker = Tracker(self.uri, self.experiment, Path(self.journal), experiment_id=self.experiment_id)
        return self._tracker

    def log_trial_start(self, trial) -> None:
        from mlfd.tune.trainable import trial_spec

        if trial.trial_id in self._runs:
            return
        tags = {TAG_PARENT: self.parent_id, TAG_TRIAL: trial.trial_id, TAG_STAGE: self.stage,
                TAG_STUDY: self.study or self.stage}
        try:
            spec = trial_spec(trial.config, self.context)
            params = flatten(to_dict(spec))
            if self.stage in ("students", "joint"):
                tags[TAG_LEVEL] = str(spec.fusion_levels[0])
        except SpecError as e:  # the trial itself fails with this error; it still gets a run that says why
            params = {}
            tags["mlfd.error"] = str(e)[:500]
        if self.study:
            tags[TAG_DATASET] = self.study
        rid = self.tracker.start_run(f"{self.study or self.stage}-{trial.trial_id}", tags,
                                     reuse={TAG_PARENT: self.parent_id, TAG_TRIAL: trial.trial_id})
        self._runs[trial.trial_id] = rid
        self._ended.discard(trial.trial_id)
        # A resumed trial continues its run: epochs it logged before the interruption and reports again (restarted
        # from an older checkpoint, or from scratch) are not logged twice.
        self._last_step[trial.trial_id] = self.tracker.last_step(rid, "epoch")
        self.tracker.log_params(rid, {**params, **{f"sampled.{k}": v for k, v in trial.config.items()}})

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial.trial_id not in self._runs:
            self.log_trial_start(trial)
        self._tag_node(trial.trial_id, result)
        step = int(result.get("training_iteration", iteration))
        if step <= self._last_step.get(trial.trial_id, 0):
            return
        self._last_step[trial.trial_id] = step
        metrics = {k: v for k, v in result.items() if k.startswith(LOGGED_PREFIXES) or k in ("lr", "epoch")}
        self.tracker.log_metrics(self._runs[trial.trial_id], metrics, step=step)

    def _tag_node(self, trial_id: str, result: dict) -> None:
        """Tag the run with the node the trial reports from (again when a retry moved it to another node)."""
        from mlfd.tune.trainable import NODE_KEY

        node = result.get(NODE_KEY)
        if not node or self._node.get(trial_id) == node:
            return
        self._node[trial_id] = node
        rid = self._runs[trial_id]
        for key, value in ((TAG_NODE, node), ("mlfd.node_ip", result.get("node_ip")),
                           ("mlfd.hostname", result.get("hostname"))):
            if value:
                self.tracker.call("set_tag", rid, key, str(value))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial.trial_id not in self._runs:
            self.log_trial_start(trial)
        rid = self._runs[trial.trial_id]
        if failed:
            self.tracker.call("set_tag", rid, "mlfd.error", trial_error(trial)[:5000])
        self.tracker.end_run(rid, "FAILED" if failed else "FINISHED")
        self._ended.add(trial.trial_id)

    def on_experiment_end(self, trials, **info) -> None:
        """Ctrl-C (or a driver error) ends Tune with trials still running: their runs end as KILLED, not RUNNING;
        ``--resume`` sets them back to RUNNING."""
        for trial_id, rid in self._runs.items():
            if trial_id not in self._ended:
                self.tracker.end_run(rid, "KILLED")
                self._ended.add(trial_id)


def study_callbacks(tracking: SearchTracking, plan: SearchPlan, study: str | None, context: dict) -> list:
    """Ray Tune callbacks for a new study (a restored study brings back its pickled callback)."""
    return [TrialRuns(context=context, **tracking.trial_runs_args(plan, study))]
