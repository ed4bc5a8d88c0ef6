"""Ray's OptunaSearch, told about failed trials so that TPE steers away from where they failed."""

from __future__ import annotations

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from mlfd.tune._private import optuna_search_tell, optuna_search_trial

FAILED_ATTR = "mlfd_failed"
"""Set on the Optuna trials of failed Ray trials (diverged, out of memory, crashed for good): as a user attribute
(True) and as a constraint (1.0: infeasible; absent, so feasible, on every other trial)."""


class FailureAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells the sampler about failed trials.

    Ray's OptunaSearch tells Optuna a failed trial as FAIL, which TPE ignores: it would keep proposing the region
    where trials diverge or run out of memory. This one sets the constraint :data:`FAILED_ATTR` to 1 on it
    (``optuna.Trial.set_constraint``) and tells it PRUNED: TPE (Optuna >= 5) ranks an infeasible trial below every
    feasible one, so it samples away from there.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = optuna_search_trial(self, trial_id) if error else None
        if ot_trial is None:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        ot_trial.set_user_attr(FAILED_ATTR, True)
        ot_trial.set_constraint(FAILED_ATTR, 1.0)
        optuna_search_tell(self, trial_id, ot_trial, TrialState.PRUNED)
