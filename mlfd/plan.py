"""``mlfd plan``: what a pipeline run would build, what the store already holds, and what each stage would cost.

Nothing is trained. The stages come from :func:`mlfd.stages.pipeline.plan_stages` (the list ``mlfd run`` walks) and
their artifact keys from the stage functions themselves: each stage's ``build`` runs against a store that records the
first key asked for and stops there. Costs come from a *probe*: every dataset cut to a few batches (or replaced by
random uint8 images of its declared size with ``synthetic``), the real stage code run on it in a throwaway store with
one epoch per recipe, and a few timed steps of each stage's task:

* feature caches: the real cache build gives each cache's per-sample shape (one batch), so a cache's size is
  ``images x prod(shape) x 2`` bytes (float16); extraction speed is timed on forward-only batches of the frozen
  teacher;
* trained stages: a few optimizer steps of the stage's own task (data, augmentation, forward, backward) give
  images/s, and a pass over the probe's val split gives the evaluation speed;
* peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the probe, on a CPU the growth of the process's
  peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). The probe's own data is
  swapped for what the stage holds whole at full size: its images (unless streamed from files), the feature caches
  of a joint teacher (unless it reads them out of core: ``joint.cache_on_device``) or a student's cached targets;
* a batch that would not fit the memory budget (the device's, or ``--memory``) is measured smaller and its peak
  extrapolated to the full batch (:meth:`Planner._probe`), so a plan never dies of the batch it warns about;
* ``--probe-batch N`` measures every trained stage but the joint teacher at batch N at most, the same way (a quick
  plan of a paper-scale file on a CPU: the probe's data, and so the caches' probe, shrink with it). Its images/s are
  those of batch N, which can differ either way from the full batch's (``bench/probe_batch.py``).

The estimates are ``images x epochs / (images/s)`` plus the evaluation passes ``fit`` makes (val every epoch, test
once); they leave out early stops, loading the data before the first step, a student's pass of T* over its cached
features (small against its training), and other work on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlfd.config import DatasetSpec, PipelineSpec, SpecError
from mlfd.data import DatasetSplits, FileImages, ImageSet, load_dataset
from mlfd.engine import autocast, resolve_device
from mlfd.stages import teachers as teacher_stage
from mlfd.stages.baselines import SharedTask, baseline_key, baseline_model
from mlfd.stages.cache import build_cache, cache_key
from mlfd.stages.common import EVAL_BATCH, SPLITS, Context, load_frozen
from mlfd.stages.joint import JointPlan, JointTask, joint_key, plan_for
from mlfd.stages.measure import PeakMemory, ProbeContext as _ProbeContext, SavedBytes, probe_data, probe_spec
from mlfd.stages.measure import seed_teachers
from mlfd.stages.measure import sync as _sync, time_eval, time_train_steps
from mlfd.stages.pipeline import Stage, plan_stages
from mlfd.stages.students import StudentTask, student_key, student_variant
from mlfd.stages.teachers import ClassifierTask, teacher_key
from mlfd.store import ArtifactStore

_logger = logging.getLogger(__name__)

FEATURE_BYTES = 2
"""Bytes per cached feature value (float16)."""

TARGET_BYTES = 4
"""Bytes per value of a student's cached joint-teacher targets once on the device (float32)."""


@dataclass(frozen=True)
class KnownDataset:
    """What ``--synthetic`` assumes of a dataset it does not read."""

    train: int
    """Images in the source's train split (its only split when ``test`` is None)."""
    test: int | None
    """Images in the source's test split; None: carved from train (``test_fraction``)."""
    classes: int
    image_size: int | None
    """Side of the source's images; None: the model's input size."""
    channels: int = 3
    val: int | None = None
    """Images in the source's val split; None: carved from train (``val_fraction``)."""


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "torchvision:CIFAR10": KnownDataset(50_000, 10_000, 10, 32),
    "torchvision:CIFAR100": KnownDataset(50_000, 10_000, 100, 32),
    "torchvision:MNIST": KnownDataset(60_000, 10_000, 10, 28, 1),
    "torchvision:FashionMNIST": KnownDataset(60_000, 10_000, 10, 28, 1),
    "torchvision:SVHN": KnownDataset(73_257, 26_032, 10, 32),
    "fashion_mnist": KnownDataset(60_000, 10_000, 10, 28, 1),
    "mnist5k": KnownDataset(5_000, None, 10, 28, 1),
    "sklearn_digits": KnownDataset(1_797, None, 10, 8, 1),
    # TinyImageNet as distributed: 500 train images per class; its labelled val split serves as test (the paper).
    "tinyimagenet": KnownDataset(100_000, 10_000, 200, 64),
    "imagenet_sketch": KnownDataset(50_889, None, 1_000, None),
}
"""Image counts per source (``source`` or ``source:name``; folders by the name of their root, see
:func:`known_dataset`). ``--count NAME=train:N,...`` overrides or completes an entry."""

_FOLDER_NAMES = (("tinyimagenet", re.compile(r"tiny.?imagenet", re.I)),
                 ("imagenet_sketch", re.compile(r"sketch", re.I)))
COUNT_KEYS = ("train", "val", "test", "classes", "image_size", "channels")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2,
          "gi": 1024 ** 3, "gib": 1024 ** 3, "ti": 1024 ** 4, "tib": 1024 ** 4}


