"""Stage 3: one student per dataset, trained end to end with Eq. (3) from the joint teacher's targets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from mlfd.config import StudentSpec, to_dict
from mlfd.data import make_loader, to_device
from mlfd.data.transforms import autoaugment_key
from mlfd.engine import accumulation_key, fit, use_channels_last
from mlfd.losses import mlfd_loss
from mlfd.models import Student
from mlfd.stages.common import (Context, EvalLoaders, build_level_model, dataset_key_spec, eval_model, load_frozen,
                                save_module, seed_everything, write_metrics)
from mlfd.stages.joint import CachedTargets, JointPlan, joint_key, joint_targets, plan_for
from mlfd.stages.teachers import train_teacher
from mlfd.store import Artifact, ArtifactStore

KIND = "student"


def _to_view(x: torch.Tensor, src_mean, src_std, dst_size: int, dst_mean, dst_std) -> torch.Tensor:
    """Re-express a normalized batch in another model's input convention (size, normalization): same pixels."""
    m = lambda v: to_device(torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1), x.device)  # noqa: E731
    img = x * m(src_std) + m(src_mean)
    if img.shape[-1] != dst_size:
        img = F.interpolate(img, size=(dst_size, dst_size), mode="bilinear", align_corners=False, antialias=True)
    return (img - m(dst_mean)) / m(dst_std)


class StudentTask:
    """Eq. (3): w_ce*CE + alpha*T^2*KL(t/T || s/T) + sum_c beta_c*MSE(P_c(s_c), t_c) for c in 1..k."""

    def __init__(self, ctx: Context, name: str, plan: JointPlan, sspec: StudentSpec):
        self.ctx, self.name, self.plan, self.sspec, self.recipe = ctx, name, plan, sspec, sspec.recipe
        self.ds = ctx.data(name)
        model_spec = ctx.spec.dataset(name).student_net  # fresh or timm-pretrained, never the teacher's weights
        self.tf = ctx.transform(self.ds, model_spec, self.recipe)
        targets_art, self.joint = joint_targets(ctx, plan, name)  # may train T* here, drawing from the global RNG
        self.gen = seed_everything(self.recipe.seed)
        self.head = plan.datasets.index(name)
        self.levels = [c for c in range(1, plan.level + 1) if sspec.beta(c) > 0]
        backbone = build_level_model(model_spec, self.ds.num_classes, ctx.device,
                                     use_channels_last(ctx.device, self.recipe.channels_last))
        self.module = Student(backbone, {c: self.joint.embedding_shapes[c] for c in self.levels}).to(ctx.device)
        if sspec.targets == "cache":
            self.targets = CachedTargets(ctx, targets_art, plan.level, self.levels)
        else:
            self.teachers = []
            for t in plan.teachers:
                t_spec, t_data = ctx.spec.dataset(t), ctx.data(t)
                self.teachers.append((load_frozen(train_teacher(ctx, t), t_spec.model, t_data.num_classes,
                                                  ctx.device), t_spec.model.input_size, t_data.mean, t_data.std))
        self.train_loader = make_loader(self.ds.train.images, self.ds.train.labels, self.recipe.batch_size, True,
                                        self.recipe.seed, ctx.device)
        self.eval_loaders = EvalLoaders(self.ds, ctx.device)

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_batches(self, epoch: int) -> Iterator:
        self.gen.manual_seed(self.recipe.seed * 1000 + epoch)
        self.train_loader.epoch = epoch  # same permutations after a resume
        batches = (self.targets.attach(self.train_loader) if self.sspec.targets == "cache"
                   else ((*b, None) for b in self.train_loader))
        for idx, x, y, fetched in batches:
            yield idx, self.tf(x, train=True, generator=self.gen), y, fetched

    @torch.no_grad()
    def _online_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Frozen teachers and T* on the student's own augmented view (aligned targets)."""
        feats = [net.forward_level(_to_view(x, self.ds.mean, self.ds.std, size, mean, std), self.plan.level).float()
                 for net, size, mean, std in self.teachers]
        z, embs = self.joint(feats)
        return self.joint.logits(z, self.head), embs

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        idx, x, y, fetched = batch
        if self.sspec.targets == "cache":
            t_logits, t_embs = self.targets.lookup(idx, fetched)
        else:
            t_logits, t_embs = self._online_targets(x)
        s_logits, s_feats = self.module(x)
        s = self.sspec
        return mlfd_loss(s_logits, y, t_logits if s.alpha > 0 else None, s_feats,
                         {c: t_embs[c].to(s_feats[c].dtype) for c in self.levels}, w_ce=s.w_ce, alpha=s.alpha,
                         temperature=s.temperature, betas={c: s.beta(c) for c in self.levels},
                         label_smoothing=self.recipe.label_smoothing)

    def evaluate(self, split: str) -> dict[str, float]:
        return eval_model(self.module.backbone, self.eval_loaders(split), self.tf, self.ctx.dtype(self.recipe))


def student_variant(ctx: Context, control: str | None, name: str) -> StudentSpec:
    """The effective student spec of dataset ``name`` in a control run: ``no_kd`` sets alpha to 0; ``own_teacher``
    changes only the plan."""
    s = ctx.spec.student_for(name)
    return dataclasses.replace(s, alpha=0.0) if control == "no_kd" else s


def student_key(ctx: Context, name: str, plan: JointPlan, sspec: StudentSpec) -> str:
    ds = ctx.spec.dataset(name)
    return ArtifactStore.key(KIND, {"data": dataset_key_spec(ds), "model": to_dict(ds.student_net),
                                    "student": to_dict(sspec), "level": plan.level,
                                    **autoaugment_key(sspec.recipe.augment), **accumulation_key(sspec.recipe)},
                             {"joint": joint_key(ctx, plan)})


def train_student(ctx: Context, name: str, level: int, control: str | None = None) -> Artifact:
    """The student of dataset ``name`` at fusion level ``level`` (``control``: None, ``no_kd`` or ``own_teacher``)."""
    plan = plan_for(ctx, level, name, own=control == "own_teacher")
    sspec = student_variant(ctx, control, name)
    role = "student" if control is None else f"student_{control}"

    def build(tmp: Path) -> dict:
        task = StudentTask(ctx, name, plan, sspec)
        res = fit(task, task.recipe, ctx.device, on_epoch=ctx.on_epoch, resume=ctx.resume,
                  desc=f"{role} {name} L{level}", progress=ctx.progress)
        task.module.eval()
        test = task.evaluate("test")
        save_module(task.module.backbone.model, tmp / "model.pt")
        val = {k[4:]: v for k, v in res.best_metrics.items() if k.startswith("val/")}
        write_metrics(tmp, role=role, dataset=name, level=level, val=val, test=test, best_epoch=res.best_epoch,
                      epochs=res.epochs_run, seed=task.recipe.seed, history=res.history)
        return {"dataset": name, "level": level, "role": role}

    return ctx.store.get_or_build(KIND, student_key(ctx, name, plan, sspec), build)
