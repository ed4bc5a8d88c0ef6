"""The Markdown tables of a pipeline run's results: students vs dataset-specific deltas and the fusion-level ablation.

The Table-2-style comparison itself is :func:`mlfd.stages.results.results_table` (the same table as ``results.md``);
the aggregation over seeds is :func:`mlfd.stages.results.aggregate_results`.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from mlfd.stages.results import ROLE_TITLES, SPLITS, aggregate_results, cell_stat


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells are escaped)."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _finite(x: Any) -> bool:
    """Whether ``x`` is a real, finite number (not None, NaN or inf)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _datasets(df: pd.DataFrame) -> list[str]:
    return [str(d) for d in dict.fromkeys(df["dataset"]) if str(d) != "all"]


def delta_table(df: pd.DataFrame) -> str | None:
    """Student acc@1 minus dataset-specific acc@1, per dataset, level and split (means over seeds).

    A final row per level and split averages the deltas over datasets (the paper's "average improvement").

    Args:
        df: ``results.parquet`` rows.

    Returns:
        A Markdown table, or None when the run has no students or no dataset-specific models.
    """
    agg = aggregate_results(df)
    levels = sorted(set(agg.loc[agg["role"] == "student", "levels"]))
    if not levels or not (agg["role"] == "dataset_specific").any():
        return None
    header = ["Dataset", "Levels", "Split", "Student acc@1", "Dataset-specific acc@1", "Δ acc@1"]
    rows: list[list[str]] = []
    means: dict[tuple[str, str], list[float]] = {}
    for d in _datasets(agg):
        for lv in levels:
            for s in SPLITS:
                st = cell_stat(agg, d, "student", lv, s, "acc1")
                ds = cell_stat(agg, d, "dataset_specific", "-", s, "acc1")
                if not st.n or not ds.n:
                    continue
                delta = st.mean - ds.mean
                means.setdefault((lv, s), []).append(delta)
                rows.append([d, lv, s, st.fmt(), ds.fmt(), f"{delta:+.2f}"])
    if not rows:
        return None
    n_data = len(_datasets(agg))
    if n_data > 1:
        for (lv, s), ds_ in sorted(means.items(), key=lambda t: (t[0][0], SPLITS.index(t[0][1]))):
            rows.append([f"mean of {len(ds_)}", lv, s, "", "", f"{sum(ds_) / len(ds_):+.2f}"])
    return _md_table(header, rows)


def ablation_table(df: pd.DataFrame) -> str | None:
    """The fusion-level ablation (Table 4 style): acc@1 of joint teachers and students per level, per dataset.

    The dataset-specific models are the reference row.

    Args:
        df: ``results.parquet`` rows.

    Returns:
        A Markdown table, or None when the run has no joint teachers.
    """
    agg = aggregate_results(df)
    if not (agg["role"] == "joint_teacher").any():
        return None
    datasets = _datasets(agg)
    header = ["Model", "Levels"] + [f"{d} {s} acc@1" for d in datasets for s in SPLITS]
    rows = []
    for role, lv in _ablation_keys(agg):
        rows.append([ROLE_TITLES.get(role, role), lv] + [cell_stat(agg, d, role, lv, s, "acc1").fmt()
                                                    for d in datasets for s in SPLITS])
    return _md_table(header, rows)


def _ablation_keys(agg: pd.DataFrame) -> list[tuple[str, str]]:
    """(role, levels) rows of the ablation: dataset-specific, joint teachers per level, students per level."""
    keys: list[tuple[str, str]] = []
    if (agg["role"] == "dataset_specific").any():
        keys.append(("dataset_specific", "-"))
    for role in ("joint_teacher", "student"):
        keys += [(role, lv) for lv in sorted(set(agg.loc[agg["role"] == role, "levels"]))]
    return keys