def parse_memory(text: str) -> int:
    """``--memory`` as bytes: a positive number with an optional unit (decimal ``GB`` or binary ``GiB``), e.g.
    ``24GiB``, ``80GB``, ``512MiB``."""
    m = _SIZE.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise SpecError(f"--memory: {text!r} is not a size; allowed: a positive number with an optional unit "
                        f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def check_probe_batch(n: int | None) -> int | None:
    """``--probe-batch``: None, or a batch of at least two samples."""
    if n is not None and n < 2:
        raise SpecError(f"--probe-batch: must be >= 2 (batch norm trains on two or more samples), got {n}")
    return n


def parse_counts(items: list[str] | None) -> dict[str, dict[str, int]]:
    """``--count NAME=train:N,test:M,classes:C`` items as ``{name: {key: int}}``.

    Raises:
        SpecError: a malformed item or an unknown key.
    """
    out: dict[str, dict[str, int]] = {}
    for item in items or []:
        name, sep, rest = item.partition("=")
        if not sep or not name.strip():
            raise SpecError(f"--count {item}: expected NAME=KEY:N[,KEY:N...] with KEY in {', '.join(COUNT_KEYS)}")
        fields = out.setdefault(name.strip(), {})
        for part in rest.split(","):
            key, sep, value = part.partition(":")
            key = key.strip()
            if key not in COUNT_KEYS:
                raise SpecError(f"--count {item}: unknown key {key!r}; allowed: {', '.join(COUNT_KEYS)}")
            if not sep or not value.strip().isdigit() or int(value) < (0 if key in ("val", "test") else 1):
                raise SpecError(f"--count {item}: {key} needs a positive integer, got {value.strip()!r}")
            fields[key] = int(value)
    return out


def known_dataset(ds: DatasetSpec) -> KnownDataset | None:
    """The :data:`KNOWN_DATASETS` entry of a dataset spec, if any (a folder is known by its root's name)."""
    if ds.source == "torchvision":
        return KNOWN_DATASETS.get(f"torchvision:{ds.options.get('name')}")
    if ds.source in ("folder", "parquet"):
        where = str(ds.options.get("root") or ds.options.get("path") or "")
        for key, pattern in _FOLDER_NAMES:
            if pattern.search(Path(where).name) or pattern.search(where):
                return KNOWN_DATASETS[key]
        return None
    return KNOWN_DATASETS.get(ds.source)


@dataclass
class DataShape:
    """A dataset's split sizes and image geometry at full size."""

    name: str
    train: int
    val: int
    test: int
    classes: int
    channels: int
    image_size: tuple[int, int]
    streamed: bool = False
    """Images stay in their files (folder ``stream: true``): nothing is held whole."""

    def count(self, split: str) -> int:
        return int(getattr(self, split))

    @property
    def total(self) -> int:
        return self.train + self.val + self.test

    def image_bytes(self, split: str | None = None) -> int:
        """uint8 bytes of a split's images (all splits when None) as held in memory; 0 when streamed."""
        if self.streamed:
            return 0
        n = self.total if split is None else self.count(split)
        return n * self.channels * self.image_size[0] * self.image_size[1]


def synthetic_shape(ds: DatasetSpec, index: int, override: dict[str, int] | None = None) -> DataShape:
    """A dataset's split sizes without reading it: the known counts (or ``override``), carved as ``build_splits``
    carves them (test from train, then val from train, then the ``max_*`` caps, then the ``classes`` filter).

    Raises:
        SpecError: the dataset is not in :data:`KNOWN_DATASETS` and ``override`` does not give train and classes.
    """
    known = known_dataset(ds)
    values = {**(dataclasses.asdict(known) if known else {}), **(override or {})}
    if "train" not in values or "classes" not in values:
        raise SpecError(f"pipeline.datasets[{index}]: --synthetic does not know the image count of dataset "
                        f"{ds.name!r} (source {ds.source}); give it with --count {ds.name}=train:N,test:M,classes:C")
    size = values.get("image_size") or ds.options.get("image_size") or ds.model.input_size
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    train, test, val = int(values["train"]), values.get("test"), values.get("val")
    if test is None:
        test = round(float(ds.options.get("test_fraction", 0.2)) * train)
        train -= test
    if val is None:
        val = round(ds.val_fraction * train)
        train -= val
    counts = {"train": train, "val": int(val), "test": int(test)}
    classes = int(values["classes"])
    if ds.classes is not None:  # a class subset keeps about its share of every split
        counts = {k: round(v * len(ds.classes) / classes) for k, v in counts.items()}
        classes = len(ds.classes)
    for split, cap in (("train", ds.max_train), ("val", ds.max_val), ("test", ds.max_test)):
        if cap is not None:
            counts[split] = min(counts[split], cap)
    return DataShape(ds.name, counts["train"], counts["val"], counts["test"], classes,
                     int(values.get("channels", 3)), size, bool(ds.options.get("stream", False)))


def real_shape(data: DatasetSplits) -> DataShape:
    """A loaded dataset's split sizes and image geometry."""
    imgs = data.train.images
    return DataShape(data.name, len(data.train), len(data.val), len(data.test), data.num_classes, int(imgs.shape[1]),
                     (int(imgs.shape[2]), int(imgs.shape[3])), isinstance(imgs, FileImages))


def cache_bytes(data: DataShape, feature_shape: tuple[int, ...]) -> dict[str, int]:
    """Float16 bytes of a feature cache per split: images x prod(per-sample feature shape) x 2."""
    return {s: data.count(s) * math.prod(feature_shape) * FEATURE_BYTES for s in SPLITS}



def synthetic_data(shape: DataShape, n_train: int, n_eval: int, seed: int = 0) -> DatasetSplits:
    """Random uint8 images of ``shape``'s geometry, labels cycling over its classes."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> ImageSet:
        images = torch.randint(0, 256, (n, shape.channels, *shape.image_size), dtype=torch.uint8, generator=gen)
        return ImageSet(images, torch.arange(n, dtype=torch.int64) % shape.classes)

    return DatasetSplits(name=shape.name, classes=[str(i) for i in range(shape.classes)], train=split(n_train),
                         val=split(n_eval), test=split(n_eval), mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29))


# --------------------------------------------------------------------------------------------------------------------
# Stages and their keys
# --------------------------------------------------------------------------------------------------------------------


class _Recorded(Exception):
    """Raised by :class:`_KeyRecorder` to stop a stage at the first artifact it asks for."""

    def __init__(self, kind: str, key: str):
        super().__init__(kind, key)
        self.kind, self.key = kind, key


class _KeyRecorder(ArtifactStore):
    """A store that builds nothing: ``get_or_build`` reports the kind and key it was asked for."""

    def get_or_build(self, kind: str, key: str, build: Any, verify: bool = False) -> Any:
        raise _Recorded(kind, key)


def stage_artifact(stage: Stage, ctx: Context) -> tuple[str, str]:
    """(kind, key) of the artifact ``stage.build(ctx)`` returns, computed by the stage's own code without building."""
    try:
        stage.build(ctx)
    except _Recorded as r:
        return r.kind, r.key
    raise RuntimeError(f"stage {stage.label!r} asked the store for no artifact")


@dataclass
class Job:
    """What a stage trains, recovered from a :class:`Stage` and checked against its recorded key."""

    kind: str  # teacher | baseline | joint | student
    dataset: str | None = None
    level: int | None = None
    control: str | None = None
    mode: str | None = None
    plan: JointPlan | None = None


def stage_job(stage: Stage, ctx: Context, key: str) -> Job | None:
    """The job behind ``stage`` (dataset, level, control, joint plan), or None if it is not a shape this module knows
    (then the stage is listed but not measured). The job's key, computed by the stage modules' key functions, must be
    the key the stage's own ``build`` asked for."""
    role, lv = stage.role, stage.levels
    level = int(lv[1:]) if lv.startswith("L") and lv[1:].isdigit() else None
    job: Job | None = None
    if role == "dataset_specific" and stage.label.startswith("teacher "):
        job = Job("teacher", dataset=stage.label[len("teacher "):])
        ok = teacher_key(ctx, job.dataset) == key
    elif role in ("multi_head", "joint_head"):
        job = Job("baseline", dataset=stage.datasets[0] if stage.datasets else None, mode=role)
        ok = baseline_key(ctx, role, job.dataset) == key
    elif role == "joint_teacher" and level is not None:
        target = stage.datasets[0] if stage.datasets else None
        job = Job("joint", dataset=target, level=level, plan=plan_for(ctx, level, target))
        ok = joint_key(ctx, job.plan) == key
    elif role.startswith("student") and level is not None:
        control = role[len("student_"):] if role != "student" else None
        name = stage.label[len(role) + 1: -(len(lv) + 1)]
        plan = plan_for(ctx, level, name, own=control == "own_teacher")
        job = Job("student", dataset=name, level=level, control=control, plan=plan)
        ok = student_key(ctx, name, plan, student_variant(ctx, control, name)) == key
    else:
        return None
    if not ok:
        _logger.warning("plan: cannot tell what stage %r trains (its key differs); it is listed, not measured",
                        stage.label)
        return None
    return job


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------



def caches_on_device(spec: PipelineSpec, nbytes: int, budget: int) -> bool:
    """Whether a joint teacher holds its ``nbytes`` of caches whole on the device: ``joint.cache_on_device``, and for
    ``auto`` the rule of :func:`mlfd.stages.cache.place_caches` (at most ``cache_memory_fraction`` of ``budget``)."""
    j = spec.joint
    if j.cache_on_device == "auto":
        return nbytes <= j.cache_memory_fraction * budget
    return bool(j.cache_on_device)


# --------------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CachePlan:
    """One feature cache: a frozen teacher's level-k features over every split of one dataset."""

    teacher: str
    data: str
    level: int
    key: str
    stored: bool
    shape: tuple[int, ...] = ()
    bytes: dict[str, int] = field(default_factory=dict)
    """Planned float16 bytes per split: images x prod(shape) x 2."""
    images_per_s: float | None = None
    peak_bytes: int | None = None
    """Measured peak of the extraction (probe) plus the dataset's largest split of images."""
    seconds: float | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def label(self) -> str:
        return f"cache {self.teacher}->{self.data} L{self.level}"


@dataclass
class StagePlan:
    """One trained stage of the run, with what it would cost."""

    label: str
    role: str
    kind: str
    key: str
    stored: bool
    level: int | None = None
    batch_field: str = ""
    batch_size: int = 0
    images: int = 0
    """Training images per epoch."""
    epochs: int = 0
    eval_images: int = 0
    """Images evaluated over the whole stage (val every epoch, then val and test once)."""
    images_per_s: float | None = None
    eval_images_per_s: float | None = None
    measured_peak: int | None = None
    resident_bytes: int = 0
    """What the stage holds whole at full size (images, caches, targets), added to the probe's working memory."""
    resident_what: str = ""
    targets_bytes: int = 0
    """Of ``resident_bytes``, a student's cached joint-teacher targets (``joint.cache_on_device`` moves them out of
    core)."""
    peak_bytes: int | None = None
    seconds: float | None = None
    warning: str = ""
    note: str = ""


@dataclass
class Plan:
    """The whole plan: device, memory budget, caches and stages in run order."""

    pipeline: str
    device: str
    memory_method: str
    budget_bytes: int
    budget_what: str
    synthetic: bool
    data: list[DataShape]
    caches: list[CachePlan]
    stages: list[StagePlan]
    store: str | None

    @property
    def total_seconds(self) -> float:
        return sum((c.seconds or 0.0) for c in self.caches if not c.stored) + sum(
            (s.seconds or 0.0) for s in self.stages if not s.stored)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_seconds": self.total_seconds,
                "cache_bytes_by_level": self.cache_bytes_by_level()}

    def data_by_name(self, name: str) -> DataShape:
        return next(d for d in self.data if d.name == name)

    def cache_bytes_by_level(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for c in self.caches:
            out[c.level] = out.get(c.level, 0) + c.total_bytes
        return out


def peak_line(b1: int, p1: int, b2: int, p2: int | None) -> tuple[float, float]:
    """(fixed, per-sample) bytes of the line through two measured peaks at batches ``b1 < b2``; the slope is never
    negative, and without the second peak everything is taken as per-sample (``p1 / b1``)."""
    if p2 is None:
        return 0.0, p1 / b1
    slope = max(0.0, (p2 - p1) / (b2 - b1))
    return p1 - slope * b1, slope


def fitting_batch(full: int, floor: int, fixed: float, slope: float, budget: float) -> int:
    """``full`` halved until ``fixed + slope x batch`` fits ``budget``, never below ``floor``."""
    batch = full
    while batch // 2 >= floor and fixed + slope * batch > budget:
        batch //= 2
    return batch


PROBE_SHARE = 0.8
"""Share of the memory budget a probe step may be predicted to use before it is measured at a smaller batch."""


def _budget(device: torch.device, declared: int | None = None) -> tuple[int, str]:
    """The memory a stage must fit: ``declared`` (``mlfd plan --memory``), else the GPU's total or the host memory
    available now."""
    if declared is not None:
        return declared, "given by --memory"
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "total on the GPU"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "host memory available now"
    except OSError:
        pass
    return 0, "unknown"


class Planner:
    """Builds a :class:`Plan` (see the module docstring).

    Args:
        spec: The pipeline.
        store: The artifact store to look in (None: nothing is stored).
        synthetic: Replace every dataset with random images of its known size (:data:`KNOWN_DATASETS`).
        counts: ``--count`` overrides per dataset name (:func:`parse_counts`).
        steps: Timed optimizer steps (or extraction batches) per stage, after one untimed warm-up step.
        name: What to call the pipeline in the output.
        memory: Bytes each stage must fit (``--memory``; None: the GPU's total, or on a CPU the host memory available
            now); probes are measured at a batch predicted to fit it (:meth:`_fitting_batch`).
        probe_batch: The largest batch a trained stage other than the joint teacher (cheap on cached features, where
            a small batch would be all per-step cost) is measured at (``--probe-batch``; None: its own batch). A
            larger batch is measured at this one: its images/s are taken as measured and its peak is extrapolated
            along the line through steps at this batch and half of it. The probe's data shrinks to match, so the
            caches' probe is cheaper too. On a CPU images/s hardly depend on the batch; on a GPU a small batch
            understates them, so the time estimates are then upper bounds.
    """

    def __init__(self, spec: PipelineSpec, store: Path | None = None, synthetic: bool = False,
                 counts: dict[str, dict[str, int]] | None = None, steps: int = 3, name: str = "",
                 memory: int | None = None, probe_batch: int | None = None):
        self.spec, self.synthetic, self.steps, self.name = spec, synthetic, max(1, steps), name or spec.name
        self.memory = memory
        self.probe_batch = check_probe_batch(probe_batch)
        self.store = ArtifactStore(store) if store is not None else None
        counts = counts or {}
        names = [d.name for d in spec.datasets]
        for n in counts:
            if n not in names:
                raise SpecError(f"--count {n}=...: unknown dataset {n!r}; allowed: {names}")
        self.counts = counts
        self.device = resolve_device(spec.device)
        self._tmp = tempfile.TemporaryDirectory(prefix="mlfd-plan-")
        self._probes: dict[tuple, dict] = {}
        self._done = self._total = 0
        self.keys_ctx = Context(spec=spec, store=_KeyRecorder(Path(self._tmp.name) / "keys"), progress=False)

    # -- data ----------------------------------------------------------------------------------------------------

    def _recipes(self) -> list:
        s = self.spec
        names = [d.name for d in s.datasets]
        return ([s.teacher_for(n) for n in names] + [s.student_for(n).recipe for n in names] + [s.joint.recipe]
                + ([s.baselines.recipe] if s.baselines.recipe else []))

    def _load_data(self) -> tuple[dict[str, DataShape], dict[str, DatasetSplits]]:
        warm = 1
        batches = [self._probed_batch(r.batch_size) for r in self._recipes() if r is not self.spec.joint.recipe]
        if self.probe_batch is not None:  # the joint teacher keeps its batch, drawn from every dataset's features
            batches.append(math.ceil(self.spec.joint.recipe.batch_size / len(self.spec.datasets)))
        n_train = (warm + self.steps) * max(batches)
        n_eval = min(EVAL_BATCH, n_train)
        shapes, probes = {}, {}
        for i, d in enumerate(self.spec.datasets):
            if self.synthetic:
                shapes[d.name] = synthetic_shape(d, i, self.counts.get(d.name))
                probes[d.name] = synthetic_data(shapes[d.name], n_train, n_eval, seed=i)
            else:
                data = load_dataset(d, f"pipeline.datasets[{i}]")
                shapes[d.name] = real_shape(data)
                probes[d.name] = probe_data(data, n_train, n_eval)
        return shapes, probes

    def _probed_batch(self, full: int) -> int:
        """The batch a stage of batch ``full`` is measured at before any cut for memory."""
        return full if self.probe_batch is None else min(full, self.probe_batch)

    # -- the plan ------------------------------------------------------------------------------------------------

    def stages(self) -> list[tuple[Stage, str, str, Job | None]]:
        """The run's stages in order with their artifact (kind, key) and job; nothing is loaded or measured."""
        out = []
        for st in plan_stages(self.spec):
            kind, key = stage_artifact(st, self.keys_ctx)
            out.append((st, kind, key, stage_job(st, self.keys_ctx, key)))
        return out

    def stored(self, kind: str, key: str) -> bool:
        """Whether the store holds the complete artifact ``kind/key``."""
        return self.store is not None and self.store.get(kind, key) is not None

    def plan(self) -> Plan:
        """Load (or synthesize) the data, probe every stage and return the plan."""
        spec = self.spec
        listed = self.stages()
        stages = [st for st, *_ in listed]
        recorded = [(kind, key) for _, kind, key, _ in listed]
        jobs = [job for *_, job in listed]
        shapes, probes = self._load_data()
        pctx = _ProbeContext(spec=probe_spec(spec), store=ArtifactStore(Path(self._tmp.name) / "store"),
                             progress=False)
        pctx.probe = probes
        self._seed_teachers(pctx)
        budget, budget_what = _budget(self.device, self.memory)
        self._done, self._total = 0, len(self._wanted_caches(jobs)) + sum(job is not None for job in jobs)
        caches = self._caches(pctx, jobs, shapes)
        plans = []
        for st, (kind, key), job in zip(stages, recorded, jobs):
            sp = StagePlan(st.label, st.role, kind, key, self.stored(kind, key), job.level if job else None)
            if job is not None:
                self._progress(st.label)
                self._measure_stage(sp, job, pctx, shapes, probes, caches)
            else:
                sp.note = "not measured (stage not known to mlfd plan)"
            plans.append(sp)
        for sp in plans:
            sp.warning = fit_warning(sp, budget, str(self.device) if self.memory is None else "--memory")
        return Plan(self.name, str(self.device), PeakMemory.method(self.device), budget, budget_what, self.synthetic,
                    list(shapes.values()), list(caches.values()), plans,
                    str(self.store.root) if self.store is not None else None)

    def _seed_teachers(self, pctx: _ProbeContext) -> None:
        """Untrained teachers in the probe store (:func:`mlfd.stages.measure.seed_teachers`)."""
        seed_teachers(pctx)

    # -- caches --------------------------------------------------------------------------------------------------

    @staticmethod
    def _wanted_caches(jobs: list[Job | None]) -> list[tuple[str, str, int]]:
        """Every (teacher, dataset, level) cache a joint teacher of the run reads, in order of first use."""
        wanted: list[tuple[str, str, int]] = []
        for job in jobs:
            if job is not None and job.plan is not None:
                for t in job.plan.teachers:
                    for d in job.plan.datasets:
                        if (t, d, job.plan.level) not in wanted:
                            wanted.append((t, d, job.plan.level))
        return wanted

    def _progress(self, what: str) -> None:
        """One stderr line per probe (``mlfd plan`` of a paper-scale file runs for many minutes on a CPU)."""
        self._done += 1
        _logger.info("plan [%d/%d] %s", self._done, self._total, what)

    def _caches(self, pctx: _ProbeContext, jobs: list[Job | None], shapes: dict[str, DataShape]) -> dict:
        """Every cache a joint teacher of the run reads (:meth:`_wanted_caches`), measured once each."""
        out: dict[tuple[str, str, int], CachePlan] = {}
        speed: dict[tuple[str, int, tuple], tuple[float, int | None]] = {}
        for t, d, level in self._wanted_caches(jobs):
            self._progress(f"cache {t}->{d} L{level}")
            key = cache_key(self.keys_ctx, t, d, level)
            c = CachePlan(t, d, level, key, self.stored("features", key))
            art = build_cache(pctx, t, d, level)  # the real cache build, on the probe: one batch gives the shape
            c.shape = tuple(int(v) for v in art.meta()["shape"])
            c.bytes = cache_bytes(shapes[d], c.shape)
            geometry = (t, level, shapes[d].image_size, shapes[d].channels)
            if geometry not in speed:
                speed[geometry] = self._extraction_speed(pctx, t, d, level)
            c.images_per_s, measured = speed[geometry]
            c.seconds = shapes[d].total / c.images_per_s
            split_images = max(shapes[d].image_bytes(s) for s in SPLITS)
            probe_images = max(_held_bytes(getattr(pctx.data(d), s).images) for s in SPLITS)
            c.peak_bytes = None if measured is None else max(0, measured - probe_images) + split_images
            out[t, d, level] = c
        return out

    def _extraction_speed(self, pctx: _ProbeContext, t: str, d: str, level: int) -> tuple[float, int | None]:
        """Forward-only images/s and peak memory of teacher ``t`` at ``level`` on dataset ``d``'s probe images."""
        t_spec, t_data, ds = pctx.spec.dataset(t), pctx.data(t), pctx.data(d)
        with PeakMemory(self.device) as peak:
            net = load_frozen(teacher_stage.train_teacher(pctx, t), t_spec.model, t_data.num_classes, self.device)
            tf = pctx.transform(t_data, t_spec.model, None)
            dtype = pctx.dtype(pctx.spec.teacher_for(t))
            x_all = ds.train.images
            batch = min(EVAL_BATCH, len(ds.train))
            n_batches = max(1, len(ds.train) // batch)
            images, t0 = 0, time.perf_counter()
            with torch.inference_mode():
                for i in range(1 + min(self.steps, n_batches)):
                    idx = torch.arange((i % n_batches) * batch, (i % n_batches + 1) * batch)
                    x = _take(x_all, idx).to(self.device)
                    with autocast(self.device, dtype):
                        net.forward_level(tf(x, train=False), level)
                    if i == 0:
                        _sync(self.device)
                        t0 = time.perf_counter()
                    else:
                        images += batch
                _sync(self.device)
            ips = images / max(time.perf_counter() - t0, 1e-9)
            del net
        return ips, peak.peak

    # -- trained stages ------------------------------------------------------------------------------------------

    def _task(self, job: Job, pctx: _ProbeContext, batch: int | None = None) -> tuple[Any, Any, str, list[str]]:
        """(task, recipe, batch-size field, datasets it trains on) of a job, built on the probe; ``batch`` replaces
        the recipe's batch size (a probe cut to fit the memory)."""
        def cut(recipe: Any) -> Any:
            return recipe if batch is None else dataclasses.replace(recipe, batch_size=batch)

        def teacher_field(name: str) -> str:  # where the teacher recipe of dataset ``name`` takes its batch size
            return (f"datasets.{name}.teacher.batch_size" if "batch_size" in pctx.spec.dataset(name).teacher
                    else "teacher.batch_size")

        if job.kind == "teacher":
            recipe = cut(pctx.spec.teacher_for(job.dataset))
            return (ClassifierTask(pctx, job.dataset, pctx.spec.dataset(job.dataset).model, recipe), recipe,
                    teacher_field(job.dataset), [job.dataset])
        if job.kind == "baseline":
            model, recipe = baseline_model(pctx, job.dataset)
            recipe = cut(recipe)
            # baselines.recipe, else the teacher recipe of the first dataset of the column's architecture
            first = next(names for _, names in pctx.spec.baseline_groups() if job.dataset in names)[0]
            field = ("baselines.recipe.batch_size" if pctx.spec.baselines.recipe is not None
                     else teacher_field(first))
            return (SharedTask(pctx, job.mode, model, recipe), recipe, field, [d.name for d in pctx.spec.datasets])
        if job.kind == "joint":
            task = JointTask(pctx, job.plan)
            task.recipe = cut(task.recipe)  # read at each epoch's batching
            return task, task.recipe, "joint.recipe.batch_size", list(job.plan.datasets)
        sspec = student_variant(pctx, job.control, job.dataset)
        sspec = dataclasses.replace(sspec, recipe=cut(sspec.recipe))
        where = (f"datasets.{job.dataset}.student.recipe" if "batch_size" in
                 (pctx.spec.dataset(job.dataset).student.get("recipe") or {}) else "student.recipe")
        return (StudentTask(pctx, job.dataset, job.plan, sspec), sspec.recipe, f"{where}.batch_size", [job.dataset])

    def _recipe(self, job: Job) -> Any:
        """The effective recipe a job trains with at full size (per-dataset overrides applied; the probe's own spec
        cuts the epochs)."""
        ctx = self.keys_ctx
        if job.kind == "teacher":
            return self.spec.teacher_for(job.dataset)
        if job.kind == "joint":
            return self.spec.joint.recipe
        if job.kind == "baseline":
            return baseline_model(ctx, job.dataset)[1]
        return student_variant(ctx, job.control, job.dataset).recipe

    def _probe(self, job: Job, pctx: _ProbeContext) -> dict:
        """Speeds and peak memory of a job's task on the probe, measured once per task shape: a student's controls
        train the same network on the same batches, so they reuse the student's figures.

        A batch that would not fit is measured smaller (:meth:`_fitting_batch`; on a GPU also after an out-of-memory
        error, halving), and its peak is extrapolated to the full batch from the peak of one step at half the
        measured batch: the stage's fit warning then names the batch size that fits."""
        memo = (job.kind, job.dataset, job.level, job.mode, job.plan if job.kind == "joint" else None)
        if memo not in self._probes:
            full = self._task(job, pctx)[1].batch_size
            start = full if job.kind == "joint" else self._probed_batch(full)
            batch, why, slope = self._fitting_batch(job, pctx, start)
            if batch == start < full:
                why = f"--probe-batch {self.probe_batch}"
            while True:
                try:
                    m = self._measure_task(job, pctx, None if batch == full else batch)
                    break
                except torch.OutOfMemoryError:  # an accelerator's (a CPU's own shortage kills the process)
                    if batch < 4:
                        raise
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    why = f"batch {batch} ran out of memory on {self.device}"
                    batch //= 2
            if batch < full:
                if slope is None:  # no line drawn yet: the one through a step at the batch and one at half of it
                    half = max(2, batch // 2)
                    hi, lo = self._step_peak(job, pctx, batch), self._step_peak(job, pctx, half)
                    slope = peak_line(half, lo, batch, hi)[1] if hi is not None and lo is not None else None
                if m["peak"] is not None and slope is not None:
                    m["peak"] = int(m["peak"] + slope * (full - batch))
                m["cut"] = f"measured at batch {batch} of {full} ({why}); peak extrapolated"
            self._probes[memo] = m
        return self._probes[memo]

    def _measure_task(self, job: Job, pctx: _ProbeContext, batch: int | None) -> dict:
        with PeakMemory(self.device) as peak:
            task, recipe, batch_field, names = self._task(job, pctx, batch)
            ips = time_train_steps(task, recipe, self.device, self.steps)
            eval_ips = time_eval(task, sum(len(pctx.data(n).val) for n in names), self.device, recipe)
            emb = getattr(getattr(task, "joint", None), "embedding_shapes", None)
            del task
        return {"ips": ips, "eval_ips": eval_ips, "peak": peak.peak, "batch_field": batch_field, "names": names,
                "emb": emb, "label": job, "cut": ""}

    def _step_peak(self, job: Job, pctx: _ProbeContext, batch: int) -> int | None:
        """Memory of building a job's task at ``batch`` and one optimizer step of it. On a GPU the measured peak; on a
        CPU, whose resident set depends on what the allocator kept from earlier work, the activations autograd saves
        (:class:`SavedBytes`) plus four times the trainable parameters' bytes (weights, gradients, two optimizer
        moments)."""
        if self.device.type == "cuda":
            with PeakMemory(self.device) as peak:
                task, recipe, *_ = self._task(job, pctx, batch)
                time_train_steps(task, recipe, self.device, steps=1, warmup=0)
                del task
            return peak.peak
        task, recipe, *_ = self._task(job, pctx, batch)
        with SavedBytes() as saved:
            time_train_steps(task, recipe, self.device, steps=1, warmup=0)
        params = sum(p.numel() * p.element_size() for p in task.module.parameters() if p.requires_grad)
        return saved.bytes + 4 * params

    def _fitting_batch(self, job: Job, pctx: _ProbeContext, full: int) -> tuple[int, str, float | None]:
        """The batch to measure a job at, why it is not ``full``, and the bytes per sample of the predicting line
        (None where none was drawn): ``full`` unless its predicted peak exceeds
        :data:`PROBE_SHARE` of the memory budget. Without a declared budget a GPU measures the full batch (an
        out-of-memory error is caught there). A CPU, where the kernel would kill the process instead, or a declared
        budget first predicts the peak: from one step at 1/16 of the batch (at least 2) scaled up (an upper bound,
        since the model and optimizer do not grow with the batch), then, if that does not fit, from the line through
        that step and one at twice its batch (:func:`peak_line`). The largest halving of the batch predicted to fit
        is measured (:func:`fitting_batch`)."""
        if self.device.type == "cuda" and self.memory is None:
            return full, "", None
        budget = _budget(self.device, self.memory)[0] * PROBE_SHARE
        b1 = max(2, full // 16)  # batch norm needs two samples in training
        if budget <= 0 or 2 * b1 > full:
            return full, "", None
        p1 = self._step_peak(job, pctx, b1)
        if p1 is None or p1 * full / b1 <= budget:
            return full, "", None
        b2 = 2 * b1
        p2 = self._step_peak(job, pctx, b2)
        fixed, slope = peak_line(b1, p1, b2, p2)
        need = fixed + slope * full
        batch = fitting_batch(full, b1, fixed, slope, budget)
        if batch == full:
            return full, "", slope
        return batch, (f"batch {full} would need about {_fmt_bytes(int(need))}, more than {PROBE_SHARE:.0%} of "
                       f"{_fmt_bytes(int(budget / PROBE_SHARE))}"), slope

    def _measure_stage(self, sp: StagePlan, job: Job, pctx: _ProbeContext, shapes: dict[str, DataShape],
                       probes: dict[str, DatasetSplits], caches: dict) -> None:
        spec = self.spec
        m = self._probe(job, pctx)
        sp.images_per_s, sp.eval_images_per_s, sp.batch_field = m["ips"], m["eval_ips"], m["batch_field"]
        names, emb = m["names"], m["emb"]
        notes = ["speed of the plain student"] if m["label"] is not job else []
        if m["cut"]:
            notes.append(m["cut"])
        sp.measured_peak = m["peak"]
        recipe = self._recipe(job)
        sp.batch_size, sp.epochs = recipe.batch_size, recipe.epochs
        val = sum(shapes[n].val for n in names)
        test = sum(shapes[n].test for n in names)
        if job.kind == "teacher" and sp.epochs == 0:  # a given teacher kept as is: loaded, evaluated on val and test
            notes.append("loaded, not trained")
        sp.eval_images = sp.epochs * val + val + test
        if job.kind == "baseline":  # one batch of every dataset per step; an epoch covers the largest dataset
            steps = max(math.ceil(shapes[n].train / recipe.batch_size) for n in names)
            sp.images = steps * recipe.batch_size * len(names)
        else:
            sp.images = sum(shapes[n].train for n in names)
        sp.seconds = sp.images * sp.epochs / sp.images_per_s + sp.eval_images / sp.eval_images_per_s
        probe_held = sum(_held_bytes(getattr(probes[n], s).images) for n in names for s in SPLITS)
        if job.kind == "joint":
            feats = sum(caches[t, d, job.level].total_bytes for t in job.plan.teachers for d in job.plan.datasets)
            probe_held = sum(_probe_cache_bytes(caches[t, d, job.level], probes[d]) for t in job.plan.teachers
                             for d in job.plan.datasets)
            on_device = caches_on_device(spec, feats, _budget(self.device, self.memory)[0])
            sp.resident_bytes = feats if on_device else 0
            sp.resident_what = f"cached features {_fmt_bytes(feats)}" + ("" if on_device else " (read out of core)")
        else:
            images = sum(shapes[n].image_bytes() for n in names)
            sp.resident_bytes, sp.resident_what = images, f"images {_fmt_bytes(images)}"
            if job.kind == "student" and spec.student_for(job.dataset).targets == "cache" and emb is not None:
                n = shapes[job.dataset]
                per = shapes[job.dataset].classes + sum(math.prod(s) for s in emb.values())
                targets = n.train * per * TARGET_BYTES
                # where CachedTargets puts them: whole on the device, or read out of core
                if caches_on_device(spec, targets, _budget(self.device, self.memory)[0]):
                    sp.resident_bytes += targets
                    sp.targets_bytes = targets
                    sp.resident_what += f" + targets {_fmt_bytes(targets)}"
                else:
                    sp.resident_what += f" (targets {_fmt_bytes(targets)} read out of core)"
                probe_held += len(probes[job.dataset].train) * per * TARGET_BYTES  # the probe's, small: on the device
            if job.kind == "student" and job.control == "own_teacher":
                own = self._own_joint_seconds(job, pctx, shapes)
                sp.seconds += own
                notes.append(f"includes its own-teacher T* ({_fmt_time(own)})")
        sp.note = "; ".join(notes)
        if sp.measured_peak is not None:
            sp.peak_bytes = max(0, sp.measured_peak - probe_held) + sp.resident_bytes

    def _own_joint_seconds(self, job: Job, pctx: _ProbeContext, shapes: dict[str, DataShape]) -> float:
        """Training time of the own-teacher T* a control student builds first (measured on the probe)."""
        task = JointTask(pctx, job.plan)
        recipe = self.spec.joint.recipe
        ips = time_train_steps(task, pctx.spec.joint.recipe, self.device, self.steps)
        eps = time_eval(task, len(pctx.data(job.dataset).val), self.device, pctx.spec.joint.recipe)
        d = shapes[job.dataset]
        return d.train * recipe.epochs / ips + (recipe.epochs * d.val + d.val + d.test) / eps

    # -- warnings ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._tmp.cleanup()


def fit_warning(sp: StagePlan, budget: int, device: str) -> str:
    """One line when a stage's estimated peak exceeds ``budget`` bytes (the memory of ``device``, or what ``--memory``
    gives when ``device`` is ``"--memory"``), naming the switch that makes it fit; "" when it fits. A joint teacher
    that holds its caches on the device, or a student its cached targets, and would fit without them:
    ``joint.cache_on_device: false``. Another stage: the batch size at which its working memory (taken as proportional
    to the batch) leaves room for what it holds whole, else streamed images."""
    if sp.peak_bytes is None or budget <= 0 or sp.peak_bytes <= budget:
        return ""
    where = f"{sp.label}: needs about {_fmt_bytes(sp.peak_bytes)}, " + (
        f"--memory gives {_fmt_bytes(budget)}" if device == "--memory" else f"{_fmt_bytes(budget)} on {device}")
    working = sp.peak_bytes - sp.resident_bytes
    if sp.kind == "joint" and sp.resident_bytes > 0 and working < budget:
        return f"{where}; it holds its {sp.resident_what} whole: set joint.cache_on_device: false (out of core)"
    if sp.targets_bytes > 0 and sp.peak_bytes - sp.targets_bytes <= budget:
        return (f"{where}; it holds its cached targets {_fmt_bytes(sp.targets_bytes)} whole: set "
                f"joint.cache_on_device: false (read out of core)")
    batch = int(sp.batch_size * (budget - sp.resident_bytes) / working) if working > 0 else 0
    if batch >= 1:
        return f"{where}; lower {sp.batch_field} to {batch} or less"
    if sp.kind == "joint":
        return f"{where}; it holds its {sp.resident_what} whole: set joint.cache_on_device: false (out of core)"
    return (f"{where}; it holds its {sp.resident_what} whole: stream the images from their files (folder source, "
            f"options.stream: true) or lower {sp.batch_field}")


def _take(images: torch.Tensor | FileImages, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(images, FileImages):
        return torch.stack([images.decode(int(i)) for i in idx])
    return images[idx]


def _held_bytes(images: torch.Tensor | FileImages) -> int:
    return 0 if isinstance(images, FileImages) else images.numel() * images.element_size()


def _probe_cache_bytes(c: CachePlan, probe: DatasetSplits) -> int:
    return sum(len(getattr(probe, s)) for s in SPLITS) * math.prod(c.shape) * FEATURE_BYTES


def make_plan(spec: PipelineSpec, store: Path | None = None, synthetic: bool = False,
              counts: dict[str, dict[str, int]] | None = None, steps: int = 3, name: str = "",
              memory: int | None = None, probe_batch: int | None = None) -> Plan:
    """Plan ``spec`` (see :class:`Planner`)."""
    planner = Planner(spec, store, synthetic, counts, steps, name, memory, probe_batch)
    try:
        return planner.plan()
    finally:
        planner.close()


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_rate(r: float | None) -> str:
    return "n/a" if r is None else (f"{r:,.0f}" if r >= 100 else f"{r:.1f}")


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def plan_table(plan: Plan) -> str:
    """The plan as a compact text table: data, caches, stages in run order, total, warnings."""
    out = [f"plan of {plan.pipeline} on {plan.device} ({'synthetic stand-in data' if plan.synthetic else 'real data'});"
           f" peak memory: {plan.memory_method}; budget {_fmt_bytes(plan.budget_bytes)} ({plan.budget_what})",
           f"store: {plan.store or '(none given: nothing counted as stored)'}", ""]
    out += _table(["dataset", "train", "val", "test", "classes", "image"],
                  [[d.name, f"{d.train:,}", f"{d.val:,}", f"{d.test:,}", str(d.classes),
                    f"{d.channels}x{d.image_size[0]}x{d.image_size[1]}" + (" (streamed)" if d.streamed else "")]
                   for d in plan.data], {1, 2, 3, 4})
    out.append("")
    rows = [[c.label, "x".join(map(str, c.shape)), *(_fmt_bytes(c.bytes[s]) for s in SPLITS), _fmt_bytes(c.total_bytes),
             c.key[:8], "stored" if c.stored else "build"] for c in plan.caches]
    out += _table(["feature cache (float16)", "shape", "train", "val", "test", "total", "key", "store"], rows,
                  {2, 3, 4, 5})
    out.append("cache total by level: " + ", ".join(f"L{lv} {_fmt_bytes(b)}"
                                                     for lv, b in sorted(plan.cache_bytes_by_level().items())))
    out.append("")
    rows, n = [], 0
    by_level: dict[int, list[CachePlan]] = {}
    for c in plan.caches:
        by_level.setdefault(c.level, []).append(c)
    for sp in plan.stages:
        if sp.kind == "joint":  # the caches are built by the first joint teacher of their level
            for c in by_level.pop(sp.level, []):
                n += 1
                rows.append([str(n), c.label, c.key[:8], "stored" if c.stored else "build",
                             f"{plan.data_by_name(c.data).total:,}", "1", _fmt_rate(c.images_per_s),
                             _fmt_bytes(c.peak_bytes), "-" if c.stored else _fmt_time(c.seconds), ""])
        n += 1
        rows.append([str(n), sp.label, sp.key[:8], "stored" if sp.stored else "build",
                     f"{sp.images:,}" if sp.images else "", str(sp.epochs or ""), _fmt_rate(sp.images_per_s),
                     _fmt_bytes(sp.peak_bytes), "-" if sp.stored else _fmt_time(sp.seconds), sp.note])
    out += _table(["#", "stage", "key", "store", "img/epoch", "ep", "img/s", "peak mem", "time", "note"], rows,
                  {0, 4, 5, 6, 7, 8})
    out.append(f"estimated time of what is not stored: {_fmt_time(plan.total_seconds)} (training at the measured "
               f"img/s plus val every epoch and test once; no early stop)")
    warnings = [sp.warning for sp in plan.stages if sp.warning]
    warnings += [f"{c.label}: extraction needs about {_fmt_bytes(c.peak_bytes)}, {_fmt_bytes(plan.budget_bytes)} "
                 f"on {plan.device}; stream the images (folder source, options.stream: true)" for c in plan.caches
                 if c.peak_bytes is not None and 0 < plan.budget_bytes < c.peak_bytes]
    if warnings:
        out += ["", *(f"WARNING {w}" for w in warnings)]
    return "\n".join(out)


def write_json(plan: Plan, path: Path) -> None:
    from mlfd.store import atomic_write_text

    atomic_write_text(Path(path), json.dumps(plan.to_dict(), indent=1, default=list))
