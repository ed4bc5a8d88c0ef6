"""Ray's OptunaSearch, told about failed trials so that TPE steers away from where they failed, and about the job's
constraints so that infeasible trials rank last."""

from __future__ import annotations

from typing import Mapping

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from mlfd.stages.pareto import violations
from mlfd.tune._private import optuna_search_tell, optuna_search_trial

FAILED_ATTR = "mlfd_failed"
"""Set on the Optuna trials of failed Ray trials (diverged, out of memory, crashed for good): as a user attribute
(True) and as a constraint (1.0: infeasible; absent, so feasible, on every other trial)."""


class FailureAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells the sampler about failed trials and about the job's constraints.

    Ray's OptunaSearch tells Optuna a failed trial as FAIL, which TPE ignores: it would keep proposing the region
    where trials diverge or run out of memory. This one sets the constraint :data:`FAILED_ATTR` to 1 on it
    (``optuna.Trial.set_constraint``) and tells it PRUNED: TPE (Optuna >= 5) ranks an infeasible trial below every
    feasible one, so it samples away from there.

    With ``constraints`` (a job's ``{metric: {le|ge: bound}}``), every completed trial gets one constraint value per
    bound from its last result (:func:`mlfd.stages.pareto.violations`, through ``Trial.set_constraint``, Optuna's
    current constraint API: no sampler ``constraints_func``), before its objective values are told.
    """

    def __init__(self, *args, constraints: Mapping[str, Mapping[str, float]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._mlfd_constraints = {m: dict(b) for m, b in (constraints or {}).items()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = optuna_search_trial(self, trial_id)
        if ot_trial is None or not error:
            if ot_trial is not None and result and getattr(self, "_mlfd_constraints", None):
                for key, value in violations(result, self._mlfd_constraints).items():
                    ot_trial.set_constraint(key, value)
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        ot_trial.set_user_attr(FAILED_ATTR, True)
        ot_trial.set_constraint(FAILED_ATTR, 1.0)
        optuna_search_tell(self, trial_id, ot_trial, TrialState.PRUNED)
