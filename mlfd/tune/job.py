"""Tune job files (``tune_jobs/*.yaml``): what to search, how, where results go."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from mlfd.config import SEARCHED_STAGES, _check, apply_overrides, from_dict, read_yaml
from mlfd.errors import SpecError

STAGES = SEARCHED_STAGES


@dataclass
class SchedulerSpec:
    """Trial scheduler: ASHA (default), HyperBand or none (FIFO)."""

    type: Literal["asha", "hyperband", "none"] = "asha"
    grace_period: int = 2
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 2

    def validate(self, path: str) -> None:
        _check(self.grace_period >= 1, f"{path}.grace_period", f"must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor >= 2, f"{path}.reduction_factor", f"must be >= 2, got {self.reduction_factor}")


@dataclass
class ResourcesSpec:
    """Ray resources per trial."""

    cpu: float = 1.0
    gpu: Union[float, str] = 0.0
    """A fraction such as 0.25 (4 trials per GPU), 0, or 'auto' (fraction from the measured peak memory)."""

    def validate(self, path: str) -> None:
        _check(self.cpu > 0, f"{path}.cpu", f"must be > 0, got {self.cpu}")
        if isinstance(self.gpu, str):
            _check(self.gpu == "auto", f"{path}.gpu", f"must be a number in [0, 8] or 'auto', got {self.gpu!r}")
        else:
            _check(0 <= self.gpu <= 8, f"{path}.gpu", f"must be a number in [0, 8] or 'auto', got {self.gpu}")
            _check(self.gpu <= 1 or float(self.gpu).is_integer(), f"{path}.gpu",
                   f"fractions are allowed only below 1, got {self.gpu}")


@dataclass
class JobSpec:
    """One search: a pipeline, the stage whose trials are searched, a space, and how to run it."""

    pipeline: str
    """Pipeline YAML (relative paths are relative to the job file)."""
    space: str
    """Search space YAML (relative to the job file)."""
    name: str = "mlfd-search"
    """MLflow experiment name and Ray experiment prefix."""
    stage: Literal["students", "joint", "teachers", "multi_head", "joint_head"] = "students"
    studies: Optional[list] = None
    """Datasets to run one study each for (students/teachers; default all). joint/baselines have one study."""
    metric: str = "val/acc1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8
    """Trials per study."""
    seed: int = 0
    """Seed of the Optuna TPE sampler (study i uses seed + i; the k-th ``--extend`` of it seed + i + 1000 k)."""
    startup_trials: int = 10
    """Trials TPE samples at random before it models the results (Optuna's ``n_startup_trials``); the earlier trials
    that ``--extend`` and ``--warm-start`` seed the sampler with count."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_concurrent_trials: int = 2
    max_failures: int = 1
    """Retries of a trial whose worker died (from its last checkpoint)."""
    reuse_actors: bool = True
    """Run later trials in the worker processes of finished ones (Ray Tune's ``reuse_actors``): no new process, no
    new imports, datasets already in memory. Trials of one study have the same resources, so every worker fits."""
    storage_path: Optional[str] = None
    """Ray Tune storage (absolute; default OUT/ray). Must be shared storage on a multi-node cluster."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI (default sqlite:///OUT/mlflow.db)."""
    store: Optional[str] = None
    """Artifact store directory shared by all trials (default OUT/store)."""
    optuna_storage: Optional[str] = None
    """Optuna RDB storage URL of the search's persistent studies, one per study, named ``<name>-<study>`` (default
    sqlite:///OUT/optuna.db). SQLite's file locks are unsafe on NFS: on a cluster give a database server, e.g.
    postgresql://user:password@host/db (the driver alone writes to it)."""
    points_to_evaluate: list = field(default_factory=list)
    """Flat configs (names of the space) each study tries first, e.g. the paper's Table 1 defaults as a reference."""
    set: list = field(default_factory=list)
    """Pipeline overrides (key=value) applied before the search."""
    smoke: dict = field(default_factory=dict)
    """Overrides of this job's own fields for --smoke (e.g. num_samples); its ``set`` list overrides the pipeline's
    smoke variant (the same small-data variant as ``mlfd run --smoke``)."""

    def validate(self, path: str) -> None:
        _check(self.num_samples >= 1, f"{path}.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent_trials >= 1, f"{path}.max_concurrent_trials",
               f"must be >= 1, got {self.max_concurrent_trials}")
        _check(self.startup_trials >= 1, f"{path}.startup_trials", f"must be >= 1, got {self.startup_trials}")
        _check(self.optuna_storage is None or "://" in self.optuna_storage, f"{path}.optuna_storage",
               f"must be a database URL such as sqlite:////abs/path/optuna.db or postgresql://host/db, "
               f"got {self.optuna_storage!r}")
        _check(self.max_failures >= 0, f"{path}.max_failures", f"must be >= 0, got {self.max_failures}")
        _check(self.metric.startswith(("val/", "train/")), f"{path}.metric",
               f"must be a reported metric such as val/acc1, val/acc5, val/loss; got {self.metric!r}")
        for k in ("storage_path", "store"):
            v = getattr(self, k)
            _check(v is None or Path(v).is_absolute() or "://" in v, f"{path}.{k}",
                   f"must be an absolute path, got {v!r}")
        self.scheduler.validate(f"{path}.scheduler")
        self.resources.validate(f"{path}.resources")


def load_job(path: str | Path, smoke: bool = False, overrides: list[str] | None = None) -> tuple[JobSpec, Path]:
    """Load and validate a job file; returns the spec and the job file's directory (for relative paths).

    ``overrides`` are ``key=value`` items: keys of the job (``num_samples=4``, ``resources.gpu=0``) or of the pipeline
    with a ``pipeline.`` prefix (``pipeline.student.recipe.epochs=3``).
    """
    data = read_yaml(path)
    if smoke:
        extra = data.get("smoke") or {}
        _check(isinstance(extra, dict), f"{path}: smoke", "expected a mapping of job fields")
        data = copy.deepcopy(data)
        for k, v in extra.items():
            if k != "set":  # smoke.set is applied to the pipeline after its smoke variant (launch.prepare)
                data[k] = v
    job_over = [o for o in overrides or [] if not o.startswith("pipeline.")]
    pipe_over = [o[len("pipeline."):] for o in overrides or [] if o.startswith("pipeline.")]
    data = apply_overrides(data, job_over)
    data["set"] = list(data.get("set") or []) + pipe_over
    spec = from_dict(JobSpec, data, path=str(path))
    return spec, Path(path).resolve().parent


def resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


__all__ = ["JobSpec", "SchedulerSpec", "ResourcesSpec", "STAGES", "load_job", "resolve", "SpecError"]
