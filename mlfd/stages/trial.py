"""What one trial of a searched stage trains and produces: the one home for ``mlfd tune``'s trainable, the MLflow
best-model logging, the search summary of ``mlfd report`` and the packing dry run.

A trial of ``students`` trains the student of dataset ``study`` at the pipeline's (single) fusion level, from the
joint teacher it needs; ``joint`` trains that joint teacher from the feature caches; ``teachers`` trains the teacher
of ``study``; ``multi_head`` / ``joint_head`` train that baseline (``study`` is None: the first dataset's column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlfd.config import SEARCHED_STAGES, PipelineSpec, RecipeSpec, from_dict, to_dict
from mlfd.stages.baselines import (KIND as BASELINE, SharedTask, baseline_key, baseline_model, baseline_spec,
                                  train_baseline)
from mlfd.stages.cache import build_cache
from mlfd.stages.common import Context
from mlfd.stages.joint import KIND as JOINT, JointPlan, JointTask, joint_key, joint_targets, plan_for, train_joint
from mlfd.stages.students import KIND as STUDENT, StudentTask, student_key, student_variant, train_student
from mlfd.stages.teachers import KIND as TEACHER, ClassifierTask, teacher_key, train_teacher
from mlfd.store import Artifact


@dataclass(frozen=True)
class StageTrial:
    """One trial of ``stage`` for ``study`` in the context ``ctx`` (its spec already holds the sampled values)."""

    ctx: Context
    stage: str
    study: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in SEARCHED_STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {SEARCHED_STAGES}")

    @property
    def joint_plan(self) -> JointPlan:
        """The joint teacher a ``students`` or ``joint`` trial uses or trains (the pipeline's one fusion level)."""
        return plan_for(self.ctx, self.ctx.spec.fusion_levels[0], self.study)

    def output(self) -> tuple[str, str]:
        """``(kind, key)`` of the artifact the trial produces."""
        ctx, study = self.ctx, self.study
        if self.stage == "students":
            return STUDENT, student_key(ctx, study, self.joint_plan, student_variant(ctx, None, study))
        if self.stage == "joint":
            return JOINT, joint_key(ctx, self.joint_plan)
        if self.stage == "teachers":
            return TEACHER, teacher_key(ctx, study)
        return BASELINE, baseline_key(ctx, self.stage)

    def artifact(self) -> Artifact | None:
        """The trial's artifact if the store holds it."""
        return self.ctx.store.get(*self.output())

    def build_upstream(self) -> None:
        """Build (once, under the store's locks) what the trial reads but does not train itself."""
        if self.stage == "students":
            joint_targets(self.ctx, self.joint_plan, self.study)
        elif self.stage == "joint":
            plan = self.joint_plan
            for t in plan.teachers:
                for d in plan.datasets:
                    build_cache(self.ctx, t, d, plan.level)

    def build(self) -> Artifact:
        """Train the trial's artifact (or read it back from the store)."""
        ctx, study = self.ctx, self.study
        if self.stage == "students":
            return train_student(ctx, study, ctx.spec.fusion_levels[0])
        if self.stage == "joint":
            return train_joint(ctx, self.joint_plan)
        if self.stage == "teachers":
            return train_teacher(ctx, study)
        return train_baseline(ctx, self.stage)

    def recipe(self) -> RecipeSpec:
        """The recipe the trial trains with (per-dataset overrides applied)."""
        spec = self.ctx.spec
        if self.stage == "students":
            return spec.student_for(self.study).recipe
        if self.stage == "joint":
            return spec.joint.recipe
        if self.stage == "teachers":
            return spec.teacher_for(self.study)
        return baseline_model(self.ctx)[1]

    def task(self) -> Any:
        """The training task of the trial (what ``engine.fit`` runs), its upstream already built."""
        ctx, study = self.ctx, self.study
        if self.stage == "students":
            return StudentTask(ctx, study, self.joint_plan, student_variant(ctx, None, study))
        if self.stage == "joint":
            return JointTask(ctx, self.joint_plan)
        if self.stage == "teachers":
            return ClassifierTask(ctx, study, ctx.spec.dataset(study).model, ctx.spec.teacher_for(study))
        model, recipe = baseline_model(ctx)
        return SharedTask(ctx, self.stage, model, recipe)


def micro_batched(spec: PipelineSpec, stage: str, study: str | None, batch_size: int, grad_accum: int) -> PipelineSpec:
    """``spec`` with the recipe that a trial of ``stage`` trains set to ``batch_size`` and ``grad_accum`` (the retry of
    a trial that ran out of memory: :mod:`mlfd.tune.memory`), and nothing else changed.

    The recipe is the student recipe of dataset ``study`` (its ``student.recipe`` override), its teacher recipe (its
    ``teacher`` override), ``joint.recipe``, or for a baseline ``baselines.recipe`` (from the effective baseline
    recipe). Upstream artifacts (teachers of a student trial, caches, T*) keep their keys; the trial's own key changes
    with its recipe, as it must: micro-batches train close to, not exactly like, the full batch (BatchNorm).
    """
    if stage not in SEARCHED_STAGES:
        raise ValueError(f"stage {stage!r} is not one of {SEARCHED_STAGES}")
    fields = {"batch_size": batch_size, "grad_accum": grad_accum}
    d = to_dict(spec)
    names = [ds["name"] for ds in d["datasets"]]
    if stage == "students":
        d["datasets"][names.index(study)]["student"].setdefault("recipe", {}).update(fields)
    elif stage == "teachers":
        d["datasets"][names.index(study)]["teacher"].update(fields)
    elif stage == "joint":
        d["joint"]["recipe"].update(fields)
    else:
        d["baselines"]["recipe"] = {**to_dict(baseline_spec(spec)[1]), **fields}
    return from_dict(PipelineSpec, d, path=f"{stage} trial (micro-batched)")
