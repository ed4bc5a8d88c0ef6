"""The private Ray and Optuna APIs mlfd reads (all in mlfd/tune/_private.py) are still there, and still mean what
they meant, in the installed versions. When an upgrade moves one, this names it."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("ray.tune.search.optuna")

from mlfd.tune._private import check_private_apis, distribution_contains  # noqa: E402


def test_private_apis_are_where_mlfd_reads_them() -> None:
    missing = check_private_apis()
    assert missing == [], "private APIs changed (pin older versions in setup.cfg or update mlfd/tune/_private.py):\n" \
        + "\n".join(missing)


def test_distribution_contains() -> None:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    ints = IntDistribution(1, 4)
    assert [distribution_contains(ints, v) for v in (1, 4, 5, "a")] == [True, True, False, False]
    cats = CategoricalDistribution(["a", None])
    assert [distribution_contains(cats, v) for v in ("a", None, "b")] == [True, True, False]


def test_failed_trial_is_infeasible_without_the_deprecated_constraints_func() -> None:
    """A failed Ray trial becomes a PRUNED Optuna trial with the constraint set (Trial.set_constraint), and building
    and telling the searcher warns nothing (``constraints_func`` is deprecated since Optuna 5)."""
    import optuna

    from mlfd.tune.searcher import FAILED_ATTR, FailureAwareOptunaSearch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        searcher = FailureAwareOptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
                                            metric="m", mode="max", sampler=optuna.samplers.TPESampler(seed=0))
        for t in ("a", "b"):
            searcher.suggest(t)
        searcher.on_trial_complete("a", error=True)
        searcher.on_trial_complete("b", result={"m": 0.5})
    a, b = searcher._ot_study.trials
    assert a.state == optuna.trial.TrialState.PRUNED and a.constraints == {FAILED_ATTR: 1.0}
    assert a.user_attrs == {FAILED_ATTR: True, "ray_trial_id": "a"}  # every trial carries its Ray trial id
    assert b.state == optuna.trial.TrialState.COMPLETE and b.constraints == {} and b.value == 0.5
