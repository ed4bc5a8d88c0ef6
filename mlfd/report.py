"""``mlfd report``: Markdown tables and PNG plots of a pipeline run and/or a search directory.

A pipeline run directory (``mlfd run ... --out DIR``) gives:

* the Table-2-style comparison of every model (mean ± std over seeds when several seeds were run) and the
  "students vs dataset-specific" acc@1 deltas;
* the fusion-level ablation (Table 4 style) as a table and a grouped bar plot;
* top-1 accuracy per epoch (Figures 2-4 style): one plot per dataset, and one of the joint teachers per level.

A search directory (``mlfd tune JOB --out DIR``) gives, per study, the optimization history, Optuna parameter
importances (from an in-memory study rebuilt out of ``trials.parquet``) and the top trials.

Everything is written to ``REPORT_DIR/report.md`` plus PNG files next to it. Plots use matplotlib's Agg renderer
through :class:`matplotlib.figure.Figure` (no pyplot, no global backend state). Heavy imports (matplotlib, Optuna
through mlfd.tune.importance, the pipeline module) happen inside the functions that need them, so importing this
module stays cheap.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mlfd.errors import SpecError
from mlfd.stages.results import PM, ROLE_ORDER, ROLE_TITLES, aggregate_results, cell_stat, results_table
from mlfd.store import atomic_write_bytes, atomic_write_text

RESULTS_FILE = "results.parquet"
CURVES_FILE = "curves.parquet"
TRIALS_FILE = "trials.parquet"
SEARCH_FILE = "search.json"
REPORT_FILE = "report.md"
EXPECTED = (f"{RESULTS_FILE} and/or {CURVES_FILE} (from `mlfd run`), or {TRIALS_FILE} with {SEARCH_FILE} "
            f"(from `mlfd tune`)")

RESULT_REQUIRED = ("dataset", "role", "levels", "split", "acc1", "acc5")
CURVE_REQUIRED = ("dataset", "role", "levels", "epoch", "metric", "value")
TRIAL_REQUIRED = ("study", "trial_id", "status")
SPLITS = ("val", "test")
CURVE_METRIC = "val/acc1"
TOP_TRIALS = 10
MIN_IMPORTANCE_TRIALS = 3
DPI = 110


# --------------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------------


def _pipeline_names() -> tuple[list[str], dict[str, str]]:
    """``ROLE_ORDER`` and ``ROLE_TITLES`` of the pipeline's results."""
    return list(ROLE_ORDER), dict(ROLE_TITLES)


def _slug(name: Any) -> str:
    """A file-name-safe version of a dataset or study name."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")
    return s or "unnamed"


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


def _read_parquet(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a parquet input and check its columns.

    Raises:
        SpecError: The file cannot be read or lacks required columns.
    """
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SpecError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SpecError(f"{path}: missing columns {missing}; expected at least {list(required)}")
    return df


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
# Pipeline results: aggregation and tables
# --------------------------------------------------------------------------------------------------------------------


_stat = cell_stat


def _datasets(df: pd.DataFrame) -> list[str]:
    return [str(d) for d in dict.fromkeys(df["dataset"]) if str(d) != "all"]


