"""What a finished study's trials are: their rows of ``OUT/trials.parquet`` (values, status, nodes, memory retries,
Pareto front), the best trial, and the export of a trial as a standalone pipeline YAML."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from mlfd.config import PipelineSpec, dump_yaml, from_dict
from mlfd.errors import SpecError
from mlfd.search import SEARCH_FILE, JobSpec, SearchPlan
from mlfd.store import atomic_write_bytes, atomic_write_text

def trial_threads(job: JobSpec) -> int:
    """torch threads of a trial (and of the teacher tasks): its CPUs."""
    return max(1, int(job.resources.cpu))


def recorded_metrics(job: JobSpec) -> dict[str, str]:
    """Metric -> direction of the ``best/<metric>`` and ``final/<metric>`` columns of trials.parquet: the objectives,
    the metrics the constraints name, the student costs (mlfd.stages.pareto.metric_direction)."""
    from mlfd.stages.pareto import metric_direction, objectives

    objs = objectives(job.metrics, job.modes)
    names = [*job.metrics, *job.constraints, *job.cost_metrics]
    return {m: metric_direction(m, objs, job.constraints) for m in dict.fromkeys(names)}


def trial_rows(results, study: str | None, job: JobSpec, max_epochs: int) -> list[dict]:
    """One row per trial of a finished study; with several objectives, ``is_pareto`` (and with constraints,
    ``feasible``) from mlfd.stages.pareto."""
    rows = []
    recorded = recorded_metrics(job)
    for r in results:
        cfg = dict(r.config or {})
        hist = r.metrics_dataframe
        values = {}
        for metric, direction in recorded.items():
            col = hist[metric] if hist is not None and metric in hist else None
            values[f"final/{metric}"] = (float(r.metrics[metric]) if r.metrics and metric in r.metrics
                                         else float("nan"))
            values[f"best/{metric}"] = (float("nan") if col is None or col.isna().all() else
                                        float(col.max() if direction == "max" else col.min()))
        epochs = int(r.metrics.get("training_iteration", 0)) if r.metrics else 0
        if r.error is not None:
            status, error = "ERROR", f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300]}"
        else:
            status, error = ("TERMINATED" if epochs >= max_epochs else "STOPPED"), ""
        rows.append({"study": study or job.stage, "trial_id": str((r.metrics or {}).get("trial_id") or
                                                                  Path(r.path).name), "status": status,
                     "epochs": epochs, **values, "error": error,
                     "path": r.path, "trial_index": trial_index(r), **trial_nodes(r), **trial_memory(r),
                     **{f"config/{k}": v for k, v in sorted(cfg.items())}})
    return mark_front(rows, job)


def mark_front(rows: list[dict], job: JobSpec) -> list[dict]:
    """Add ``is_pareto`` (several objectives) and ``feasible`` (constraints) to one study's rows."""
    from mlfd.stages.pareto import feasible_mask, objectives, pareto_mask

    if not rows or not (job.multi_objective or job.constraints):
        return rows
    df = pd.DataFrame(rows)
    if job.multi_objective:
        df["is_pareto"] = pareto_mask(df, objectives(job.metrics, job.modes), job.constraints)
    if job.constraints:
        df["feasible"] = feasible_mask(df, job.constraints)
    return [{**row, **{k: bool(df.at[i, k]) for k in ("is_pareto", "feasible") if k in df}}
            for i, row in enumerate(rows)]


def trial_nodes(result) -> dict:
    """Where a trial ran: ``node`` (Ray node id of its last report), ``node_ip``, ``hostname``, and ``nodes``, every
    node it reported from in order (two for a trial retried elsewhere after its node was lost)."""
    from mlfd.tune.trainable import NODE_KEY

    m, hist = result.metrics or {}, result.metrics_dataframe
    seen = list(dict.fromkeys(hist[NODE_KEY].dropna())) if hist is not None and NODE_KEY in hist else []
    last = m.get(NODE_KEY) or (seen[-1] if seen else "")
    return {"node": str(last), "node_ip": str(m.get("node_ip") or ""), "hostname": str(m.get("hostname") or ""),
            "nodes": ",".join(map(str, seen or ([last] if last else [])))}


def trial_memory(result) -> dict:
    """What a trial says about its memory (:data:`mlfd.tune.trainable.MEMORY_KEYS`): ``oom_retries`` (1: it ran out
    of memory and was retried with a micro-batch, also when the retry failed too), ``micro_batch_size`` and
    ``accum_steps`` of the recipe it trained last (None: it never reported)."""
    from mlfd.tune.trainable import MEMORY_KEYS, RETRY_FAILED

    m = result.metrics or {}
    row = {k: (int(m[k]) if m.get(k) is not None else None) for k in MEMORY_KEYS}
    retried_and_failed = result.error is not None and RETRY_FAILED in str(result.error)
    row["oom_retries"] = 1 if retried_and_failed else (row["oom_retries"] or 0)
    return row


def oom_retried(row: pd.Series) -> bool:
    """Whether the trial of trials.parquet ``row`` trained with the micro-batch of an out-of-memory retry."""
    retries = row.get("oom_retries")
    return not (retries is None or pd.isna(retries) or int(retries) == 0 or pd.isna(row.get("micro_batch_size")))


def retried_spec(spec: PipelineSpec, stage: str, row: pd.Series) -> PipelineSpec:
    """``spec`` as the trial of trials.parquet ``row`` trained it: with the micro-batch and accumulation steps of its
    out-of-memory retry, if it had one (:func:`mlfd.stages.trial.micro_batched`), else as it is."""
    from mlfd.stages.trial import micro_batched

    if not oom_retried(row):
        return spec
    study = row["study"] if stage in ("students", "teachers") else None
    return micro_batched(spec, stage, study, int(row["micro_batch_size"]), int(row["accum_steps"]))


