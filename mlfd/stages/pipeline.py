"""The whole method: teachers, baselines, joint teachers, students and controls, then the Table-2-style results."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pandas as pd

from mlfd.config import PipelineSpec, save_pipeline
from mlfd.stages.baselines import MODES, train_baseline
from mlfd.stages.common import Context, read_metrics
from mlfd.stages.joint import plan_for, train_joint
from mlfd.stages.students import train_student
from mlfd.stages.teachers import train_teacher
from mlfd.store import ArtifactStore, atomic_write_bytes, atomic_write_text

RESULT_COLUMNS = ["dataset", "role", "levels", "split", "acc1", "acc5", "epochs", "seed"]
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


def _rows(metrics: dict, role: str, levels: str, datasets: list[str] | None = None) -> list[dict]:
    """Result rows from an artifact's metrics.json (single- or multi-dataset)."""
    rows = []
    for split in ("val", "test"):
        block = metrics[split]
        per = {metrics["dataset"]: block} if "dataset" in metrics else block
        for d, m in per.items():
            if datasets is None or d in datasets:
                rows.append({"dataset": d, "role": role, "levels": levels, "split": split, "acc1": float(m["acc1"]),
                             "acc5": float(m["acc5"]), "epochs": int(metrics["epochs"]), "seed": int(metrics["seed"])})
    return rows


def plan_stages(spec: PipelineSpec) -> list[tuple[str, Callable[[Context], list[dict]]]]:
    """The ordered list of (label, work) that makes up a pipeline run; each work returns its result rows."""
    names = [d.name for d in spec.datasets]
    students = spec.only_students or names
    stages: list[tuple[str, Callable[[Context], list[dict]]]] = []
    for n in names:
        stages.append((f"teacher {n}", lambda ctx, n=n: _rows(read_metrics(train_teacher(ctx, n)),
                                                              "dataset_specific", "-")))
    for mode, on in (("multi_head", spec.baselines.multi_head), ("joint_head", spec.baselines.joint_head)):
        if on:
            stages.append((mode, lambda ctx, mode=mode: _rows(read_metrics(train_baseline(ctx, mode)), mode, "-")))
    for level in spec.fusion_levels:
        lv = f"L{level}"
        if spec.joint.variant == "union":
            stages.append((f"joint teacher {lv}", lambda ctx, level=level, lv=lv: _rows(
                read_metrics(train_joint(ctx, plan_for(ctx, level))), "joint_teacher", lv)))
        else:
            for n in students:
                stages.append((f"joint teacher {lv} for {n}", lambda ctx, level=level, lv=lv, n=n: _rows(
                    read_metrics(train_joint(ctx, plan_for(ctx, level, n))), "joint_teacher", lv, [n])))
        controls = [None] + [c for c, on in (("own_teacher", spec.controls.own_teacher),
                                              ("no_kd", spec.controls.no_kd)) if on]
        for control in controls:
            role = "student" if control is None else f"student_{control}"
            for n in students:
                stages.append((f"{role} {n} {lv}", lambda ctx, n=n, level=level, control=control, role=role, lv=lv:
                               _rows(read_metrics(train_student(ctx, n, level, control)), role, lv)))
    return stages


def run_pipeline(spec: PipelineSpec, out: Path, store: Path | None = None, progress: bool = True,
                 log: Callable[..., None] | None = None) -> pd.DataFrame:
    """Run what is missing of ``spec`` and write ``out/results.parquet``, ``out/results.md`` and the resolved spec.

    Args:
        store: artifact store directory (default ``out/store``); share it between runs to reuse stage outputs.
        log: called as ``log(label, rows)`` after each stage (MLflow tracking hooks in here).
    """
    out = Path(out).resolve()
    ctx = Context(spec=spec, store=ArtifactStore(store or out / "store"), progress=progress)
    save_pipeline(spec, out / "pipeline.yaml")
    stages = plan_stages(spec)
    rows: list[dict] = []
    for i, (label, work) in enumerate(stages):
        if progress:
            print(f"[{i + 1}/{len(stages)}] {label}", file=sys.stderr, flush=True)
        new = work(ctx)
        rows.extend(new)
        if log is not None:
            log(label, new)
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    write_results(df, out)
    return df


def write_results(df: pd.DataFrame, out: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out / "results.parquet", buf.getvalue())
    atomic_write_text(out / "results.md", results_table(df) + "\n")


def results_table(df: pd.DataFrame) -> str:
    """A Markdown table shaped like the paper's Table 2: rows = model (and levels), columns = dataset x split x k."""
    datasets = list(dict.fromkeys(df["dataset"]))
    header = ["Model", "Levels"] + [f"{d} {s} acc@{k}" for d in datasets for s in ("val", "test") for k in (1, 5)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = sorted({(r, lv) for r, lv in zip(df["role"], df["levels"])},
                  key=lambda t: (ROLE_ORDER.index(t[0]) if t[0] in ROLE_ORDER else 99, t[1]))
    for role, lv in keys:
        sub = df[(df["role"] == role) & (df["levels"] == lv)]
        cells = [ROLE_TITLES.get(role, role), lv]
        for d in datasets:
            for s in ("val", "test"):
                m = sub[(sub["dataset"] == d) & (sub["split"] == s)]
                for k in ("acc1", "acc5"):
                    cells.append(f"{m[k].mean():.2f}" if len(m) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
