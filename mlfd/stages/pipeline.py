"""The whole method: teachers, baselines, joint teachers, students and controls, then the Table-2-style results."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from mlfd.config import PipelineSpec, save_pipeline
from mlfd.stages.baselines import train_baseline
from mlfd.stages.common import Context, read_metrics
from mlfd.stages.joint import plan_for, train_joint
from mlfd.stages.results import CURVE_COLUMNS, RESULT_COLUMNS, ROLE_ORDER, ROLE_TITLES, results_table
from mlfd.stages.students import train_student
from mlfd.stages.teachers import train_teacher
from mlfd.store import Artifact, ArtifactStore, atomic_write_bytes, atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = ["CURVE_COLUMNS", "RESULT_COLUMNS", "ROLE_ORDER", "ROLE_TITLES", "Stage", "plan_stages", "preflight",
           "results_table", "run_pipeline", "write_results"]


def _curves(metrics: dict, role: str, levels: str, seed: int) -> list[dict]:
    """Per-epoch curve rows (long format) from an artifact's history; multi-dataset stages give one curve each."""
    rows = []
    single = metrics.get("dataset")
    for h in metrics.get("history", []):
        for k, v in h.items():
            if k == "epoch" or not isinstance(v, (int, float)):
                continue
            parts = k.split("/")
            if single is None and len(parts) == 3 and parts[0] == "val":  # val/<dataset>/acc1
                rows.append({"dataset": parts[1], "role": role, "levels": levels, "epoch": int(h["epoch"]),
                             "metric": f"val/{parts[2]}", "value": float(v), "seed": seed})
            elif single is not None or parts[0] == "train":
                rows.append({"dataset": single or "all", "role": role, "levels": levels, "epoch": int(h["epoch"]),
                             "metric": k, "value": float(v), "seed": seed})
    return rows


def _rows(metrics: dict, role: str, levels: str, seed: int, datasets: list[str] | None = None) -> list[dict]:
    """Result rows from an artifact's metrics.json (single- or multi-dataset); ``seed`` is the run seed."""
    rows = []
    for split in ("val", "test"):
        block = metrics[split]
        per = {metrics["dataset"]: block} if "dataset" in metrics else block
        for d, m in per.items():
            if datasets is None or d in datasets:
                rows.append({"dataset": d, "role": role, "levels": levels, "split": split, "acc1": float(m["acc1"]),
                             "acc5": float(m["acc5"]), "epochs": int(metrics["epochs"]), "seed": seed})
    return rows


@dataclass
class Stage:
    """One unit of a pipeline run: ``build(ctx)`` returns its artifact; the rest says how to report it."""

    label: str
    role: str
    levels: str
    build: Callable[[Context], Artifact]
    datasets: list[str] | None = None
    """Report only these datasets of a multi-dataset artifact (per-target joint teachers)."""
    seed: int = 0
    """The run seed whose spec (:meth:`PipelineSpec.for_seed`) ``build`` is given."""


def plan_stages(spec: PipelineSpec) -> list[Stage]:
    """The ordered stages of a pipeline run."""
    names = [d.name for d in spec.datasets]
    students = spec.only_students or names
    stages = [Stage(f"teacher {n}", "dataset_specific", "-", lambda ctx, n=n: train_teacher(ctx, n)) for n in names]
    groups = spec.baseline_groups()
    for mode, on in (("multi_head", spec.baselines.multi_head), ("joint_head", spec.baselines.joint_head)):
        if not on:
            continue
        for model, cols in groups:  # one baseline per distinct student architecture, reported in its columns
            label = mode if len(groups) == 1 else f"{mode} {model.arch} ({', '.join(cols)})"
            stages.append(Stage(label, mode, "-", lambda ctx, mode=mode, n=cols[0]: train_baseline(ctx, mode, n),
                                None if len(groups) == 1 else cols))
    controls = [None] + [c for c, on in (("own_teacher", spec.controls.own_teacher), ("no_kd", spec.controls.no_kd))
                         if on]
    for level in spec.fusion_levels:
        lv = f"L{level}"
        if spec.joint.variant == "union":
            stages.append(Stage(f"joint teacher {lv}", "joint_teacher", lv,
                                lambda ctx, level=level: train_joint(ctx, plan_for(ctx, level))))
        else:
            stages += [Stage(f"joint teacher {lv} for {n}", "joint_teacher", lv,
                             lambda ctx, level=level, n=n: train_joint(ctx, plan_for(ctx, level, n)), [n])
                       for n in students]
        for control in controls:
            role = "student" if control is None else f"student_{control}"
            stages += [Stage(f"{role} {n} {lv}", role, lv,
                             lambda ctx, n=n, level=level, control=control: train_student(ctx, n, level, control))
                       for n in students]
    return stages


