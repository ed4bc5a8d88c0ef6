"""Analysis of a search directory (``mlfd tune JOB --out DIR``): its objective, trial order, Optuna parameter
importances, the top trials, and the per-study summary of a students search (best trial vs the job's reference points
vs the dataset-specific model).

The summary's val numbers are the selected epoch's; its test numbers were evaluated once, for that epoch, when the
stage's artifact was built. Trials that a scheduler stopped early left no artifact, so they have no test number.

Optuna is reached only through :mod:`mlfd.tune.importance` (only the tune layer imports it), and the stage and tune
modules the summary needs are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlfd.config import PipelineSpec, from_dict
from mlfd.errors import SpecError
from mlfd.report.tables import _finite, _md_table
from mlfd.search import SEARCH_FILE, SearchPlan
from mlfd.stages.pareto import feasible_mask, front_order, objectives, pareto_mask

TRIALS_FILE = "trials.parquet"
TOP_TRIALS = 10
MIN_IMPORTANCE_TRIALS = 3
SUMMARY_COLUMNS = ["study", "row", "trial_id", "fusion_level", "val/acc1", "val/acc5", "test/acc1", "test/acc5"]


# --------------------------------------------------------------------------------------------------------------------
# Objective and trial order
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SearchInfo:
    """What a search directory says about its objective.

    Attributes:
        metric: The optimized metric (``job.metric``), e.g. ``val/acc1``.
        mode: ``max`` or ``min``.
        value_column: The trials.parquet column holding each trial's value (``best/<metric>`` if present).
        space_file: The search-space YAML the job used, if recorded.
        objectives: Every objective of a multi-objective search (first = ``metric``); empty for one objective.
        constraints: The job's ``constraints`` ({metric: {le|ge: bound}}).
    """

    metric: str
    mode: str
    value_column: str
    space_file: str | None
    objectives: list = field(default_factory=list)
    constraints: dict = field(default_factory=dict)


def read_search_info(run_dir: Path, trials: pd.DataFrame) -> SearchInfo:
    """Objective of a search: from ``search.json`` when present, else inferred from the trial columns.

    Raises:
        SpecError: ``search.json`` is unreadable or names an invalid mode, or no metric column exists.
    """
    metric, mode, space_file, objs, constraints = None, "max", None, [], {}
    if (run_dir / SEARCH_FILE).is_file():
        plan = SearchPlan.load(run_dir)
        job = plan.job
        metric, mode, space_file, constraints = job.objective, job.objective_mode, plan.space_file, dict(job.constraints)
        objs = objectives(job.metrics, job.modes) if job.multi_objective else []
    candidates = [f"best/{metric}", f"final/{metric}"] if metric else []
    candidates += [c for c in trials.columns if c.startswith(("best/", "final/"))]
    for col in candidates:
        if col in trials.columns:
            return SearchInfo(metric=metric or col.split("/", 1)[1], mode=mode, value_column=col,
                              space_file=space_file, objectives=objs, constraints=constraints)
    raise SpecError(f"{run_dir / TRIALS_FILE}: no metric column; expected best/<metric> or final/<metric>"
                    f"{f' for metric {metric}' if metric else ''}")


def order_trials(study: pd.DataFrame) -> pd.DataFrame:
    """Trials of one study in creation order: the ``trial_index`` column of trials.parquet (Ray's trial counter,
    written by :func:`mlfd.tune.trials.trial_rows`); rows without one, and tables written before it existed, keep
    their file order, after the numbered ones."""
    s = study.copy()
    s["_pos"] = range(len(s))
    s["_num"] = pd.to_numeric(s["trial_index"], errors="coerce") if "trial_index" in s.columns else float("nan")
    return s.sort_values(["_num", "_pos"], kind="stable", na_position="last").drop(columns=["_num", "_pos"]) \
        .reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------------
# Importances and top trials
# --------------------------------------------------------------------------------------------------------------------


def _decode(v: Any) -> Any:
    """A config cell as the sampled value (see :func:`mlfd.tune.trials.config_cell`)."""
    from mlfd.tune.trials import config_cell

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


def search_importances(run_dir: Path, name: str, study: pd.DataFrame, info: SearchInfo
                       ) -> tuple[dict[str, float] | None, str, str | None]:
    """Parameter importances of one study of a search, from its persistent Optuna study when the search has one.

    A search keeps one Optuna study per study (``OUT/optuna.db`` or the job's ``optuna_storage``; see
    :mod:`mlfd.tune.study`): the study is read back as it is, with the distributions the sampler used. A search made
    before mlfd kept its studies has none: its importances are rebuilt from trials.parquet (:func:`param_importances`).

    Returns:
        (importances or None, note, a line naming the Optuna study that was read, or None for the fallback).
    """
    from mlfd.errors import SpecError as _SpecError
    from mlfd.tune.study import read_study, search_storage, study_name

    try:
        plan = SearchPlan.load(run_dir)
    except _SpecError:  # no (readable) search.json: a table of trials alone
        plan = None
    url = search_storage(Path(run_dir), plan.optuna_storage) if plan is not None else None
    view = None
    if url is not None:
        sname = study_name(plan.job.name, name)
        try:
            view = read_study(url, sname)
        except _SpecError as e:  # a database server that is away: fall back, and say so
            imp, note = param_importances(study, info)
            return imp, f"{note}; rebuilt from {TRIALS_FILE}: {e}", None
    if view is None:
        imp, note = param_importances(study, info)
        return imp, f"{note}; rebuilt from {TRIALS_FILE}: this search has no Optuna study {name!r}", None
    counts = ", ".join(f"{n} {k}" for k, n in sorted(view.counts.items()))
    source = (f"Optuna study `{view.name}` in `{view.storage}`: {sum(view.counts.values())} trials ({counts}); "
              f"`optuna-dashboard {view.storage}` shows it.")
    return view.importances, view.note, source


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
    s["#"] = range(1, len(s) + 1)  # the trial numbers of the live view (#1 ran first)
    s = s.sort_values(info.value_column, ascending=info.mode == "min", na_position="last", kind="stable").head(n)
    metric_cols = [c for c in (f"best/{info.metric}", f"final/{info.metric}") if c in s.columns]
    cfg = [c for c in _config_columns(s) if s[c].map(_decode).notna().any()]
    cols = ["#", "trial_id", "status"] + (["epochs"] if "epochs" in s.columns else []) + metric_cols + cfg
    header = ["rank"] + [c[len("config/"):] if c.startswith("config/") else c for c in cols]
    rows = [[str(i + 1)] + [_fmt_value(r[c]) for c in cols] for i, (_, r) in enumerate(s.iterrows())]
    return _md_table(header, rows)


# --------------------------------------------------------------------------------------------------------------------
# Summary: best trial vs reference vs dataset-specific
# --------------------------------------------------------------------------------------------------------------------


def _same(a: dict, b: dict) -> bool:
    keys = set(a) | set(b)
    return all(k in a and k in b and (a[k] == b[k] or (isinstance(a[k], float) and isinstance(b[k], (int, float)) and
                                                         math.isclose(a[k], b[k], rel_tol=1e-9))) for k in keys)


def _metrics(art) -> dict:
    m = json.loads(art.file("metrics.json").read_text())
    return {"val/acc1": m["val"]["acc1"], "val/acc5": m["val"]["acc5"], "test/acc1": m["test"]["acc1"],
            "test/acc5": m["test"]["acc5"]}


def study_summary(search_dir: Path) -> pd.DataFrame:
    """Rows per study: the dataset-specific model, each reference point (``points_to_evaluate``), the best trial."""
    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore
    from mlfd.tune.trials import best_row, retried_spec, trial_config
    from mlfd.tune.spaces import apply_config

    search_dir = Path(search_dir)
    plan = SearchPlan.load(search_dir)
    job = plan.job
    if job.stage != "students":
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    trials = pd.read_parquet(search_dir / TRIALS_FILE)
    store = ArtifactStore(plan.store)
    base = plan.spec
    rows = []
    for study in dict.fromkeys(trials["study"]):
        st = trials[trials["study"] == study]
        ctx = Context(spec=base, store=store, progress=False)
        teacher = StageTrial(ctx, "teachers", study).artifact()
        if teacher is not None:
            rows.append({"study": study, "row": "dataset-specific", "trial_id": "", "fusion_level": None,
                         **_metrics(teacher)})

        def trial_row(label: str, r: pd.Series) -> dict:
            cfg = trial_config(r)
            spec = retried_spec(from_dict(PipelineSpec, apply_config(plan.pipeline, cfg), validate=False),
                                plan.job.stage, r)  # micro-batched if it ran out of memory
            tctx = Context(spec=spec, store=store, progress=False)
            level = spec.fusion_levels[0]
            art = StageTrial(tctx, "students", study).artifact()
            m = _metrics(art) if art is not None else {"val/acc1": float(r[f"best/{job.objective}"]),
                                                       "val/acc5": math.nan, "test/acc1": math.nan,
                                                       "test/acc5": math.nan}
            return {"study": study, "row": label, "trial_id": r["trial_id"], "fusion_level": level, **m}

        for i, point in enumerate(job.points_to_evaluate or []):
            match = [r for _, r in st.iterrows() if _same(trial_config(r), point)]
            if match:
                rows.append(trial_row("reference" if i == 0 else f"reference {i + 1}", match[0]))
        best = best_row(st, job.objective, job.objective_mode)
        if best is not None:
            rows.append(trial_row("best trial", best))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_table(df: pd.DataFrame) -> str:
    """Markdown: one row per (study, row) with val/test acc@1/acc@5."""
    head = "| Study | Model | Trial | Level | val acc@1 | val acc@5 | test acc@1 | test acc@5 |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        lvl = f"L{int(r['fusion_level'])}" if r["fusion_level"] is not None and not pd.isna(r["fusion_level"]) else "-"
        cells = [f"{r[k]:.2f}" if not pd.isna(r[k]) else "n/a" for k in SUMMARY_COLUMNS[4:]]
        lines.append(f"| {r['study']} | {r['row']} | {r['trial_id'] or '-'} | {lvl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Multi-objective searches: the Pareto front
# --------------------------------------------------------------------------------------------------------------------


def pareto_flags(study: pd.DataFrame, info: SearchInfo) -> tuple[pd.Series, pd.Series]:
    """``(is_pareto, feasible)`` of one study's rows: the trials.parquet columns when written (by ``mlfd tune``),
    else computed (:mod:`mlfd.stages.pareto`)."""
    pareto = (study["is_pareto"].astype(bool) if "is_pareto" in study.columns
              else pareto_mask(study, info.objectives, info.constraints))
    if "feasible" in study.columns:
        feasible = study["feasible"].astype(bool)
    else:
        feasible = feasible_mask(study, info.constraints) if info.constraints else pd.Series(True, index=study.index)
    return pareto, feasible


def pareto_table(study: pd.DataFrame, info: SearchInfo) -> str:
    """Markdown: the study's Pareto front in ``mlfd export --pick pareto:K`` order (K = the first column)."""
    pareto, _ = pareto_flags(study, info)
    front = front_order(study[pareto], info.objectives)
    obj_cols = [o.column for o in info.objectives]
    extra = [c for c in ("best/student/params", "best/student/latency_ms") if c in front.columns and c not in obj_cols]
    cfg = [c for c in _config_columns(front) if front[c].map(_decode).notna().any()]
    cols = ["trial_id", "status"] + obj_cols + extra + cfg
    header = ["K"] + [c[len("config/"):] if c.startswith("config/") else c for c in cols]
    rows = [[str(k + 1)] + [_fmt_value(r[c]) for c in cols] for k, (_, r) in enumerate(front.iterrows())]
    return _md_table(header, rows)
