"""Optuna parameter importances (fANOVA) of finished trials, for ``mlfd report`` (only mlfd.tune imports Optuna)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlfd.errors import SpecError
from mlfd.tune._private import distribution_contains

MIN_VARYING_PARAMS = 2


def _space_distributions(space_file: str | None) -> tuple[dict[str, Any], str | None]:
    """Optuna distributions of the searched (non-fixed) params of a space file, and a note if it was unusable."""
    if not space_file:
        return {}, None
    if not Path(space_file).is_file():
        return {}, f"space file {space_file} not found; distributions inferred from the observed values"
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from mlfd.tune.spaces import load_space

    try:
        space = load_space(space_file)
    except SpecError as e:
        return {}, f"space file unusable ({e}); distributions inferred from the observed values"
    dists: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "float":
            dists[p.name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.kind == "int":
            dists[p.name] = IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
        elif p.kind == "categorical":
            dists[p.name] = CategoricalDistribution(list(p.choices))
    return dists, None


def _infer_distribution(values: list[Any]) -> Any | None:
    """An Optuna distribution covering the observed values of one param (None if they cannot be represented)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not values:
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        if all(isinstance(v, int) for v in values):
            return IntDistribution(int(min(values)), int(max(values)))
        return FloatDistribution(float(min(values)), float(max(values)))
    if all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
        return CategoricalDistribution(sorted(set(values), key=lambda v: (type(v).__name__, str(v))))
    return None


def _coerce(dist: Any, value: Any) -> Any:
    """An int stored as a float in parquet (NaN elsewhere in the column) back to int for an IntDistribution."""
    from optuna.distributions import IntDistribution

    if isinstance(dist, IntDistribution) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def fanova_importances(values: dict[str, list[Any]], objective: list[float], maximize: bool,
                       space_file: str | None = None) -> tuple[dict[str, float] | None, str]:
    """Optuna parameter importances of finished trials, from an in-memory study rebuilt out of them.

    Distributions come from the job's space file when it is readable, else from the observed values. Only params that
    vary across the trials and are present in all of them are assessed. The evaluator is fANOVA with a fixed seed
    (deterministic; Optuna's default PED-ANOVA needs many more trials than a small search has to say anything).

    Args:
        values: param name -> its value in each trial (None where the trial did not have it).
        objective: The objective value of each trial, in the same order.
        maximize: Whether the search maximized the objective.
        space_file: The job's space YAML, if known.

    Returns:
        (importances sorted high to low, note) or (None, why they were skipped).
    """
    import optuna

    space_dists, note = _space_distributions(space_file)
    dists: dict[str, Any] = {}
    for name, vals in values.items():
        present = [v for v in vals if v is not None]
        if len(present) < len(vals) or len({json.dumps(v, sort_keys=True, default=str) for v in present}) < 2:
            continue  # conditional (absent in some trials) or constant: not assessed
        dist = space_dists.get(name)
        if dist is not None:
            present = [_coerce(dist, v) for v in present]
        if dist is None or not all(distribution_contains(dist, v) for v in present):
            dist = _infer_distribution(present)
        if dist is not None and not dist.single():
            dists[name] = dist
    if len(dists) < MIN_VARYING_PARAMS:
        return None, (f"skipped: {len(dists)} param(s) vary across all {len(objective)} completed trials; "
                      f"importances need at least {MIN_VARYING_PARAMS}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ost = optuna.create_study(direction="maximize" if maximize else "minimize")
    for i, value in enumerate(objective):
        params = {n: _coerce(d, values[n][i]) for n, d in dists.items()}
        ost.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        imp = optuna.importance.get_param_importances(ost, evaluator=evaluator, params=sorted(dists))
    except Exception as e:  # an evaluator that cannot cope with these trials: report why instead of failing
        return None, f"skipped: Optuna could not assess importances ({type(e).__name__}: {e})"
    imp = dict(sorted(((k, float(v)) for k, v in imp.items()), key=lambda t: -t[1]))
    return imp, note or f"from {len(objective)} completed trials, {len(dists)} varying params"
