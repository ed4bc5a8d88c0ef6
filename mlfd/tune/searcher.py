"""Ray's OptunaSearch, told about failed trials so that TPE steers away from where they failed."""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState
from ray.tune.search.optuna import OptunaSearch

FAILED_ATTR = "mlfd_failed"
"""Optuna user attribute set on the trials of failed Ray trials (diverged, out of memory, crashed for good)."""


def failed_constraint(trial: FrozenTrial) -> list[float]:
    """Optuna constraint: a failed trial is infeasible, so TPE ranks it below every trial that finished."""
    return [1.0 if trial.user_attrs.get(FAILED_ATTR) else 0.0]


class FailureAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells the sampler about failed trials.

    Ray's OptunaSearch tells Optuna a failed trial as FAIL, which TPE ignores: it would keep proposing the region
    where trials diverge or run out of memory. This one tells it PRUNED and marks it with :data:`FAILED_ATTR`; with
    :func:`failed_constraint` as the sampler's ``constraints_func`` the trial is infeasible, the worst rank TPE has.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr(FAILED_ATTR, True)
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)