def comparison_table(df: pd.DataFrame) -> str:
    """The Table-2-style comparison: rows = model and levels, columns = dataset x split x acc@k; cells read
    ``mean ± std (n=k)`` over seeds when there are several (the same table as ``results.md``).

    Args:
        df: ``results.parquet`` rows.

    Returns:
        A Markdown table.
    """
    return results_table(df)


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
                st = _stat(agg, d, "student", lv, s, "acc1")
                ds = _stat(agg, d, "dataset_specific", "-", s, "acc1")
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
    _, titles = _pipeline_names()
    datasets = _datasets(agg)
    header = ["Model", "Levels"] + [f"{d} {s} acc@1" for d in datasets for s in SPLITS]
    rows = []
    for role, lv in _ablation_keys(agg):
        rows.append([titles.get(role, role), lv] + [_stat(agg, d, role, lv, s, "acc1").fmt()
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


# --------------------------------------------------------------------------------------------------------------------
# Pipeline results: plots
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
            stats = [_stat(agg, d, role, lv, split, "acc1") for d in datasets]
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


@dataclass
class SearchInfo:
    """What a search directory says about its objective.

    Attributes:
        metric: The optimized metric (``job.metric``), e.g. ``val/acc1``.
        mode: ``max`` or ``min``.
        value_column: The trials.parquet column holding each trial's value (``best/<metric>`` if present).
        space_file: The search-space YAML the job used, if recorded.
    """

    metric: str
    mode: str
    value_column: str
    space_file: str | None


def read_search_info(run_dir: Path, trials: pd.DataFrame) -> SearchInfo:
    """Objective of a search: from ``search.json`` when present, else inferred from the trial columns.

    Raises:
        SpecError: ``search.json`` is unreadable or names an invalid mode, or no metric column exists.
    """
    metric, mode, space_file = None, "max", None
    path = run_dir / SEARCH_FILE
    if path.is_file():
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SpecError(f"{path}: not readable JSON ({e})") from None
        job = plan.get("job") or {}
        metric = job.get("metric")
        mode = job.get("mode", "max")
        space_file = plan.get("space_file")
        if mode not in ("max", "min"):
            raise SpecError(f"{path}: job.mode: must be 'max' or 'min', got {mode!r}")
    candidates = [f"best/{metric}", f"final/{metric}"] if metric else []
    candidates += [c for c in trials.columns if c.startswith(("best/", "final/"))]
    for col in candidates:
        if col in trials.columns:
            return SearchInfo(metric=metric or col.split("/", 1)[1], mode=mode, value_column=col,
                              space_file=space_file)
    raise SpecError(f"{run_dir / TRIALS_FILE}: no metric column; expected best/<metric> or final/<metric>"
                    f"{f' for metric {metric}' if metric else ''}")


def order_trials(study: pd.DataFrame) -> pd.DataFrame:
    """Trials of one study in creation order: the ``trial_index`` column of trials.parquet (Ray's trial counter,
    written by :func:`mlfd.tune.launch.trial_rows`); rows without one, and tables written before it existed, keep
    their file order, after the numbered ones."""
    s = study.copy()
    s["_pos"] = range(len(s))
    s["_num"] = pd.to_numeric(s["trial_index"], errors="coerce") if "trial_index" in s.columns else float("nan")
    return s.sort_values(["_num", "_pos"], kind="stable", na_position="last").drop(columns=["_num", "_pos"]) \
        .reset_index(drop=True)


def _decode(v: Any) -> Any:
    """A config cell as the sampled value (see :func:`mlfd.tune.launch.config_cell`)."""
    from mlfd.tune.launch import config_cell

    return config_cell(v)


def _config_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("config/")]


def param_importances(study: pd.DataFrame, info: SearchInfo) -> tuple[dict[str, float] | None, str]:
    """Optuna parameter importances of one study, from an in-memory Optuna study rebuilt out of its trials.

    Usable trials are those that did not fail and have a finite value (ASHA-stopped trials included: their value is
    what the search saw). The assessment itself is :func:`mlfd.tune.importance.fanova_importances` (only the tune
    layer imports Optuna).

    Args:
        study: trials.parquet rows of one study.
        info: The search objective.

    Returns:
        (importances sorted high to low, note) or (None, why they were skipped).
    """
    from mlfd.tune.importance import fanova_importances

    usable = study[(study["status"].astype(str) != "ERROR") & study[info.value_column].map(_finite)]
    if len(usable) < MIN_IMPORTANCE_TRIALS:
        return None, (f"skipped: {len(usable)} completed trial(s) with a value; importances need at least "
                      f"{MIN_IMPORTANCE_TRIALS}")
    values = {c[len("config/"):]: [_decode(v) for v in usable[c]] for c in _config_columns(usable)}
    objective = [float(usable.iloc[i][info.value_column]) for i in range(len(usable))]
    return fanova_importances(values, objective, maximize=info.mode == "max", space_file=info.space_file)


def _fmt_value(v: Any) -> str:
    v = _decode(v)
    if v is None:
        return ""
    if isinstance(v, bool) or isinstance(v, (int, str)):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def top_trials_table(study: pd.DataFrame, info: SearchInfo, n: int = TOP_TRIALS) -> str:
    """The ``n`` best trials of a study by the search metric (failed and valueless trials last).

    Args:
        study: trials.parquet rows of one study.
        info: The search objective.
        n: How many rows.

    Returns:
        A Markdown table: rank, trial, status, epochs, metric columns, then the sampled config (short names).
    """
    s = order_trials(study)
    s["#"] = range(len(s))
    s = s.sort_values(info.value_column, ascending=info.mode == "min", na_position="last", kind="stable").head(n)
    metric_cols = [c for c in (f"best/{info.metric}", f"final/{info.metric}") if c in s.columns]
    cfg = [c for c in _config_columns(s) if s[c].map(_decode).notna().any()]
    cols = ["#", "trial_id", "status"] + (["epochs"] if "epochs" in s.columns else []) + metric_cols + cfg
    header = ["rank"] + [c[len("config/"):] if c.startswith("config/") else c for c in cols]
    rows = [[str(i + 1)] + [_fmt_value(r[c]) for c in cols] for i, (_, r) in enumerate(s.iterrows())]
    return _md_table(header, rows)


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


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------


def _results_section(results: pd.DataFrame | None, curves: pd.DataFrame | None, out: Path,
                     files: dict[str, Path]) -> list[str]:
    md: list[str] = []
    if results is not None and len(results):
        agg = aggregate_results(results)
        n = int(agg["n_seeds"].max())
        seeds = sorted(set(results["seed"])) if "seed" in results.columns else [0]
        md += ["## Results (Table 2 style)", ""]
        md.append("Top-1 / top-5 accuracy in %. " + (
            f"Cells are mean {PM} sample std (ddof=1) over seeds {', '.join(map(str, seeds))}, with the number of "
            "seeds n; the data splits are the same for every seed." if n > 1 else
            f"One seed ({', '.join(map(str, seeds))})."))
        md += ["", comparison_table(results), ""]
        delta = delta_table(results)
        if delta:
            md += ["### Students vs dataset-specific models", "",
                   "Student acc@1 minus dataset-specific acc@1 (means over seeds; positive = the student is better).",
                   "", delta, ""]
        abl = ablation_table(results)
        if abl:
            md += ["## Fusion-level ablation (Table 4 style)", "", "Top-1 accuracy in % per fusion level.", "",
                   abl, ""]
            png = plot_ablation(results, out / "ablation_levels.png")
            if png:
                files["ablation"] = png
                md += [f"![Fusion-level ablation]({png.name})", ""]
    if curves is not None and len(curves):
        pngs: list[Path] = []
        for d in _datasets(curves):
            png = plot_dataset_curves(curves, d, out / f"curves_{_slug(d)}.png")
            if png:
                files[f"curves/{d}"] = png
                pngs.append(png)
        png = plot_joint_teacher_curves(curves, out / "curves_joint_teachers.png")
        if png:
            files["curves/joint_teachers"] = png
            pngs.append(png)
        if pngs:
            md += ["## Top-1 accuracy per epoch (Figures 2-4 style)", "",
                   f"{CURVE_METRIC} after each epoch; dashed = joint teachers, solid = students.", ""]
            md += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    return md


def _summary_section(run_dir: Path) -> list[str]:
    """Best trial vs the job's reference points vs the dataset-specific model, per study (student searches)."""
    from mlfd.tune.summary import study_summary, summary_table

    try:
        df = study_summary(run_dir)
    except (OSError, KeyError, ValueError) as e:  # store moved or partial search: the rest of the report stands
        return ["## Search summary", "", f"Not available ({type(e).__name__}: {e}).", ""]
    if not len(df):
        return []
    return ["## Search summary: best trial vs reference vs dataset-specific", "",
            "Val: the selected epoch; test: evaluated once for that epoch. A reference is a job's "
            "`points_to_evaluate` entry (the quickstart's is the paper's Table 1 setting).", "",
            summary_table(df), ""]


def _search_section(trials: pd.DataFrame, info: SearchInfo, out: Path, files: dict[str, Path]) -> list[str]:
    md: list[str] = []
    for name in dict.fromkeys(trials["study"].astype(str)):
        study = trials[trials["study"].astype(str) == name]
        counts = study["status"].astype(str).value_counts()
        md += [f"## Search: study {name}", ""]
        summary = ", ".join(f"{counts[k]} {k}" for k in counts.index)
        md.append(f"{len(study)} trials ({summary}); objective: {info.mode} {info.value_column}.")
        ok = study[study[info.value_column].map(_finite)]
        if len(ok):
            best = ok.loc[ok[info.value_column].idxmax() if info.mode == "max" else ok[info.value_column].idxmin()]
            value = float(best[info.value_column])
            md.append(f"Best: trial {best['trial_id']} with {info.value_column} = {value:.4g}.")
        if "error" in study.columns:
            errs = study[(study["status"].astype(str) == "ERROR")]
            for _, r in errs.head(5).iterrows():
                md.append(f"- failed trial {r['trial_id']}: {str(r['error'] or '').strip() or 'no message'}")
        md.append("")
        png = plot_history(study, info, name, out / f"search_{_slug(name)}_history.png")
        if png:
            files[f"search/{name}/history"] = png
            md += ["### Optimization history", "", f"![history {name}]({png.name})", ""]
        md += ["### Parameter importances", ""]
        imp, note = param_importances(study, info)
        if imp:
            md += [f"Optuna `get_param_importances`, fANOVA ({note}).", "",
                   _md_table(["Param", "Importance"], [[k, f"{v:.3f}"] for k, v in imp.items()]), ""]
            png = plot_importances(imp, name, out / f"search_{_slug(name)}_importances.png")
            files[f"search/{name}/importances"] = png
            md += [f"![importances {name}]({png.name})", ""]
        else:
            md += [f"Importances {note}.", ""]
        md += [f"### Top {min(TOP_TRIALS, len(study))} trials by {info.value_column}", "",
               top_trials_table(study, info), ""]
    return md


def write_report(run_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Write ``report.md`` and PNG plots for a pipeline run and/or search directory.

    Args:
        run_dir: A ``mlfd run`` output (results.parquet, curves.parquet) and/or a ``mlfd tune`` output
            (trials.parquet, search.json).
        out_dir: Where to write (default ``run_dir``); created if needed.

    Returns:
        Name -> file written: ``report`` (report.md), ``ablation``, ``curves/<dataset>``, ``curves/joint_teachers``,
        ``search/<study>/history``, ``search/<study>/importances`` (only those that were produced).

    Raises:
        SpecError: ``run_dir`` is missing or holds none of the known inputs, or an input file is malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SpecError(f"{run_dir}: no such directory; expected a directory with {EXPECTED}")
    present = {f: run_dir / f for f in (RESULTS_FILE, CURVES_FILE, TRIALS_FILE) if (run_dir / f).is_file()}
    if not present:
        raise SpecError(f"{run_dir}: nothing to report; expected {EXPECTED}")
    results = _read_parquet(present[RESULTS_FILE], RESULT_REQUIRED) if RESULTS_FILE in present else None
    curves = _read_parquet(present[CURVES_FILE], CURVE_REQUIRED) if CURVES_FILE in present else None
    trials = _read_parquet(present[TRIALS_FILE], TRIAL_REQUIRED) if TRIALS_FILE in present else None
    for df in (results, curves):
        if df is not None:
            for c in ("dataset", "role", "levels"):
                df[c] = df[c].astype(str)
    info = read_search_info(run_dir, trials) if trials is not None else None
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    md = ["# MLFD report", "", f"Source: `{run_dir.resolve()}` ({', '.join(present)}).", ""]
    md += _results_section(results, curves, out, files)
    if trials is not None and info is not None:
        if len(trials):
            if (run_dir / "search.json").is_file():
                md += _summary_section(run_dir)
            md += _search_section(trials, info, out, files)
        else:
            md += ["## Search", "", f"{TRIALS_FILE} holds no trials yet.", ""]
    report = out / REPORT_FILE
    atomic_write_text(report, "\n".join(md).rstrip() + "\n")
    return {"report": report, **files}


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    files = write_report(Path(args.dir), Path(args.out) if args.out else None)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to an argparse subparsers object.

    Args:
        sub: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new subparser (its ``func`` default runs the command and returns an exit code).
    """
    p = sub.add_parser("report", help="write report.md and PNG plots for a run or search directory",
                       description="Tables (Table 2 / Table 4 style, mean ± std over seeds), accuracy curves, and "
                                   "per-study search history, importances and top trials.")
    p.add_argument("dir", help="a `mlfd run` or `mlfd tune` output directory")
    p.add_argument("--out", default=None, metavar="REPORT_DIR", help="where to write (default: DIR)")
    p.set_defaults(func=_cmd_report)
    return p
