"""Typed specs for the MLFD pipeline, with strict YAML in/out.

Every spec is a frozen-by-convention dataclass. ``from_dict`` validates types, ranges and unknown keys and raises
:class:`SpecError` whose message names the dotted field path and what is allowed. ``to_dict`` / ``from_dict``
round-trip exactly, so ``dump_yaml(load_yaml(x)) == x`` for any canonical file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from mlfd.errors import SpecError

# SpecError lives in mlfd.errors; importing it from here keeps working.

MAX_LEVEL = 4

SEARCHED_STAGES = ("students", "joint", "teachers", "multi_head", "joint_head")
"""The stages a tune job can search (``JobSpec.stage``; what a trial of each trains: ``mlfd.stages.trial``)."""
COST_METRICS = ("student/params", "student/latency_ms")
"""Metrics a ``students`` trial reports besides val/ and train/: what its deployed student costs (mlfd.stages.cost)."""

NameCheck = Callable[[str, str], None]
"""``check(value, dotted_path)``: raises :class:`SpecError` when ``value`` is not a name its registry knows."""

_NAME_CHECKS: dict[str, NameCheck] = {}


def register_check(kind: str, check: NameCheck) -> None:
    """Register the check of a name that lives in a higher layer's registry (``source``: mlfd.data, ``arch``: timm
    through mlfd.models). The registries fill this on import, so config never imports upward; a spec validated
    before they are imported (``mlfd run`` parses the YAML before importing torch) is checked again by
    ``stages.pipeline.preflight`` and by the loaders themselves before any compute.
    """
    _NAME_CHECKS[kind] = check


def _check_name(kind: str, value: str, path: str) -> None:
    check = _NAME_CHECKS.get(kind)
    if check is not None:
        check(value, path)


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise SpecError(f"{path}: {msg}")


# --------------------------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class AugmentSpec:
    """Train-time augmentation, applied batched on the training device."""

    crop_padding: int = 2
    """Random-crop padding in pixels at the model's input size (0 disables the crop)."""
    flip: bool = False
    """Random horizontal flip (off by default: digits and letters are not mirror-symmetric)."""
    autoaugment: bool = False
    """torchvision AutoAugment (ImageNet policy) per image, as in the authors' T1 recipe."""

    def validate(self, path: str) -> None:
        _check(self.crop_padding >= 0, f"{path}.crop_padding", f"must be >= 0, got {self.crop_padding}")


