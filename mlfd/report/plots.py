"""PNG plots of a report: the fusion-level ablation, accuracy per epoch, and per-study search history and importances.

Plots use matplotlib's Agg renderer through :class:`matplotlib.figure.Figure` (no pyplot, no global backend state);
matplotlib is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pandas as pd

from mlfd.report.search import SearchInfo, order_trials, pareto_flags
from mlfd.report.tables import _ablation_keys, _datasets, _finite
from mlfd.stages.pareto import front_order
from mlfd.stages.results import SPLITS, aggregate_results, cell_stat
from mlfd.store import atomic_write_bytes

CURVE_METRIC = "val/acc1"
DPI = 110


def _save_figure(fig: Any, path: Path) -> Path:
    """Render a matplotlib Figure to PNG and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _figure(width: float, height: float) -> Any:
    """A pyplot-free matplotlib Figure (rendered by Agg on save)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------------------------------------------------
# Pipeline results
# --------------------------------------------------------------------------------------------------------------------


def _level_colors(levels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {lv: cmap(i % 10) for i, lv in enumerate(levels)}


def plot_ablation(df: pd.DataFrame, path: Path) -> Path | None:
    """Grouped bars of acc@1 per dataset: dataset-specific, joint teacher per level, student per level.

    One panel per split present; error bars are the std over seeds when several seeds exist.

    Args:
        df: ``results.parquet`` rows.
        path: Destination PNG.

    Returns:
        ``path``, or None when there is nothing to plot (no joint teachers).
    """
    agg = aggregate_results(df)
    if not (agg["role"] == "joint_teacher").any():
        return None
    keys = _ablation_keys(agg)
    datasets = _datasets(agg)
    splits = [s for s in SPLITS if (agg["split"] == s).any()]
    levels = sorted({lv for r, lv in keys if r != "dataset_specific"})
    colors = _level_colors(levels)
    width = 0.8 / len(keys)
    fig = _figure(max(4.0, 1.0 + len(datasets) * len(keys) * 0.35) * len(splits) + 1.6, 4.2)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        for j, (role, lv) in enumerate(keys):
            stats = [cell_stat(agg, d, role, lv, split, "acc1") for d in datasets]
            xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(datasets))]
            ys = [s.mean if s.n else float("nan") for s in stats]
            err = [s.std if s.n > 1 else 0.0 for s in stats]
            if role == "dataset_specific":
                style = {"color": "0.55", "label": "Dataset-specific"}
            elif role == "joint_teacher":
                style = {"color": colors[lv], "label": f"Joint teacher {lv}", "hatch": "//", "edgecolor": "white"}
            else:
                style = {"color": colors[lv], "label": f"Student {lv}"}
            ax.bar(xs, ys, width=width, yerr=err if any(err) else None, capsize=2, **style)
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"Fusion levels ({split})")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_figure(fig, path)


def _curve_series(curves: pd.DataFrame, dataset: str, role: str, levels: str) -> pd.DataFrame:
    """Mean and std (over repeated rows, e.g. seeds) of val/acc1 per epoch for one model on one dataset."""
    m = curves[(curves["dataset"] == dataset) & (curves["role"] == role) & (curves["levels"] == levels)
               & (curves["metric"] == CURVE_METRIC)]
    return m.groupby("epoch")["value"].agg(["mean", "std", "count"]).reset_index().sort_values("epoch")


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_series(ax: Any, s: pd.DataFrame, **style: Any) -> None:
    _integer_x(ax)
    ax.plot(s["epoch"], s["mean"], marker="o", markersize=3, **style)
    if (s["count"] > 1).any():
        lo, hi = s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0)
        ax.fill_between(s["epoch"], lo, hi, color=style.get("color"), alpha=0.15, linewidth=0)


def plot_dataset_curves(curves: pd.DataFrame, dataset: str, path: Path) -> Path | None:
    """Top-1 val accuracy per epoch on one dataset (Figures 2-3 style).

    Lines: the dataset-specific teacher, the joint teachers per level (dashed), the students per level (solid).

    Args:
        curves: ``curves.parquet`` rows.
        dataset: The dataset to plot.
        path: Destination PNG.

    Returns:
        ``path``, or None when the dataset has no val/acc1 curves of those models.
    """
    c = curves[(curves["dataset"] == dataset) & (curves["metric"] == CURVE_METRIC)]
    jt = sorted(set(c.loc[c["role"] == "joint_teacher", "levels"]))
    st = sorted(set(c.loc[c["role"] == "student", "levels"]))
    colors = _level_colors(sorted(set(jt) | set(st)))
    series: list[tuple[pd.DataFrame, dict]] = []
    if (c["role"] == "dataset_specific").any():
        series.append((_curve_series(c, dataset, "dataset_specific", "-"),
                       {"color": "black", "label": "Teacher (dataset-specific)"}))
    series += [(_curve_series(c, dataset, "joint_teacher", lv),
                {"color": colors[lv], "linestyle": "--", "label": f"Joint teacher {lv}"}) for lv in jt]
    series += [(_curve_series(c, dataset, "student", lv), {"color": colors[lv], "label": f"Student {lv}"})
               for lv in st]
    series = [(s, style) for s, style in series if len(s)]
    if not series:
        return None
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    for s, style in series:
        _draw_series(ax, s, **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%, val)")
    ax.set_title(f"{dataset}: top-1 accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_joint_teacher_curves(curves: pd.DataFrame, path: Path) -> Path | None:
    """Top-1 val accuracy per epoch of the joint teachers L1..Lk, one panel per dataset (Figure 4 style).

    Args:
        curves: ``curves.parquet`` rows.
        path: Destination PNG.

    Returns:
        ``path``, or None when fewer than two joint-teacher levels have curves.
    """
    c = curves[(curves["role"] == "joint_teacher") & (curves["metric"] == CURVE_METRIC)]
    levels = sorted(set(c["levels"]))
    datasets = _datasets(c)
    if len(levels) < 2 or not datasets:
        return None
    colors = _level_colors(levels)
    ncols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    fig = _figure(4.6 * ncols, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, d in zip(axes, datasets):
        for lv in levels:
            s = _curve_series(c, d, "joint_teacher", lv)
            if len(s):
                _draw_series(ax, s, color=colors[lv], label=f"Joint teacher {lv}")
        ax.set_title(d)
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 accuracy (%, val)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(datasets):]:
        ax.set_visible(False)
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# Searches
# --------------------------------------------------------------------------------------------------------------------


def plot_history(study: pd.DataFrame, info: SearchInfo, name: str, path: Path) -> Path | None:
    """Optimization history of one study: each trial's metric in creation order and the running best.

    Args:
        study: trials.parquet rows of one study.
        info: The search objective.
        name: Study name (title).
        path: Destination PNG.

    Returns:
        ``path``, or None when no trial has a value.
    """
    s = order_trials(study)
    vals = [float(v) if _finite(v) else float("nan") for v in s[info.value_column]]
    ok = [i for i, v in enumerate(vals) if not math.isnan(v)]
    if not ok:
        return None
    status = s["status"].astype(str).tolist()
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for st, color in (("TERMINATED", "tab:blue"), ("STOPPED", "tab:orange")):
        idx = [i for i in ok if status[i] == st]
        if idx:
            ax.scatter(idx, [vals[i] for i in idx], color=color, s=22, zorder=3,
                       label="completed" if st == "TERMINATED" else "stopped early (scheduler)")
    other = [i for i in ok if status[i] not in ("TERMINATED", "STOPPED")]
    if other:
        ax.scatter(other, [vals[i] for i in other], color="tab:gray", s=22, zorder=3, label="other")
    best, run = [], None
    for v in vals:
        if not math.isnan(v):
            run = v if run is None else (max(run, v) if info.mode == "max" else min(run, v))
        best.append(float("nan") if run is None else run)
    ax.step(range(len(vals)), best, where="post", color="tab:red", label=f"best so far ({info.mode})")
    errors = [i for i, st in enumerate(status) if st == "ERROR"]
    if errors:
        for i in errors:
            ax.axvline(i, color="tab:red", alpha=0.25, linestyle=":")
        ax.plot([], [], color="tab:red", alpha=0.4, linestyle=":", label=f"failed ({len(errors)})")
    _integer_x(ax)
    ax.set_xlabel("trial (creation order)")
    ax.set_ylabel(info.value_column)
    ax.set_title(f"Study {name}: optimization history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_importances(imp: dict[str, float], name: str, path: Path) -> Path:
    """Horizontal bars of parameter importances (largest on top)."""
    items = list(imp.items())[::-1]
    fig = _figure(6.4, 1.2 + 0.38 * len(items))
    ax = fig.subplots()
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel("importance (normalized)")
    ax.set_title(f"Study {name}: parameter importances")
    ax.grid(axis="x", alpha=0.3)
    return _save_figure(fig, path)


def plot_pareto(study: pd.DataFrame, info: SearchInfo, name: str, path: Path) -> Path | None:
    """The trade-off of a multi-objective study: every trial by its first two objectives (x: the second, y: the
    first), the Pareto front joined in order, infeasible trials (job constraints) crossed, stopped ones hollow.

    Args:
        study: trials.parquet rows of one study.
        info: The search objectives (``info.objectives``: two or more).
        name: Study name (title).
        path: Destination PNG.

    Returns:
        ``path``, or None when fewer than two objectives or no trial has both values.
    """
    if len(info.objectives) < 2:
        return None
    y_obj, x_obj = info.objectives[0], info.objectives[1]
    if x_obj.column not in study.columns or y_obj.column not in study.columns:
        return None
    s = study.copy()
    s["_x"] = pd.to_numeric(s[x_obj.column], errors="coerce")
    s["_y"] = pd.to_numeric(s[y_obj.column], errors="coerce")
    s["_pareto"], s["_feasible"] = pareto_flags(study, info)
    s = s[s["_x"].map(_finite) & s["_y"].map(_finite) & (s["status"].astype(str) != "ERROR")]
    if not len(s):
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    full = s["status"].astype(str) == "TERMINATED"
    groups = [(full & s["_feasible"], dict(color="tab:blue"), "trial"),
              (~full & s["_feasible"], dict(facecolors="none", edgecolors="tab:blue"), "stopped early (scheduler)"),
              (~s["_feasible"], dict(color="tab:gray", marker="x"), "infeasible (constraints)")]
    for mask, style, label in groups:
        if mask.any():
            ax.scatter(s.loc[mask, "_x"], s.loc[mask, "_y"], s=26, zorder=3, label=f"{label} ({int(mask.sum())})",
                       **style)
    front = s[s["_pareto"]].sort_values("_x")
    if len(front):
        ax.step(front["_x"], front["_y"], where="post", color="tab:red", alpha=0.6, zorder=2)
        ax.scatter(front["_x"], front["_y"], s=60, color="tab:red", zorder=4, label=f"Pareto front ({len(front)})")
        ranked = front_order(s[s["_pareto"]], info.objectives)
        for k, (_, r) in enumerate(ranked.iterrows()):
            ax.annotate(f"pareto:{k + 1}", (r["_x"], r["_y"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for metric, bounds in info.constraints.items():
        for op, bound in bounds.items():
            if metric == x_obj.metric:
                ax.axvline(float(bound), color="tab:gray", linestyle="--", alpha=0.6)
            elif metric == y_obj.metric:
                ax.axhline(float(bound), color="tab:gray", linestyle="--", alpha=0.6)
    ax.set_xlabel(f"{x_obj.column} ({x_obj.mode})")
    ax.set_ylabel(f"{y_obj.column} ({y_obj.mode})")
    ax.set_title(f"Study {name}: trade-off and Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)
