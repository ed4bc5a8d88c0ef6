"""Multi-objective search results: objectives, constraints, the Pareto front of a study, and picking one of its
trials. Pure pandas/numpy: the one home of these rules for ``mlfd tune`` (the searcher's constraint values, the
``is_pareto`` and ``feasible`` columns of trials.parquet, ``mlfd export --pick``) and ``mlfd report``.

A trial's value of a metric ``m`` in trials.parquet is ``best/<m>``: its best epoch in ``m``'s direction (the job's
mode for an objective; for a metric that only a constraint names, the direction its bound favours: ``le`` min, ``ge``
max). Student costs (``student/params``, ``student/latency_ms``) are the same at every epoch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from mlfd.errors import SpecError

CONSTRAINT_OPS = ("le", "ge")
"""Bounds a job's ``constraints`` may set on a metric: ``le`` (value <= bound), ``ge`` (value >= bound)."""
PICK_OPS = ("<=", ">=", "<", ">")
PICK_HELP = ("pareto:K (the K-th point of the study's Pareto front, 1 = best first objective) or conditions such as "
             "'student/params<=1e6' (joined with ','; ops <=, >=, <, >): the best first objective among the trials "
             "that meet them")


@dataclass(frozen=True)
class Objective:
    """One objective of a search.

    Attributes:
        metric: A reported metric, e.g. ``val/acc1`` or ``student/params``.
        mode: ``max`` or ``min``.
    """

    metric: str
    mode: str

    @property
    def column(self) -> str:
        """Its trials.parquet column."""
        return f"best/{self.metric}"


def objectives(metric: str | Sequence[str], mode: str | Sequence[str]) -> list[Objective]:
    """A job's ``metric`` and ``mode`` (each a string, or lists of one length) as objectives, first = primary."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(metrics) != len(modes):
        raise SpecError(f"mode: {len(metrics)} metrics need {len(metrics)} modes, got {modes}")
    return [Objective(m, d) for m, d in zip(metrics, modes)]


def metric_direction(metric: str, objs: Sequence[Objective], constraints: Mapping[str, Mapping[str, float]]) -> str:
    """``max`` or ``min``: the direction of ``metric``'s ``best/`` column (see the module docstring)."""
    for o in objs:
        if o.metric == metric:
            return o.mode
    bounds = constraints.get(metric) or {}
    return "min" if "le" in bounds else "max"


# --------------------------------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------------------------------


def constraint_name(metric: str, op: str, bound: float) -> str:
    """The Optuna constraint key of one bound, e.g. ``student/params le 2000000``."""
    return f"{metric} {op} {bound:g}"


