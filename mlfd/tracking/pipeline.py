"""``mlfd run`` tracking: one parent run per pipeline run, one child per stage and run seed."""

from __future__ import annotations

from pathlib import Path

from mlfd.config import to_dict
from mlfd.tracking.client import (TAG_DATASET, TAG_LEVEL, TAG_PARENT, TAG_ROLE, TAG_SEED, TAG_STAGE, Tracker, flatten,
                                  git_commit)


class PipelineTracking:
    """``mlfd run`` logging: one parent run, one child per stage and run seed (tag ``mlfd.seed``; with several seeds
    the child's name ends in ``[seed s]``) with its epoch curves and final val/test metrics."""

    def __init__(self, tracking_uri: str, spec, out: Path):
        Tracker.check_reachable(tracking_uri)
        self.tracker = Tracker(tracking_uri, spec.name, Path(out) / "mlflow_pending.jsonl")
        self.out = Path(out)
        tags = {TAG_STAGE: "pipeline"}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self.parent = self.tracker.start_run(f"run-{spec.name}", tags)
        self.tracker.log_params(self.parent, flatten(to_dict(spec)))

    def log_stage(self, stage, art, rows: list[dict], curves: list[dict]) -> None:
        t = self.tracker
        tags = {TAG_PARENT: self.parent, TAG_ROLE: stage.role, TAG_STAGE: stage.label, TAG_SEED: str(stage.seed),
                "mlfd.artifact": art.key}
        if stage.levels != "-":
            tags[TAG_LEVEL] = stage.levels[1:]
        if "cache_on_device" in art.meta():  # joint teachers: were the feature caches read whole on the device?
            tags["mlfd.cache_on_device"] = str(art.meta()["cache_on_device"]).lower()
        datasets = sorted({r["dataset"] for r in rows})
        if len(datasets) == 1:
            tags[TAG_DATASET] = datasets[0]
        rid = t.start_run(stage.label, tags, reuse={TAG_PARENT: self.parent, TAG_STAGE: stage.label})
        by_epoch: dict[int, dict[str, float]] = {}
        for c in curves:
            name = c["metric"] if len(datasets) == 1 or c["dataset"] == "all" else f"{c['metric']}/{c['dataset']}"
            by_epoch.setdefault(c["epoch"], {})[name] = c["value"]
        for epoch, m in sorted(by_epoch.items()):
            t.log_metrics(rid, m, step=epoch)
        final = {}
        for r in rows:
            sfx = "" if len(datasets) == 1 else f"/{r['dataset']}"
            final[f"{r['split']}/acc1{sfx}"] = r["acc1"]
            final[f"{r['split']}/acc5{sfx}"] = r["acc5"]
        t.log_metrics(rid, {f"best/{k}" if k.startswith("val/") else k: v for k, v in final.items()},
                      step=max(by_epoch) if by_epoch else 0)
        t.end_run(rid)

    def finish(self, files: dict[str, Path] | None = None, status: str = "FINISHED") -> None:
        t = self.tracker
        for name in ("results.parquet", "results.md", "pipeline.yaml"):
            if (self.out / name).is_file():
                t.log_artifact(self.parent, self.out / name)
        for p in (files or {}).values():
            t.log_artifact(self.parent, p, "report")
        t.end_run(self.parent, status)