def trial_index(result) -> int | None:
    """Ray's creation order of a trial in its study (1, 2, ...; kept across --resume): the counter that starts the
    trial's experiment tag (``3_fusion_level=2,...``), which Ray also puts in the trial directory's name
    (``run_stage_<8 hex id>_3_fusion_level=2,..._<date>``), read from there when the trial never reported."""
    tag = str((result.metrics or {}).get("experiment_tag") or "")
    m = re.match(r"(\d+)_", tag) or re.match(r".*?_[0-9a-f]{8}_(\d+)_", Path(result.path).name)
    return int(m.group(1)) if m else None


def write_trials(out: Path, rows: list[dict]) -> None:
    import io

    df = pd.DataFrame(rows)
    # The same columns in the same order whatever order Ray returns the trials in (conditional params appear only in
    # some rows): the trial's own columns, then its sampled params sorted by name.
    df = df[[c for c in df.columns if not c.startswith("config/")] + sorted(c for c in df.columns
                                                                            if c.startswith("config/"))]
    for c in df.columns:  # parquet wants one type per column; sampled categoricals may mix int/str
        if df[c].dtype == object and c.startswith("config/"):
            df[c] = df[c].map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out / "trials.parquet", buf.getvalue())


def best_row(df: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best trial of a study: among trials that ran every epoch (reproducible by a rerun) if any, else all;
    among those, feasible ones first (a ``feasible`` column: the job has constraints)."""
    col = f"best/{metric}"
    ok = df[df["status"] != "ERROR"].dropna(subset=[col]) if len(df) else df
    if not len(ok):
        return None
    if "feasible" in ok.columns and ok["feasible"].astype(bool).any():
        ok = ok[ok["feasible"].astype(bool)]
    full = ok[ok["status"] == "TERMINATED"]
    pool = full if len(full) else ok
    return pool.loc[pool[col].idxmax() if mode == "max" else pool[col].idxmin()]


def config_cell(v: Any) -> Any:
    """A trials.parquet config cell as the sampled value (mixed-type categoricals are stored as JSON text)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v.item() if hasattr(v, "item") else v


def trial_config(row: pd.Series) -> dict:
    """The sampled values of one trials.parquet row (params a trial did not sample are left out)."""
    return {k[len("config/"):]: config_cell(v) for k, v in row.items()
            if k.startswith("config/") and config_cell(v) is not None}


def export_best(out: Path, study: str | None, dest: Path, pick: str | None = None) -> Path:
    """Write the best trial of ``study`` in search ``out`` (or the one ``pick`` names: ``pareto:K``, or conditions
    such as ``student/params<=1e6``; see mlfd.stages.pareto) as a standalone pipeline YAML and return its path."""
    from mlfd.stages.pareto import objectives, parse_pick, pick_row
    from mlfd.tune.spaces import apply_config

    chosen = parse_pick(pick) if pick is not None else None  # a bad --pick fails before anything is read
    out = Path(out)
    if not (out / SEARCH_FILE).is_file() or not (out / "trials.parquet").is_file():
        raise SpecError(f"{out}: no finished search here ({SEARCH_FILE} and trials.parquet are needed)")
    plan = SearchPlan.load(out)
    job = plan.job
    df = pd.read_parquet(out / "trials.parquet")
    studies = list(dict.fromkeys(df["study"]))
    study = study or studies[0]
    if study not in studies:
        raise SpecError(f"--study: unknown study {study!r}; allowed: {studies}")
    rows = df[df["study"] == study]
    if chosen is not None and chosen.pareto is not None and not job.multi_objective:
        raise SpecError(f"--pick {pick}: this search has one objective ({job.objective}), so no Pareto front; "
                        "pick by conditions (e.g. 'student/params<=1e6'), or leave --pick out for the best trial")
    if chosen is not None:
        best = pick_row(rows, chosen, objectives(job.metrics, job.modes), job.constraints, study=study)
    else:
        best = best_row(rows, job.objective, job.objective_mode)
    if best is None:
        raise SpecError(f"{out}: study {study!r} has no successful trial to export")
    config = trial_config(best)
    pipeline = copy.deepcopy(apply_config(plan.pipeline, config))
    if job.stage == "students":
        pipeline["only_students"] = [study]
    pipeline["controls"] = {"own_teacher": False, "no_kd": False}
    pipeline["baselines"] = dict(pipeline.get("baselines") or {}, multi_head=job.stage == "multi_head",
                                 joint_head=job.stage == "joint_head")
    spec = retried_spec(from_dict(PipelineSpec, pipeline, path="export"), job.stage, best)
    retried = (f"# the trial ran out of memory and was retried with micro-batch {int(best['micro_batch_size'])} x "
               f"{int(best['accum_steps'])} accumulation steps; so does this pipeline\n" if oom_retried(best) else "")
    what = f"Trial {best['trial_id']} (--pick {pick})" if pick is not None else f"Best trial {best['trial_id']}"
    values = ", ".join(f"{m} = {best[f'best/{m}']:.6g}" for m in recorded_metrics(job) if f"best/{m}" in best)
    header = (f"# {what} of study {study!r} ({job.stage}) from {out}\n"
              f"# {values} (best epoch, val); sampled: {json.dumps(config)}\n"
              f"{retried}"
              # CPU kernels split reductions by thread count; a trial ran with resources.cpu torch threads.
              f"# the same numbers on CPU: OMP_NUM_THREADS={trial_threads(job)} mlfd run {Path(dest).name}\n")
    atomic_write_text(Path(dest), header + dump_yaml(spec))
    return Path(dest)
