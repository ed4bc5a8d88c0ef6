"""A search, as the user writes it and as ``mlfd tune`` prepared it.

* :class:`JobSpec` is a tune job file (``tune_jobs/*.yaml``): what to search, how, where results go.
* :class:`SearchPlan` is a prepared search: the validated job, the pipeline its trials start from, the resolved
  paths. ``mlfd tune`` writes it to ``OUT/search.json`` before any trial runs; ``--resume``, tracking, ``mlfd report``
  and ``mlfd export`` read it back from there.

Both sit beside :mod:`mlfd.config` (layer 0): every layer that handles a search reads the same typed object.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional, Union

from mlfd.config import (SEARCHED_STAGES, PipelineSpec, _check, apply_overrides, from_dict, read_yaml, spec_hash,
                         to_dict)
from mlfd.errors import SpecError
from mlfd.fileio import atomic_write_text

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
    """Seed of the Optuna TPE sampler (study i uses seed + i)."""
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
    points_to_evaluate: list = field(default_factory=list)
    """Flat configs (names of the space) each study tries first, e.g. the paper's Table 1 defaults as a reference."""
    set: list = field(default_factory=list)
    """Pipeline overrides (key=value) applied before the search."""
    smoke: dict = field(default_factory=dict)
    """Overrides of this job's own fields for --smoke (e.g. num_samples); its ``set`` list overrides the pipeline's
    smoke variant (the same small-data variant as ``mlfd run --smoke``)."""

    def gpu_fraction(self) -> float:
        """The GPU fraction of one trial as written (``auto`` is resolved when the search is prepared: 0 here)."""
        return 0.0 if self.resources.gpu == "auto" else float(self.resources.gpu)

    def validate(self, path: str) -> None:
        _check(self.num_samples >= 1, f"{path}.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent_trials >= 1, f"{path}.max_concurrent_trials",
               f"must be >= 1, got {self.max_concurrent_trials}")
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


SEARCH_FILE = "search.json"
"""The prepared search in an output directory (``OUT/search.json``)."""


@dataclass
class SearchPlan:
    """A prepared search: everything its studies and trials need, validated before any compute.

    Written once to ``OUT/search.json`` (:meth:`save`) when the search claims its output directory, read back with
    :meth:`load` by ``--resume`` (which compares :meth:`fingerprint`), tracking, ``mlfd report`` and ``mlfd export``.
    """

    job: JobSpec
    """The validated job (with ``--smoke`` and ``--set`` applied)."""
    pipeline: dict
    """The pipeline mapping every trial starts from (job ``set`` and the smoke variant applied); a trial applies its
    sampled values to it (``mlfd.tune.spaces.apply_config``). See :attr:`spec` for the parsed form."""
    studies: list
    """One entry per study: a dataset name, or None for a stage with a single study (joint, baselines)."""
    job_file: str
    pipeline_file: str
    space_file: str
    """Absolute paths of the job, pipeline and search-space files."""
    storage_path: str
    """Ray Tune's storage (absolute path or URI)."""
    store: str
    """The artifact store shared by every trial and study."""
    tracking_uri: str
    """MLflow tracking URI."""
    smoke: bool = False
    """Whether this is the ``--smoke`` variant."""
    gpu: float = 0.0
    """GPU fraction of one trial (the job's, or the one ``gpu: auto`` resolved to; see mlfd.tune.packing)."""

    @cached_property
    def spec(self) -> PipelineSpec:
        """:attr:`pipeline` parsed (it was validated when the search was prepared)."""
        return from_dict(PipelineSpec, self.pipeline, validate=False)

    def study_key(self, study: str | None) -> str:
        """A study's name in tables, tags and file names: the dataset, or the stage for a single study."""
        return study or self.job.stage

    def experiment_name(self, study: str | None) -> str:
        """The study's Ray Tune experiment name (a folder of :attr:`storage_path`)."""
        return f"{self.job.name}-{self.study_key(study)}"

    def fingerprint(self) -> str:
        """Hash of what makes two searches the same search (``--resume`` refuses a different one)."""
        return spec_hash({"job": to_dict(self.job), "pipeline": self.pipeline, "studies": self.studies})

    def to_dict(self) -> dict[str, Any]:
        return {"job": to_dict(self.job), "job_file": self.job_file, "pipeline": self.pipeline,
                "pipeline_file": self.pipeline_file, "space_file": self.space_file, "studies": list(self.studies),
                "storage_path": self.storage_path, "store": self.store, "tracking_uri": self.tracking_uri,
                "smoke": self.smoke, "gpu": self.gpu}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = SEARCH_FILE) -> "SearchPlan":
        """The plan a :meth:`to_dict` mapping describes; SpecError naming a missing or invalid field."""
        missing = [k for k in ("job", "pipeline", "studies", "job_file", "pipeline_file", "space_file",
                               "storage_path", "store", "tracking_uri") if k not in data]
        if missing:
            raise SpecError(f"{path}: not a search plan written by mlfd tune (missing {', '.join(missing)})")
        job = from_dict(JobSpec, data["job"], path=f"{path}: job")
        return cls(job=job, pipeline=data["pipeline"], studies=list(data["studies"]), job_file=data["job_file"],
                   pipeline_file=data["pipeline_file"], space_file=data["space_file"],
                   storage_path=data["storage_path"], store=data["store"], tracking_uri=data["tracking_uri"],
                   smoke=bool(data.get("smoke", False)), gpu=float(data.get("gpu", job.gpu_fraction())))

    def save(self, out: Path) -> Path:
        """Write ``OUT/search.json`` (atomically), with the fingerprint ``--resume`` compares."""
        f = Path(out) / SEARCH_FILE
        atomic_write_text(f, json.dumps({**self.to_dict(), "fingerprint": self.fingerprint()}, indent=1, default=str))
        return f

    @classmethod
    def load(cls, out: Path) -> "SearchPlan":
        """The plan of the search in ``out``; SpecError when there is none or it is unreadable."""
        f = Path(out) / SEARCH_FILE
        if not f.is_file():
            raise SpecError(f"{out}: no search here ({SEARCH_FILE} missing; `mlfd tune JOB --out {out}` writes it)")
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise SpecError(f"{f}: not readable JSON ({e})") from None
        return cls.from_dict(data, str(f))

    @staticmethod
    def saved_fingerprint(out: Path) -> str | None:
        """The fingerprint recorded in ``OUT/search.json`` (None when absent)."""
        try:
            return json.loads((Path(out) / SEARCH_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError):
            return None


__all__ = ["JobSpec", "SchedulerSpec", "ResourcesSpec", "SearchPlan", "SEARCH_FILE", "STAGES", "load_job", "resolve",
           "SpecError"]
