"""Ray's OptunaSearch, told about failed trials so that TPE steers away from where they failed, about the job's
constraints so that infeasible trials rank last, and writing every trial it has been told about to the search's
persistent Optuna study (mlfd.tune.study)."""

from __future__ import annotations

import logging
from typing import Mapping

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from mlfd.stages.pareto import violations
from mlfd.tune._private import optuna_search_asked, optuna_search_study, optuna_search_tell, optuna_search_trial
from mlfd.tune.study import RAY_TRIAL_ATTR, StudyRecord

_logger = logging.getLogger(__name__)

FAILED_ATTR = "mlfd_failed"
"""Set on the Optuna trials of failed Ray trials (diverged, out of memory, crashed for good): as a user attribute
(True) and as a constraint (1.0: infeasible; absent, so feasible, on every other trial)."""


class FailureAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells the sampler about failed trials and the job's constraints, and records every trial in
    a persistent study.

    Ray's OptunaSearch tells Optuna a failed trial as FAIL, which TPE ignores: it would keep proposing the region
    where trials diverge or run out of memory. This one sets the constraint :data:`FAILED_ATTR` to 1 on it
    (``optuna.Trial.set_constraint``) and tells it PRUNED: TPE (Optuna >= 5) ranks an infeasible trial below every
    feasible one, so it samples away from there.

    With ``constraints`` (a job's ``{metric: {le|ge: bound}}``), every completed trial gets one constraint value per
    bound from its last result (:func:`mlfd.stages.pareto.violations`, through ``Trial.set_constraint``, Optuna's
    current constraint API: no sampler ``constraints_func``), before its objective values are told.

    Each Optuna trial carries its Ray trial id (user attribute ``ray_trial_id``). With a ``record``, every trial the
    sampler has been told about is also written to that persistent study, once (see :class:`StudyRecord`).
    """

    def __init__(self, *args, constraints: Mapping[str, Mapping[str, float]] | None = None,
                 record: StudyRecord | None = None, **kwargs):
        self._record = record
        self._mlfd_constraints = {m: dict(b) for m, b in (constraints or {}).items()}
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        asked = optuna_search_asked(self, trial_id)
        if asked is not None and RAY_TRIAL_ATTR not in asked.user_attrs:
            asked.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = optuna_search_trial(self, trial_id)
        if ot_trial is None or not error:
            if ot_trial is not None and result and getattr(self, "_mlfd_constraints", None):
                for key, value in violations(result, self._mlfd_constraints).items():
                    ot_trial.set_constraint(key, value)
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            ot_trial.set_user_attr(FAILED_ATTR, True)
            ot_trial.set_constraint(FAILED_ATTR, 1.0)
            optuna_search_tell(self, trial_id, ot_trial, TrialState.PRUNED)
        self.record()

    def record(self) -> int:
        """Write the sampler's finished trials that the persistent study lacks (every one, so a trial whose write
        failed, or that ended before a resume, is written by a later call); returns how many were written."""
        record = getattr(self, "_record", None)  # a searcher pickled before this attribute existed has none
        if record is None:
            return 0
        try:
            return record.add(optuna_search_study(self).get_trials(deepcopy=False))
        except Exception as e:  # noqa: BLE001  (a database away must not stop the search; the next call retries)
            _logger.warning("mlfd tune: could not record trials in the Optuna study %s (%s: %s); the next finished "
                            "trial retries", record.name, type(e).__name__, str(e).splitlines()[0][:200])
            return 0
