"""Per-study summary of a finished search: best trial vs the reference points vs the dataset-specific model.

Val numbers are the selected epoch's; test numbers were evaluated once, for that epoch, when the stage's artifact was
built. Trials that a scheduler stopped early left no artifact, so they have no test number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from mlfd.config import PipelineSpec, from_dict

SUMMARY_COLUMNS = ["study", "row", "trial_id", "fusion_level", "val/acc1", "val/acc5", "test/acc1", "test/acc5"]


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
    from mlfd.stages.joint import plan_for
    from mlfd.stages.students import student_key, student_variant
    from mlfd.stages.teachers import teacher_key
    from mlfd.store import ArtifactStore
    from mlfd.tune.launch import best_row, trial_config
    from mlfd.tune.spaces import apply_config

    search_dir = Path(search_dir)
    plan = json.loads((search_dir / "search.json").read_text())
    job = plan["job"]
    if job["stage"] != "students":
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    trials = pd.read_parquet(search_dir / "trials.parquet")
    store = ArtifactStore(plan["store"])
    base = from_dict(PipelineSpec, plan["pipeline"], validate=False)
    rows = []
    for study in dict.fromkeys(trials["study"]):
        st = trials[trials["study"] == study]
        ctx = Context(spec=base, store=store, progress=False)
        teacher = store.get("teacher", teacher_key(ctx, study))
        if teacher is not None:
            rows.append({"study": study, "row": "dataset-specific", "trial_id": "", "fusion_level": None,
                         **_metrics(teacher)})

        def trial_row(label: str, r: pd.Series) -> dict:
            cfg = trial_config(r)
            spec = from_dict(PipelineSpec, apply_config(plan["pipeline"], cfg), validate=False)
            tctx = Context(spec=spec, store=store, progress=False)
            level = spec.fusion_levels[0]
            art = store.get("student", student_key(tctx, study, plan_for(tctx, level, study),
                                                   student_variant(tctx, None, study)))
            m = _metrics(art) if art is not None else {"val/acc1": float(r[f"best/{job['metric']}"]),
                                                       "val/acc5": math.nan, "test/acc1": math.nan,
                                                       "test/acc5": math.nan}
            return {"study": study, "row": label, "trial_id": r["trial_id"], "fusion_level": level, **m}

        for i, point in enumerate(job.get("points_to_evaluate") or []):
            match = [r for _, r in st.iterrows() if _same(trial_config(r), point)]
            if match:
                rows.append(trial_row("reference" if i == 0 else f"reference {i + 1}", match[0]))
        best = best_row(st, job["metric"], job["mode"])
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
