"""Result rows of a pipeline run and their aggregation over seeds: the one home of the mean ± std (n) that
``results.md`` (:mod:`mlfd.stages.pipeline`) and ``report.md`` (:mod:`mlfd.report`) render. Needs only pandas."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

RESULT_COLUMNS = ["dataset", "role", "levels", "split", "acc1", "acc5", "epochs", "seed"]
"""``results.parquet``: one row per dataset x role x levels x split x run seed (``seed``: the run seed)."""
CURVE_COLUMNS = ["dataset", "role", "levels", "epoch", "metric", "value", "seed"]
ROLE_ORDER = ["dataset_specific", "multi_head", "joint_head", "joint_teacher", "student", "student_own_teacher",
              "student_no_kd"]
ROLE_TITLES = {
    "dataset_specific": "Dataset-specific models",
    "multi_head": "Multi-head model",
    "joint_head": "Joint-head model",
    "joint_teacher": "Joint teacher",
    "student": "Students",
    "student_own_teacher": "Students, own teacher only (control)",
    "student_no_kd": "Students, KD weight 0 (control)",
}
PM = "±"
SPLITS = ("val", "test")


@dataclass(frozen=True)
class Stat:
    """An accuracy over seeds.

    Attributes:
        mean: Mean over seeds (NaN when no value).
        std: Sample standard deviation over seeds (ddof=1); 0 for a single seed.
        n: Number of seeds.
    """

    mean: float
    std: float
    n: int

    def fmt(self) -> str:
        """``62.25`` for one seed, ``62.25 ± 0.31 (n=3)`` for several, ``""`` when missing."""
        if self.n == 0 or not math.isfinite(self.mean):
            return ""
        return f"{self.mean:.2f}" if self.n <= 1 else f"{self.mean:.2f} {PM} {self.std:.2f} (n={self.n})"


def aggregate_results(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each (dataset, role, levels, split).

    Rows of the same seed are averaged first (so duplicates do not count as extra seeds); the std is the sample
    standard deviation (ddof=1) over seeds, 0 when there is one seed.

    Args:
        df: ``results.parquet`` rows (``seed`` is optional; missing means one seed).

    Returns:
        Columns ``dataset, role, levels, split, acc1_mean, acc1_std, acc5_mean, acc5_std, n_seeds``, datasets in
        order of first appearance.
    """
    df = df.copy()
    if "seed" not in df.columns:
        df["seed"] = 0
    keys = ["dataset", "role", "levels", "split"]
    for k in keys:
        df[k] = df[k].astype(str)
    per_seed = df.groupby(keys + ["seed"], sort=False)[["acc1", "acc5"]].mean().reset_index()
    g = per_seed.groupby(keys, sort=False)
    out = g[["acc1", "acc5"]].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["n_seeds"] = g["seed"].nunique()
    out = out.reset_index()
    for c in ("acc1_std", "acc5_std"):
        out[c] = out[c].where(out["n_seeds"] > 1, 0.0).fillna(0.0)
    return out


def cell_stat(agg: pd.DataFrame, dataset: str, role: str, levels: str, split: str, k: str) -> Stat:
    """The aggregated accuracy ``k`` (acc1/acc5) of one cell of :func:`aggregate_results`, or an empty Stat."""
    m = agg[(agg["dataset"] == dataset) & (agg["role"] == role) & (agg["levels"] == levels) & (agg["split"] == split)]
    if not len(m) or not math.isfinite(float(m.iloc[0][f"{k}_mean"])):
        return Stat(float("nan"), float("nan"), 0)
    r = m.iloc[0]
    return Stat(float(r[f"{k}_mean"]), float(r[f"{k}_std"]), int(r["n_seeds"]))


def role_key(role: str, levels: str) -> tuple[int, str]:
    """Sort key of a (role, levels) row: the pipeline's role order, then the level name."""
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), str(levels))


def results_table(df: pd.DataFrame) -> str:
    """A Markdown table shaped like the paper's Table 2: rows = model (and levels), columns = dataset x split x k.

    A cell is the mean over run seeds; with several seeds it reads ``mean ± std (n=k)`` (sample std, ddof=1).
    """
    agg = aggregate_results(df)
    datasets = [str(d) for d in dict.fromkeys(agg["dataset"])]
    header = ["Model", "Levels"] + [f"{d} {s} acc@{k}" for d in datasets for s in SPLITS for k in (1, 5)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for role, lv in sorted({(r, lv) for r, lv in zip(agg["role"], agg["levels"])}, key=lambda t: role_key(*t)):
        cells = [ROLE_TITLES.get(role, role), lv]
        cells += [cell_stat(agg, d, role, lv, s, f"acc{k}").fmt() for d in datasets for s in SPLITS for k in (1, 5)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