def preflight(spec: PipelineSpec) -> None:
    """Every check that can fail before compute: datasets readable, models buildable, fusion levels available.

    Raises SpecError naming the field.
    """
    from mlfd.data import load_dataset
    from mlfd.models import LevelModel, create_model

    spec.validate()  # again, now that mlfd.data and mlfd.models have registered the source and arch checks
    top = max(spec.fusion_levels)
    distilled = [c for c in range(1, top + 1) if spec.student.beta(c) > 0]
    for i, d in enumerate(spec.datasets):
        data = load_dataset(d)
        path = f"pipeline.datasets[{i}]"
        LevelModel(create_model(d.model, data.num_classes, f"{path}.model"), d.model.input_size).check_levels(
            spec.fusion_levels, f"{path}.model (fusion_levels)")
        s_levels = [c for c in range(1, top + 1) if spec.student_for(d.name).beta(c) > 0]
        if d.student_model is not None or s_levels != distilled:
            where = f"{path}.student_model" if d.student_model is not None else f"{path}.model"
            LevelModel(create_model(d.student_net, data.num_classes, where), d.student_net.input_size).check_levels(
                s_levels, f"{where} (student.betas)")
    if spec.baselines.model is not None:
        create_model(spec.baselines.model, 2, "pipeline.baselines.model")


def run_pipeline(spec: PipelineSpec, out: Path, store: Path | None = None, progress: bool = True,
                 log: Callable[..., None] | None = None) -> pd.DataFrame:
    """Run what is missing of ``spec`` and write ``out/results.parquet``, ``out/results.md`` and the resolved spec.

    Every stage runs once per run seed in ``spec.seeds``, with that seed's spec (:meth:`PipelineSpec.for_seed`): the
    artifacts of different seeds have different keys, the data splits are the same.

    Args:
        store: artifact store directory (default ``out/store``); share it between runs to reuse stage outputs.
        log: called as ``log(stage, artifact, rows, curves)`` after each stage (MLflow tracking hooks in here).
    """
    out = Path(out).resolve()
    artifacts = ArtifactStore(store or out / "store")
    save_pipeline(spec, out / "pipeline.yaml")
    runs = []  # (stage, its seed's context): every stage of seed 0, then of seed 1, ...
    for seed in spec.seeds:
        ctx = Context(spec=spec.for_seed(seed), store=artifacts, progress=progress)
        for st in plan_stages(ctx.spec):
            if len(spec.seeds) > 1:
                st.label = f"{st.label} [seed {seed}]"
            st.seed = seed
            runs.append((st, ctx))
    rows: list[dict] = []
    curves: list[dict] = []
    for i, (st, ctx) in enumerate(runs):
        if progress:
            _logger.info("[%d/%d] %s", i + 1, len(runs), st.label)
        art = st.build(ctx)
        metrics = read_metrics(art)
        stage_rows = _rows(metrics, st.role, st.levels, st.seed, st.datasets)
        stage_curves = [c for c in _curves(metrics, st.role, st.levels, st.seed)
                        if st.datasets is None or c["dataset"] in st.datasets]
        rows.extend(stage_rows)
        curves.extend(stage_curves)
        if log is not None:
            log(st, art, stage_rows, stage_curves)
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    write_results(df, pd.DataFrame(curves, columns=CURVE_COLUMNS), out)
    return df


def _parquet(df: pd.DataFrame, path: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def write_results(df: pd.DataFrame, curves: pd.DataFrame, out: Path) -> None:
    """results.parquet (one row per dataset x role x levels x split x run seed), curves.parquet (per epoch and
    seed), results.md (mean ± std (n) over seeds, :func:`mlfd.stages.results.results_table`)."""
    _parquet(df, out / "results.parquet")
    _parquet(curves, out / "curves.parquet")
    atomic_write_text(out / "results.md", results_table(df) + "\n")
