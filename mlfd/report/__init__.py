"""``mlfd report``: Markdown tables and PNG plots of a pipeline run and/or a search directory.

A pipeline run directory (``mlfd run ... --out DIR``) gives:

* the Table-2-style comparison of every model (mean ± std over seeds when several seeds were run) and the
  "students vs dataset-specific" acc@1 deltas;
* the fusion-level ablation (Table 4 style) as a table and a grouped bar plot;
* top-1 accuracy per epoch (Figures 2-4 style): one plot per dataset, and one of the joint teachers per level.

A search directory (``mlfd tune JOB --out DIR``) gives, per study, the optimization history, Optuna parameter
importances (read from the search's persistent Optuna study, ``OUT/optuna.db`` or the job's ``optuna_storage``; for
a search made before mlfd kept them, from an in-memory study rebuilt out of ``trials.parquet``) and the top trials.

Everything is written to ``REPORT_DIR/report.md`` plus PNG files next to it. Plots use matplotlib's Agg renderer
through :class:`matplotlib.figure.Figure` (no pyplot, no global backend state). Heavy imports (matplotlib, Optuna
through mlfd.tune.importance, the stage modules) happen inside the functions that need them, so importing this
package stays cheap.

The package: :mod:`mlfd.report.tables` (result tables), :mod:`mlfd.report.plots` (PNG plots),
:mod:`mlfd.report.search` (search analysis and summary); this module assembles ``report.md`` and holds the CLI.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pandas as pd

from mlfd.errors import SpecError
from mlfd.report.plots import (CURVE_METRIC, plot_ablation, plot_dataset_curves, plot_history, plot_importances,
                               plot_joint_teacher_curves, plot_pareto)
from mlfd.report.price import price_section
from mlfd.report.search import (SEARCH_FILE, TOP_TRIALS, TRIALS_FILE, SearchInfo, order_trials, param_importances,
                                pareto_table, read_search_info, search_importances, study_summary, summary_table,
                                top_trials_table)
from mlfd.report.tables import _datasets, _finite, _md_table, ablation_table, delta_table
from mlfd.stages.results import PM, aggregate_results, results_table
from mlfd.store import atomic_write_text

__all__ = ["SearchInfo", "ablation_table", "add_report_parser", "delta_table", "order_trials", "param_importances",
           "plot_ablation", "plot_dataset_curves", "plot_history", "plot_importances", "plot_joint_teacher_curves",
           "read_search_info", "study_summary", "summary_table", "top_trials_table", "write_report"]

RESULTS_FILE = "results.parquet"
CURVES_FILE = "curves.parquet"
REPORT_FILE = "report.md"
EXPECTED = (f"{RESULTS_FILE} and/or {CURVES_FILE} (from `mlfd run`), or {TRIALS_FILE} with {SEARCH_FILE} "
            f"(from `mlfd tune`)")
RESULT_REQUIRED = ("dataset", "role", "levels", "split", "acc1", "acc5")
CURVE_REQUIRED = ("dataset", "role", "levels", "epoch", "metric", "value")
TRIAL_REQUIRED = ("study", "trial_id", "status")


def _slug(name: Any) -> str:
    """A file-name-safe version of a dataset or study name."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")
    return s or "unnamed"


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
        md += ["", results_table(results), ""]
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


def _search_section(trials: pd.DataFrame, info: SearchInfo, out: Path, files: dict[str, Path],
                    run_dir: Path) -> list[str]:
    md: list[str] = []
    for name in dict.fromkeys(trials["study"].astype(str)):
        study = trials[trials["study"].astype(str) == name]
        counts = study["status"].astype(str).value_counts()
        md += [f"## Search: study {name}", ""]
        summary = ", ".join(f"{counts[k]} {k}" for k in counts.index)
        objective = f"objective: {info.mode} {info.value_column}"
        if len(info.objectives) > 1:
            objective = (f"objectives: {', '.join(f'{o.mode} {o.column}' for o in info.objectives)} (the first ranks "
                         f"the history, importances and top trials; the Pareto front below weighs them all)")
        md.append(f"{len(study)} trials ({summary}); {objective}.")
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
        imp, note, source = search_importances(run_dir, name, study, info)
        if source:
            md += [source, ""]
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
        md += _pareto_section(study, info, name, out, files)
    return md


def _pareto_section(study: pd.DataFrame, info: SearchInfo, name: str, out: Path, files: dict[str, Path]) -> list[str]:
    """A multi-objective study's Pareto front: table (in ``--pick pareto:K`` order) and trade-off plot."""
    if len(info.objectives) < 2:
        return []
    objs = ", ".join(f"{o.mode} {o.metric}" for o in info.objectives)
    cons = "; ".join(f"{m} {op} {b:g}" for m, bounds in info.constraints.items() for op, b in bounds.items())
    md = ["### Pareto front", "",
          f"Objectives: {objs}{f'; constraints: {cons}' if cons else ''}. The front: trials no other trial beats on "
          "every objective, among the trials that ran every epoch (all trials that did not fail, if none did)"
          f"{' and meet the constraints' if cons else ''}. K orders it by the first objective, best first: "
          "`mlfd export DIR --study S --pick pareto:K` exports that point.", "",
          pareto_table(study, info), ""]
    png = plot_pareto(study, info, name, out / f"search_{_slug(name)}_pareto.png")
    if png:
        files[f"search/{name}/pareto"] = png
        md += [f"![pareto {name}]({png.name})", ""]
    return md


def write_report(run_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Write ``report.md`` and PNG plots for a pipeline run and/or search directory.

    Args:
        run_dir: A ``mlfd run`` output (results.parquet, curves.parquet) and/or a ``mlfd tune`` output
            (trials.parquet, search.json).
        out_dir: Where to write (default ``run_dir``); created if needed.

    Returns:
        Name -> file written: ``report`` (report.md), ``ablation``, ``curves/<dataset>``, ``curves/joint_teachers``,
        ``search/<study>/history``, ``search/<study>/importances``, ``search/<study>/pareto`` (multi-objective
        searches) (only those that were produced).

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
            md += _search_section(trials, info, out, files, run_dir)
            md += price_section(run_dir, trials)
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