def violations(values: Mapping[str, Any], constraints: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Optuna constraint values of a trial (``Trial.set_constraint``: <= 0 feasible), one per bound.

    Each is the relative violation ``(value - bound) / |bound|`` for ``le`` and ``(bound - value) / |bound|`` for
    ``ge`` (``|bound|`` 1 when the bound is 0), so that bounds on metrics of different scales (parameters, ms,
    accuracy) weigh alike when the sampler ranks infeasible trials by their summed violation. A missing or NaN value
    counts as violated by 1.

    Args:
        values: Metric name -> value (a trial's result).
        constraints: Metric name -> {op: bound} with op in :data:`CONSTRAINT_OPS`.
    """
    out: dict[str, float] = {}
    for metric, bounds in constraints.items():
        v = values.get(metric)
        for op, bound in bounds.items():
            scale = abs(float(bound)) or 1.0
            if v is None or not _finite(v):
                c = 1.0
            elif op == "le":
                c = (float(v) - float(bound)) / scale
            else:
                c = (float(bound) - float(v)) / scale
            out[constraint_name(metric, op, float(bound))] = c
    return out


def feasible_mask(df: pd.DataFrame, constraints: Mapping[str, Mapping[str, float]]) -> pd.Series:
    """Per row of trials.parquet: whether its ``best/<metric>`` values meet every bound."""
    ok = pd.Series(True, index=df.index)
    for metric, bounds in constraints.items():
        col = f"best/{metric}"
        v = pd.to_numeric(df[col], errors="coerce") if col in df.columns else pd.Series(np.nan, index=df.index)
        for op, bound in bounds.items():
            ok &= (v <= float(bound)) if op == "le" else (v >= float(bound))  # NaN compares False: infeasible
    return ok


# --------------------------------------------------------------------------------------------------------------------
# The front
# --------------------------------------------------------------------------------------------------------------------


def non_dominated(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows of ``values`` (n x k) that no other row dominates.

    Row a dominates row b when a is at least as good in every column and strictly better in one (``max``: larger
    is better). Rows with a NaN are never on the front and dominate nothing. Equal rows are all on the front.
    """
    v = np.asarray(values, dtype=float).reshape(len(values), len(modes))
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    loss = v * sign  # every column minimized
    valid = ~np.isnan(loss).any(axis=1)
    mask = valid.copy()
    idx = np.flatnonzero(valid)
    for i in idx:
        others = loss[idx]
        dominated = (others <= loss[i]).all(axis=1) & (others < loss[i]).any(axis=1)
        mask[i] = not dominated.any()
    return mask


def _pool(df: pd.DataFrame, objs: Sequence[Objective]) -> pd.Series:
    """The trials the front is drawn from: not failed, every objective finite; only those that ran every epoch when
    there are any (as for the best trial: a stopped trial's values come from fewer epochs)."""
    ok = df["status"].astype(str) != "ERROR"
    for o in objs:
        ok &= pd.to_numeric(df[o.column], errors="coerce").map(_finite) if o.column in df.columns else False
    full = ok & (df["status"].astype(str) == "TERMINATED")
    return full if full.any() else ok


def pareto_mask(df: pd.DataFrame, objs: Sequence[Objective],
                constraints: Mapping[str, Mapping[str, float]] | None = None) -> pd.Series:
    """``is_pareto`` of the rows of one study: non-dominated among its feasible pool trials (:func:`_pool`).

    With constraints, only feasible trials can be on the front (infeasible ones rank last, as in Optuna); when no
    trial is feasible the front is empty.
    """
    pool = _pool(df, objs)
    if constraints:
        pool &= feasible_mask(df, constraints)
    out = pd.Series(False, index=df.index)
    if pool.any():
        sub = df[pool]
        values = np.column_stack([pd.to_numeric(sub[o.column], errors="coerce").to_numpy(float) for o in objs])
        out[sub.index] = non_dominated(values, [o.mode for o in objs])
    return out


def front_order(front: pd.DataFrame, objs: Sequence[Objective]) -> pd.DataFrame:
    """The rows of a front in the order ``pareto:K`` counts: best first objective first, ties by the next
    objectives, then by trial_index (creation order)."""
    keys, asc = [], []
    f = front.copy()
    for i, o in enumerate(objs):
        f[f"_k{i}"] = pd.to_numeric(f[o.column], errors="coerce")
        keys.append(f"_k{i}")
        asc.append(o.mode == "min")
    if "trial_index" in f.columns:
        f["_t"] = pd.to_numeric(f["trial_index"], errors="coerce")
        keys.append("_t")
        asc.append(True)
    return f.sort_values(keys, ascending=asc, kind="stable", na_position="last").drop(
        columns=[k for k in keys])


# --------------------------------------------------------------------------------------------------------------------
# --pick
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pick:
    """A parsed ``mlfd export --pick``.

    Attributes:
        pareto: K of ``pareto:K`` (1-based), or None.
        conditions: ``(metric, op, value)`` triples that must all hold (op in :data:`PICK_OPS`).
    """

    pareto: int | None = None
    conditions: tuple[tuple[str, str, float], ...] = ()


_COND = re.compile(r"^\s*([A-Za-z0-9_./-]+?)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


def parse_pick(text: str) -> Pick:
    """Parse ``pareto:K`` or ``METRIC OP NUMBER[, METRIC OP NUMBER...]``.

    Raises:
        SpecError: One line naming what is allowed.
    """
    s = str(text).strip()
    if s.startswith("pareto:"):
        k = s[len("pareto:"):].strip()
        if not (k.isdigit() and int(k) >= 1):
            raise SpecError(f"--pick: pareto:K needs an integer K >= 1, got {text!r}")
        return Pick(pareto=int(k))
    conds = []
    for part in s.split(","):
        m = _COND.match(part)
        value = None
        if m:
            try:
                value = float(m.group(3))
            except ValueError:
                value = None
        if value is None or not math.isfinite(value):
            raise SpecError(f"--pick: cannot read {part.strip()!r}; expected {PICK_HELP}")
        conds.append((m.group(1), m.group(2), value))
    return Pick(conditions=tuple(conds))


def _meets(v: pd.Series, op: str, bound: float) -> pd.Series:
    return {"<=": v <= bound, ">=": v >= bound, "<": v < bound, ">": v > bound}[op]


def pick_row(df: pd.DataFrame, pick: Pick, objs: Sequence[Objective],
             constraints: Mapping[str, Mapping[str, float]] | None = None, study: str = "") -> pd.Series:
    """The trial of one study that ``pick`` names.

    ``pareto:K``: the K-th row of the front in :func:`front_order`. Conditions: among the pool trials (not failed,
    every epoch run when any did) that meet them, feasible ones first, the best first objective.

    Raises:
        SpecError: K beyond the front, a metric trials.parquet does not hold, or no trial meets the conditions.
    """
    where = f"study {study!r}" if study else "the study"
    if pick.pareto is not None:
        mask = df["is_pareto"].astype(bool) if "is_pareto" in df.columns else pareto_mask(df, objs, constraints)
        front = front_order(df[mask], objs)
        if pick.pareto > len(front):
            raise SpecError(f"--pick pareto:{pick.pareto}: the Pareto front of {where} has {len(front)} point(s)")
        return front.iloc[pick.pareto - 1]
    pool = _pool(df, objs[:1])
    for metric, op, bound in pick.conditions:
        col = f"best/{metric}"
        if col not in df.columns:
            have = sorted(c[len("best/"):] for c in df.columns if c.startswith("best/"))
            raise SpecError(f"--pick: {metric}: not a metric of this search; allowed: {', '.join(have)}")
        pool &= _meets(pd.to_numeric(df[col], errors="coerce"), op, bound)
    if not pool.any():
        text = ", ".join(f"{m}{op}{b:g}" for m, op, b in pick.conditions)
        raise SpecError(f"--pick: no trial of {where} meets {text}")
    sub = df[pool].copy()
    sub["_feasible"] = feasible_mask(sub, constraints) if constraints else True
    sub["_v"] = pd.to_numeric(sub[objs[0].column], errors="coerce")
    sub = sub.sort_values(["_feasible", "_v"], ascending=[False, objs[0].mode == "min"], kind="stable")
    return sub.iloc[0].drop(labels=["_feasible", "_v"])


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


__all__ = ["CONSTRAINT_OPS", "Objective", "PICK_HELP", "PICK_OPS", "Pick", "constraint_name", "feasible_mask",
           "front_order", "metric_direction", "non_dominated", "objectives", "parse_pick", "pareto_mask", "pick_row",
           "violations"]