@dataclass
class RecipeSpec:
    """How one stage trains: optimizer, schedule, batch, precision, seed."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """adamw (decoupled decay), adam (coupled decay, the authors' T1 choice) or sgd (momentum 0.9, nesterov)."""
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.05
    epochs: int = 10
    batch_size: int = 128
    schedule: Literal["cosine", "constant", "onecycle"] = "cosine"
    """cosine (to 0 after the warmup), constant (after the warmup) or onecycle (lr from lr/25 up to lr over the
    warmup, or 30% of the steps without one, then cosine down; momentum cycled the other way): see
    mlfd.engine.LrSchedule."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs (may be fractional)."""
    label_smoothing: float = 0.0
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """auto = channels_last on CUDA only."""
    compile: bool = False
    """Wrap the trained model in torch.compile."""
    grad_clip: float = 0.0
    """Clip the global grad norm to this value (0 disables)."""
    seed: int = 0
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def validate(self, path: str, min_epochs: int = 1) -> None:
        """Check ranges; ``min_epochs`` is 0 for a teacher recipe (``epochs: 0`` keeps a given teacher as it is)."""
        _check(self.lr > 0, f"{path}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.epochs >= min_epochs, f"{path}.epochs", f"must be >= {min_epochs}, got {self.epochs}")
        _check(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.warmup_epochs >= 0, f"{path}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(0 <= self.label_smoothing < 1, f"{path}.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.grad_accum >= 1, f"{path}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.grad_clip >= 0, f"{path}.grad_clip", f"must be >= 0, got {self.grad_clip}")
        self.augment.validate(f"{path}.augment")


@dataclass
class ModelSpec:
    """A timm model, by name."""

    arch: str = "test_resnet"
    """Any name ``timm.list_models()`` knows."""
    input_size: int = 32
    """Square input resolution the dataset's images are resized to."""
    pretrained: bool = False
    """Start from timm pretrained weights (needs the hub, or a local file via
    ``kwargs: {pretrained_cfg_overlay: {file: ...}}``); the classifier is new, so a teacher is fine-tuned (see
    ``teacher.epochs``). A student with this flag starts from the same timm weights, never from its teacher's."""
    checkpoint: Optional[str] = None
    """Path to a state dict (this dataset's classes) the teacher starts from; it is fine-tuned for the teacher
    recipe's epochs, or taken as it is with ``teacher.epochs: 0``. Teachers only: students never load it."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. drop_rate)."""

    def validate(self, path: str) -> None:
        _check(self.input_size >= 8, f"{path}.input_size", f"must be >= 8, got {self.input_size}")
        _check_name("arch", self.arch, f"{path}.arch")
        if self.checkpoint is not None:
            _check(Path(self.checkpoint).is_file(), f"{path}.checkpoint", f"file not found: {self.checkpoint}")


@dataclass
class DatasetSpec:
    """One dataset D_i: where it comes from, how it is split, and the models trained on it."""

    name: str
    """Short unique name used in tables, metrics and artifact keys."""
    source: str
    """One of mlfd.data.SOURCES: sklearn_digits, mnist5k, fashion_mnist, torchvision, folder, parquet."""
    options: dict = field(default_factory=dict)
    """Source options (root, name, image_column, label_column, ...)."""
    classes: Optional[list] = None
    """Keep only these source classes (ints or names), relabelled 0..n-1 in the given order."""
    val_fraction: float = 0.1
    """Stratified fraction of train carved as val when the source has no val split."""
    max_train: Optional[int] = None
    """Keep a stratified subset of at most this many train images (None: all)."""
    max_val: Optional[int] = None
    max_test: Optional[int] = None
    split_seed: int = 0
    """Seed of the val carve-out and of the subsets."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The teacher architecture (also the dataset-specific baseline)."""
    student_model: Optional[ModelSpec] = None
    """The student architecture; None means the same as ``model`` (without its checkpoint). A student starts fresh,
    or from timm pretrained weights with ``pretrained: true``; it takes no checkpoint."""
    teacher: dict = field(default_factory=dict)
    """Partial recipe merged over the global ``teacher`` block for this dataset's teacher, field by field (nested
    ``augment`` too), e.g. ``{lr: 1.0e-4, batch_size: 768}``. See :meth:`PipelineSpec.teacher_for`."""
    student: dict = field(default_factory=dict)
    """Partial student spec merged over the global ``student`` block for this dataset's student (alpha,
    temperature, betas, w_ce, ..., and a partial ``recipe``). See :meth:`PipelineSpec.student_for`."""

    def validate(self, path: str) -> None:
        _check(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(), f"{path}.name",
               f"must be a non-empty name of letters, digits, '_' or '-', got {self.name!r}")
        _check_name("source", self.source, f"{path}.source")
        _check(0 < self.val_fraction < 1, f"{path}.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        for k in ("max_train", "max_val", "max_test"):
            v = getattr(self, k)
            _check(v is None or v >= 1, f"{path}.{k}", f"must be >= 1 or null, got {v}")
        if self.classes is not None:
            _check(len(self.classes) >= 2, f"{path}.classes", "needs at least 2 classes")
            _check(len(set(map(str, self.classes))) == len(self.classes), f"{path}.classes", "has duplicates")
        self.model.validate(f"{path}.model")
        if self.student_model is not None:
            self.student_model.validate(f"{path}.student_model")
            _check(self.student_model.checkpoint is None, f"{path}.student_model.checkpoint",
                   "a student starts fresh or from timm pretrained weights (pretrained: true); allowed: null")

    @property
    def student_net(self) -> ModelSpec:
        """The student's model spec: ``student_model``, else ``model`` without its checkpoint (never the teacher's
        weights)."""
        if self.student_model is not None:
            return self.student_model
        return dataclasses.replace(self.model, checkpoint=None, kwargs=dict(self.model.kwargs))


@dataclass
class JointSpec:
    """Stage 2: the joint teacher T* fused from frozen teachers at one level."""

    variant: Literal["union", "per_target"] = "union"
    """union: one T* over all datasets with one head each (Algorithm 1); per_target: one T* per dataset trained on
    that dataset only (what the authors' code did)."""
    dropout: float = 0.85
    """Dropout before the level-1 dense layer (the paper uses 0.8-0.9)."""
    adaptor_width: int = 64
    """Channels (maps) or units (vectors) of each per-teacher adaptor A_i."""
    width: int = 128
    """Width of the joint teacher's NN blocks (its embedding width at every level)."""
    recipe: RecipeSpec = field(default_factory=lambda: RecipeSpec(lr=1e-3, weight_decay=1e-4, epochs=10))
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage type of the frozen-teacher feature cache and of T*'s cached targets (in their keys). float16 halves
    the bytes of float32; a value beyond its range (65504) stops the build with an error naming the teacher and level:
    bfloat16 (same bytes, float32's range, 8 mantissa bits) or float32 store it."""
    cache_on_device: Literal["auto", True, False] = "auto"
    """true: every cache T* reads is copied whole to the training device (host RAM on a CPU); false: read out of core
    (each batch's rows read from the Arrow files by a background thread, copied ahead of the step that needs them);
    auto: on the device when the caches' bytes are at most ``cache_memory_fraction`` of its free memory. Both paths
    draw the same samples in the same order and give bit-identical weights, so it is not part of any artifact key."""
    cache_memory_fraction: float = 0.5
    """Share of the free device memory (MemAvailable on a CPU) that ``cache_on_device: auto`` lets the caches use."""

    def validate(self, path: str) -> None:
        _check(0 < self.cache_memory_fraction <= 1, f"{path}.cache_memory_fraction",
               f"must be in (0, 1], got {self.cache_memory_fraction}")
        _check(0 <= self.dropout < 1, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.adaptor_width >= 1, f"{path}.adaptor_width", f"must be >= 1, got {self.adaptor_width}")
        _check(self.width >= 1, f"{path}.width", f"must be >= 1, got {self.width}")
        self.recipe.validate(f"{path}.recipe")


@dataclass
class StudentSpec:
    """Stage 3: students trained with Eq. (3)."""

    w_ce: float = 1.0
    """Weight of the label cross-entropy (the authors' code used 0.2)."""
    alpha: float = 0.6
    """Weight of the logit KD term alpha * T^2 * KL."""
    temperature: float = 2.0
    betas: dict = field(default_factory=dict)
    """beta_c per level c (keys 1..4, none above the highest fusion level); levels not listed use ``beta_default``."""
    beta_default: float = 0.2
    """beta_c for a distilled level not listed in ``betas`` (Table 1's 0.2)."""
    targets: Literal["cache", "online"] = "cache"
    """cache: joint-teacher targets of un-augmented images (cheap, the authors' choice); online: frozen teachers and
    T* run on the student's augmented batch (aligned views, extra forward passes)."""
    recipe: RecipeSpec = field(default_factory=RecipeSpec)

    def validate(self, path: str) -> None:
        _check(self.w_ce >= 0, f"{path}.w_ce", f"must be >= 0, got {self.w_ce}")
        _check(self.alpha >= 0, f"{path}.alpha", f"must be >= 0, got {self.alpha}")
        _check(self.temperature > 0, f"{path}.temperature", f"must be > 0, got {self.temperature}")
        _check(self.beta_default >= 0, f"{path}.beta_default", f"must be >= 0, got {self.beta_default}")
        fixed = {}
        for k, v in self.betas.items():
            try:
                lvl = int(k)
            except (TypeError, ValueError):
                raise SpecError(f"{path}.betas: key {k!r} is not a level; allowed: 1..{MAX_LEVEL}") from None
            _check(1 <= lvl <= MAX_LEVEL, f"{path}.betas.{k}", f"level must be in 1..{MAX_LEVEL}")
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, f"{path}.betas.{k}",
                   f"must be a number >= 0, got {v!r}")
            fixed[lvl] = float(v)
        self.betas = fixed
        self.recipe.validate(f"{path}.recipe")

    def beta(self, level: int) -> float:
        return float(self.betas.get(level, self.beta_default))


@dataclass
class BaselineSpec:
    """The two multi-dataset baselines (shared backbone), trained once per distinct student architecture."""

    multi_head: bool = True
    """Shared backbone, one head per dataset, equal weights (see ``multi_head_batching``)."""
    joint_head: bool = True
    """Shared backbone, one head over the union of classes, the datasets' batches concatenated."""
    multi_head_batching: Literal["alternate", "concat"] = "alternate"
    """alternate (the paper): one batch per dataset in turn, each its own forward and backward, gradients
    accumulated, one optimizer step after a batch of each dataset; concat: the batches concatenated into one forward
    (BatchNorm sees all datasets at once)."""
    model: Optional[ModelSpec] = None
    """One backbone for every column, overriding the per-column default; None: each dataset's column uses a baseline
    with that dataset's student architecture (trained once per distinct architecture)."""
    recipe: Optional[RecipeSpec] = None
    """None: the effective teacher recipe of the first dataset using the architecture."""

    def validate(self, path: str) -> None:
        if self.model is not None:
            self.model.validate(f"{path}.model")
            _check(self.model.checkpoint is None, f"{path}.model.checkpoint",
                   "baselines start fresh or from timm pretrained weights; allowed: null")
        if self.recipe is not None:
            self.recipe.validate(f"{path}.recipe")


@dataclass
class ControlSpec:
    """Controls a skeptical reader needs beside the students."""

    own_teacher: bool = True
    """Students distilled from a T* built on their own teacher only (no fusion across datasets)."""
    no_kd: bool = True
    """Students with alpha = 0 (feature terms and CE only)."""


@dataclass
class PipelineSpec:
    """A whole MLFD experiment: datasets (each with its teacher/student model), and the three stages."""

    datasets: list
    """At least two DatasetSpec entries, each with its own label set."""
    name: str = "mlfd"
    fusion_levels: list = field(default_factory=lambda: [1, 2])
    """Fusion levels k to run; each gives a joint teacher L_k and students distilled at levels 1..k."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    teacher: RecipeSpec = field(default_factory=RecipeSpec)
    """Recipe of stage 1 (teachers = dataset-specific baselines)."""
    joint: JointSpec = field(default_factory=JointSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    baselines: BaselineSpec = field(default_factory=BaselineSpec)
    controls: ControlSpec = field(default_factory=ControlSpec)
    only_students: Optional[list] = None
    """Train students (and their controls) only for these dataset names; None: all. Used by per-student searches."""
    seeds: list = field(default_factory=lambda: [0])
    """Run seeds: ``mlfd run`` trains every stage once per seed. Run seed ``s`` is added to the seed of every recipe
    (teacher, joint, student, baselines, and the per-dataset overrides that set one), so seed 0 runs the recipes as
    written and keeps their artifacts; the data splits (``split_seed``) are the same for every seed."""

    def validate(self, path: str = "pipeline") -> None:
        _check(len(self.datasets) >= 2, f"{path}.datasets", f"needs at least 2 datasets, got {len(self.datasets)}")
        names = [d.name for d in self.datasets]
        _check(len(set(names)) == len(names), f"{path}.datasets", f"dataset names must be unique, got {names}")
        for i, d in enumerate(self.datasets):
            d.validate(f"{path}.datasets[{i}]")
        _check(len(self.fusion_levels) >= 1, f"{path}.fusion_levels", "needs at least one level")
        for lvl in self.fusion_levels:
            is_level = isinstance(lvl, int) and not isinstance(lvl, bool) and 1 <= lvl <= MAX_LEVEL
            _check(is_level, f"{path}.fusion_levels", f"levels must be integers in 1..{MAX_LEVEL}, got {lvl!r}")
        _check(len(set(self.fusion_levels)) == len(self.fusion_levels), f"{path}.fusion_levels", "has duplicates")
        if self.only_students is not None:
            for n in self.only_students:
                _check(n in names, f"{path}.only_students", f"unknown dataset {n!r}; allowed: {names}")
        _check(len(self.seeds) >= 1, f"{path}.seeds", "needs at least one seed; allowed: a list of integers >= 0")
        for sd in self.seeds:
            is_seed = isinstance(sd, int) and not isinstance(sd, bool) and sd >= 0
            _check(is_seed, f"{path}.seeds", f"seeds must be integers >= 0, got {sd!r}")
        _check(len(set(self.seeds)) == len(self.seeds), f"{path}.seeds", f"has duplicates: {self.seeds}")
        self.teacher.validate(f"{path}.teacher", min_epochs=0)
        self.joint.validate(f"{path}.joint")
        self.student.validate(f"{path}.student")
        self.baselines.validate(f"{path}.baselines")
        # A beta above every fusion level is a mistake the user should hear about.
        top = max(self.fusion_levels)
        for lvl, b in self.student.betas.items():
            _check(lvl <= top, f"{path}.student.betas.{lvl}",
                   f"beta for level {lvl} above the highest fusion level {top}; allowed levels: 1..{top}")
        for d in self.datasets:
            given = d.model.checkpoint is not None or d.model.pretrained
            _check(self.teacher.epochs >= 1 or given or "epochs" in d.teacher, f"{path}.teacher.epochs",
                   f"must be >= 1, got {self.teacher.epochs} (0 keeps a given teacher as it is; dataset {d.name!r} "
                   "has no model.checkpoint or model.pretrained)")
        for i, d in enumerate(self.datasets):
            self._check_overrides(d, f"{path}.datasets[{i}]", top)
        if (self.baselines.multi_head or self.baselines.joint_head) and self.baselines.recipe is None:
            for _, names in self.baseline_groups():
                _check(self.teacher_for(names[0]).epochs >= 1, f"{path}.baselines.recipe",
                       f"needed: the baselines would take the teacher recipe of dataset {names[0]!r}, which has "
                       "epochs 0; allowed: a recipe with epochs >= 1")

    def _check_overrides(self, d: DatasetSpec, path: str, top: int) -> None:
        """The effective teacher recipe and student spec of ``d`` are valid (errors name the override's field)."""
        t = _merged(RecipeSpec, self.teacher, d.teacher, f"{path}.teacher")
        t.validate(f"{path}.teacher", min_epochs=0)
        given = d.model.checkpoint is not None or d.model.pretrained
        _check(t.epochs >= 1 or given, f"{path}.teacher.epochs",
               f"must be >= 1, got {t.epochs} (0 keeps a given teacher as it is and needs model.checkpoint or "
               "model.pretrained)")
        s = _merged(StudentSpec, self.student, d.student, f"{path}.student")
        s.validate(f"{path}.student")
        for lvl in s.betas:
            _check(lvl <= top, f"{path}.student.betas.{lvl}",
                   f"beta for level {lvl} above the highest fusion level {top}; allowed levels: 1..{top}")

    def for_seed(self, seed: int) -> PipelineSpec:
        """The pipeline of run seed ``seed``: every recipe seed shifted by ``seed`` (per-dataset overrides that set a
        seed too), ``seeds: [seed]``; ``for_seed(0)`` equals the spec apart from ``seeds``."""
        s = copy.deepcopy(self)
        s.seeds = [seed]
        for r in [s.teacher, s.joint.recipe, s.student.recipe] + ([s.baselines.recipe] if s.baselines.recipe else []):
            r.seed += seed
        for d in s.datasets:
            recipe = d.student.get("recipe")
            for over in (d.teacher, recipe if isinstance(recipe, dict) else {}):
                if isinstance(over.get("seed"), int) and not isinstance(over.get("seed"), bool):
                    over["seed"] += seed
        return s

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.datasets:
            if d.name == name:
                return d
        raise SpecError(f"dataset: unknown {name!r}; allowed: {[d.name for d in self.datasets]}")

    def baseline_groups(self) -> list[tuple[ModelSpec, list[str]]]:
        """The multi-dataset baselines to train: (backbone, datasets whose column reports it), in dataset order.

        One group per distinct student architecture (the whole student model spec) unless ``baselines.model`` sets
        one backbone for every column.
        """
        if self.baselines.model is not None:
            return [(self.baselines.model, [d.name for d in self.datasets])]
        groups: dict[str, tuple[ModelSpec, list[str]]] = {}
        for d in self.datasets:
            m = d.student_net
            groups.setdefault(json.dumps(to_dict(m), sort_keys=True, default=str), (m, []))[1].append(d.name)
        return list(groups.values())

    def teacher_for(self, name: str) -> RecipeSpec:
        """The effective teacher recipe of dataset ``name``: its ``teacher`` override merged over ``teacher``."""
        d = self.dataset(name)
        r = _merged(RecipeSpec, self.teacher, d.teacher, f"pipeline.datasets[{self.datasets.index(d)}].teacher")
        r.validate(f"pipeline.datasets[{self.datasets.index(d)}].teacher", min_epochs=0)
        return r

    def student_for(self, name: str) -> StudentSpec:
        """The effective student spec of dataset ``name``: its ``student`` override merged over ``student``."""
        d = self.dataset(name)
        path = f"pipeline.datasets[{self.datasets.index(d)}].student"
        s = _merged(StudentSpec, self.student, d.student, path)
        s.validate(path)
        return s


# --------------------------------------------------------------------------------------------------------------------
# dict <-> dataclass, strict
# --------------------------------------------------------------------------------------------------------------------

_HINTS: dict = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def type_name(tp: Any) -> str:
    """How a message names what a field of type hint ``tp`` accepts: ``an integer or null``, ``one of 'a', 'b'``.

    The one wording of the spec's type errors (:func:`from_dict`) and the search-space checks (:mod:`mlfd.tune.spaces`).
    """
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) or tp is dict or origin is dict:
        return "a mapping"
    if tp is list or origin is list:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__",
                                                                                                        str(tp)))


def is_number(v: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def admits(tp: Any, v: Any) -> bool:
    """Whether a scalar field of type hint ``tp`` accepts the value ``v`` as it is (what :func:`from_dict` accepts;
    an int is a valid float). ``typing.Any`` accepts everything; containers and dataclasses accept no scalar."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(admits(a, v) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return is_number(v)
    if tp is str:
        return isinstance(v, str)
    return False


def _convert(value: Any, tp, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and dataclasses.is_dataclass(rest[0]) and isinstance(value, dict):
            # Optional[Spec] holding a mapping: the spec's own error, which names the nested field (model.arch...).
            return _convert(value, rest[0], path)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except SpecError as e:
                errors.append(e)
        raise SpecError(f"{path}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        _check(value in allowed, path, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if tp is bool:
        _check(isinstance(value, bool), path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), path, f"expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        _check(isinstance(value, dict), path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is list or origin is list:
        _check(isinstance(value, list), path, f"expected a list, got {value!r}")
        return list(value)
    return value


_LIST_ITEM = {("PipelineSpec", "datasets"): DatasetSpec}


def _from_dict(cls, data: Any, path: str):
    _check(isinstance(data, dict), path, f"expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    _check(not unknown, f"{path}.{unknown[0]}" if unknown else path, f"unknown field; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{sub}: required field is missing")
            continue
        item_cls = _LIST_ITEM.get((cls.__name__, name))
        if item_cls is not None:
            _check(isinstance(data[name], list), sub, f"expected a list, got {data[name]!r}")
            kwargs[name] = [_from_dict(item_cls, v, f"{sub}[{i}]") for i, v in enumerate(data[name])]
        else:
            kwargs[name] = _convert(data[name], hints[name], sub)
    return cls(**kwargs)


def _merge_over(cls, base: dict, over: dict, path: str) -> dict:
    """``over`` merged into ``base`` (both plain dicts of spec ``cls``): fields that are specs (``augment``,
    ``recipe``) merge field by field; every other field (numbers, ``betas``, ``kwargs``) is replaced whole."""
    _check(isinstance(over, dict), path, f"expected a mapping, got {over!r}")
    hints = _hints(cls)
    out = dict(base)
    for k, v in over.items():
        tp = hints.get(k)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_over(tp, out[k], v, f"{path}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merged(cls, base: Any, over: dict, path: str):
    """The spec ``base`` with the partial dict ``over`` merged over it (not validated; errors name ``path``)."""
    if not over:
        return copy.deepcopy(base)
    return _from_dict(cls, _merge_over(cls, to_dict(base), over, path), path)


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe dict of a spec (round-trips through :func:`from_dict`)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls, data: dict, path: str = "pipeline", validate: bool = True):
    """Build and validate a spec of type ``cls`` from a plain dict."""
    spec = _from_dict(cls, copy.deepcopy(data), path)
    if validate and hasattr(spec, "validate"):
        spec.validate(path)
    return spec


def spec_hash(obj: Any, n: int = 16) -> str:
    """Stable content hash of a spec or plain value."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


# --------------------------------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float (YAML 1.2, not a string) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let the base class report it
                continue
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3"; YAML 1.2 and every user mean the float. The same resolver is on
# the dumper so that strings that look like such floats are quoted and round-trip as strings.
_FLOAT_RE = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`_Loader` would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _cls.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Safely parse YAML text (no object construction); ``1e-3`` is a float; duplicate keys are an error."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict:
    """Safely load a YAML mapping, with a one-line error on a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: file not found")
    try:
        data = yaml_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read as UTF-8 YAML text ({type(e).__name__})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a YAML mapping at top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key.path=value`` (value parsed as YAML) from ``--set``."""
    if "=" not in item:
        raise SpecError(f"--set {item}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise SpecError(f"--set {item}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_path(data: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` (``datasets.0.model.arch`` or ``datasets.mnist.model.arch`` for list items) in a nested dict."""
    parts = key.split(".")
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(cur, list):
            idx = None
            if part.lstrip("-").isdigit():
                idx = int(part)
            else:
                for j, item in enumerate(cur):
                    if isinstance(item, dict) and item.get("name") == part:
                        idx = j
            if idx is None or not -len(cur) <= idx < len(cur):
                raise SpecError(f"--set {key}: no list item {part!r} at {where}")
            if last:
                cur[idx] = value
            else:
                cur = cur[idx]
            continue
        if not isinstance(cur, dict):
            raise SpecError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping, got {cur!r}")
        if last:
            cur[part] = value
        else:
            if cur.get(part) is None:
                cur[part] = {}
            cur = cur[part]


def parse_seeds(text: str) -> list[int]:
    """The run seeds of ``--seeds 0,1,2``; a one-line SpecError for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.isdigit() for p in parts):
        raise SpecError(f"--seeds {text}: expected a comma-separated list of integers >= 0, e.g. 0,1,2")
    return [int(p) for p in parts]


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    data = copy.deepcopy(data)
    for item in overrides or []:
        k, v = parse_override(item)
        set_path(data, k, v)
    return data


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Load, override and validate a pipeline YAML."""
    return from_dict(PipelineSpec, apply_overrides(read_yaml(path), overrides), path="pipeline")


def dump_yaml(obj: Any) -> str:
    return yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_pipeline(spec: PipelineSpec, path: str | Path) -> None:
    """Write ``spec`` as YAML, atomically (temp file + rename)."""
    from mlfd.fileio import atomic_write_text

    atomic_write_text(Path(path), dump_yaml(spec))


SMOKE_LIMITS = {"max_train": 300, "max_val": 100, "max_test": 200}
SMOKE_EPOCHS = 3
SMOKE_BATCH = 32
SMOKE_JOINT_EPOCHS = 8  # cheap: the joint teacher trains on cached features


def smoke_pipeline(spec: PipelineSpec) -> PipelineSpec:
    """The ``--smoke`` variant of a pipeline: small subsets, small batches, few epochs; the same stages."""
    s = copy.deepcopy(spec)
    for d in s.datasets:
        for k, cap in SMOKE_LIMITS.items():
            setattr(d, k, min(getattr(d, k) or cap, cap))
    recipes = [s.teacher, s.student.recipe] + ([s.baselines.recipe] if s.baselines.recipe else [])
    for r in recipes:
        r.epochs = min(r.epochs, SMOKE_EPOCHS)
        r.batch_size = min(r.batch_size, SMOKE_BATCH)
    for d in s.datasets:  # per-dataset overrides get the same caps
        for over in (d.teacher, d.student.get("recipe") if isinstance(d.student.get("recipe"), dict) else {}):
            for k, cap in (("epochs", SMOKE_EPOCHS), ("batch_size", SMOKE_BATCH)):
                if isinstance(over.get(k), int) and not isinstance(over.get(k), bool):
                    over[k] = min(over[k], cap)
    s.joint.recipe.epochs = min(s.joint.recipe.epochs, SMOKE_JOINT_EPOCHS)
    s.joint.recipe.batch_size = min(s.joint.recipe.batch_size, SMOKE_BATCH * 2)
    return s
