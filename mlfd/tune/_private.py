"""The one place mlfd reads private Ray and Optuna APIs, each behind a small function.

Ray and Optuna do not expose everything a search needs. What is read here is pinned by the version ranges in
``setup.cfg`` and checked by :func:`check_private_apis` (``tests/test_private_apis.py``), which names the API that
moved when an upgrade breaks one.

    Ray Tune    ResultGrid._experiment_analysis.trials   per-trial status (ResultGrid has no public trial list)
    Ray Tune    OptunaSearch._ot_trials / _ot_study /    the Optuna trial of a Ray trial, to tell a failed one as
                _completed_trials                        PRUNED + infeasible instead of FAIL, to tag it with its Ray
                                                         trial id, and to write the sampler's finished trials to the
                                                         persistent study (mlfd.tune.study)
    Optuna      BaseDistribution._contains               whether a value lies in a distribution
    Ray Tune    Tuner._local_tuner.get_run_config()      the callbacks a restored Tuner runs with (Tuner.restore
                                                         takes none; they come back pickled with the experiment)
"""

from __future__ import annotations

from typing import Any


def result_grid_trials(results: Any) -> list:
    """The ``ray.tune.experiment.Trial`` objects of a ``ray.tune.ResultGrid`` (status, error file, config)."""
    return results._experiment_analysis.trials


def optuna_search_trial(searcher: Any, trial_id: str) -> Any | None:
    """The open ``optuna.Trial`` behind Ray trial ``trial_id`` of an ``OptunaSearch`` (None if not known, or told)."""
    if trial_id not in searcher._ot_trials or trial_id in searcher._completed_trials:
        return None
    return searcher._ot_trials[trial_id]


def optuna_search_asked(searcher: Any, trial_id: str) -> Any | None:
    """The ``optuna.Trial`` an ``OptunaSearch`` asked for Ray trial ``trial_id`` (told or not; None if never asked)."""
    return searcher._ot_trials.get(trial_id)


def optuna_search_study(searcher: Any) -> Any:
    """The ``optuna.Study`` an ``OptunaSearch`` samples from."""
    return searcher._ot_study


def optuna_search_tell(searcher: Any, trial_id: str, ot_trial: Any, state: Any) -> None:
    """Tell the ``OptunaSearch``'s study that ``ot_trial`` ended in ``state``, and mark the Ray trial as told."""
    searcher._ot_study.tell(ot_trial, None, state=state)
    searcher._completed_trials.add(trial_id)


def distribution_contains(dist: Any, value: Any) -> bool:
    """Whether an Optuna distribution holds ``value`` (False for a value of the wrong type)."""
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except Exception:  # noqa: BLE001  (wrong type for the distribution: Optuna raises ValueError or TypeError)
        return False


def tuner_callbacks(tuner: Any) -> list | None:
    """The (mutable) callback list a ``ray.tune.Tuner`` will run with; None under Ray Client (a remote tuner)."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None:
        return None
    config = local.get_run_config()
    if config.callbacks is None:
        config.callbacks = []
    return config.callbacks


def check_private_apis() -> list[str]:
    """The private APIs above that the installed Ray and Optuna no longer have, as ``"<owner>.<name>: <why>"``.

    Builds a real (tiny) OptunaSearch and Optuna distribution; inspects ResultGrid's constructor. Empty when all is
    as this module expects.
    """
    import inspect

    import optuna
    from optuna.distributions import FloatDistribution
    from ray.tune import ResultGrid
    from ray.tune.search.optuna import OptunaSearch

    missing = []
    if "experiment_analysis" not in inspect.signature(ResultGrid.__init__).parameters:
        missing.append("ray.tune.ResultGrid._experiment_analysis: ResultGrid is no longer built from an "
                       "ExperimentAnalysis")
    elif "_experiment_analysis" not in inspect.getsource(ResultGrid.__init__):
        missing.append("ray.tune.ResultGrid._experiment_analysis: attribute not set by ResultGrid.__init__")
    searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="m", mode="max",
                            sampler=optuna.samplers.RandomSampler(seed=0))
    searcher.suggest("t0")
    for name, kind in (("_ot_trials", dict), ("_ot_study", optuna.Study), ("_completed_trials", set)):
        if not isinstance(getattr(searcher, name, None), kind):
            missing.append(f"ray.tune.search.optuna.OptunaSearch.{name}: expected a {kind.__name__}")
    if not missing and not isinstance(optuna_search_trial(searcher, "t0"), optuna.Trial):
        missing.append("ray.tune.search.optuna.OptunaSearch._ot_trials: does not map a trial id to an optuna.Trial")
    from ray.tune import Tuner
    from ray.tune.impl.tuner_internal import TunerInternal

    if "self._local_tuner = " not in inspect.getsource(Tuner.__init__):
        missing.append("ray.tune.Tuner._local_tuner: attribute not set by Tuner.__init__")
    if not callable(getattr(TunerInternal, "get_run_config", None)):
        missing.append("ray.tune.impl.tuner_internal.TunerInternal.get_run_config: gone")
    dist = FloatDistribution(0.0, 1.0)
    if not callable(getattr(dist, "_contains", None)):
        missing.append("optuna.distributions.BaseDistribution._contains: gone")
    elif not (distribution_contains(dist, 0.5) and not distribution_contains(dist, 2.0)):
        missing.append("optuna.distributions.BaseDistribution._contains: answers differently")
    return missing
