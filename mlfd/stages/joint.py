"""Stage 2: the joint teacher T*, trained on cached frozen-teacher features only.

Three shapes of the same thing, all built by :func:`train_joint`:

* ``union`` (Algorithm 1): all teachers, trained on the union of all datasets, one head per dataset;
* ``per_target`` (the authors' code): all teachers, trained on one target dataset, one head;
* ``own`` (a control): the target's own teacher only, trained on the target dataset (distillation without fusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from mlfd.config import to_dict
from mlfd.data import batch_bounds, to_device
from mlfd.engine import evaluate_logits, fit
from mlfd.losses import ce_loss
from mlfd.models import JointTeacher
from mlfd.stages.cache import build_cache, cache_key, load_cache
from mlfd.stages.common import (EVAL_BATCH, SPLITS, Context, dataset_key_spec, save_module, seed_everything,
                                write_metrics)
from mlfd.store import Artifact, ArtifactStore, load_torch, read_features, write_features

KIND = "joint"
VERSION = 3  # in the artifact key: see mlfd.store.ArtifactStore.key; 3: no training batch of one sample (batch_bounds)
TARGETS_KIND = "joint_targets"


@dataclass(frozen=True)
class JointPlan:
    """Which teachers are fused, on which datasets T* trains (one head each), at which level."""

    level: int
    teachers: tuple[str, ...]
    datasets: tuple[str, ...]
    mode: str  # union | per_target | own

    @property
    def label(self) -> str:
        return f"L{self.level}" if self.mode == "union" else f"L{self.level}/{self.mode}:{self.datasets[0]}"


def plan_for(ctx: Context, level: int, target: str | None = None, own: bool = False) -> JointPlan:
    """The joint teacher a student of ``target`` distils from (the union T* when ``variant`` is union)."""
    names = tuple(d.name for d in ctx.spec.datasets)
    if own:
        return JointPlan(level, (target,), (target,), "own")
    if ctx.spec.joint.variant == "per_target" and target is not None:
        return JointPlan(level, names, (target,), "per_target")
    return JointPlan(level, names, names, "union")


def joint_key(ctx: Context, plan: JointPlan) -> str:
    inputs = {f"features/{t}/{d}": cache_key(ctx, t, d, plan.level) for t in plan.teachers for d in plan.datasets}
    return ArtifactStore.key(KIND, {"v": VERSION, "joint": to_dict(ctx.spec.joint), "level": plan.level,
                                    "teachers": plan.teachers,
                                    "datasets": plan.datasets,
                                    "data": [dataset_key_spec(ctx.spec.dataset(d)) for d in plan.datasets]}, inputs)


class _Features:
    """Cached features of every (teacher, dataset, split), with labels."""

    def __init__(self, ctx: Context, plan: JointPlan):
        self.x: dict[tuple[str, str, str], torch.Tensor] = {}
        self.y: dict[tuple[str, str], torch.Tensor] = {}
        for d in plan.datasets:
            data = ctx.data(d)
            for split in SPLITS:
                self.y[d, split] = getattr(data, split).labels.to(ctx.device)
            for t in plan.teachers:
                art = build_cache(ctx, t, d, plan.level)
                for split in SPLITS:
                    self.x[t, d, split] = load_cache(art, split, ctx.device)
        self.shapes = [tuple(self.x[t, plan.datasets[0], "train"].shape[1:]) for t in plan.teachers]


def build_joint_model(ctx: Context, plan: JointPlan, in_shapes: list[tuple[int, ...]]) -> JointTeacher:
    j = ctx.spec.joint
    return JointTeacher(in_shapes, plan.level, [ctx.data(d).num_classes for d in plan.datasets],
                        adaptor_width=j.adaptor_width, width=j.width, dropout=j.dropout).to(ctx.device)


class JointTask:
    """T* on mixed batches over the union of its datasets; each sample's CE uses its own dataset's head."""

    def __init__(self, ctx: Context, plan: JointPlan):
        self.ctx, self.plan, self.recipe = ctx, plan, ctx.spec.joint.recipe
        self.feats = _Features(ctx, plan)
        # Seeded right before T* is built: its initial weights must not depend on what ran before in this process.
        self.gen = seed_everything(self.recipe.seed)
        self.module = build_joint_model(ctx, plan, self.feats.shapes)
        sizes = [self.feats.y[d, "train"].numel() for d in plan.datasets]
        # (dataset id, sample index) of every training sample of the union
        self.ds_id = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
        self.sample = torch.cat([torch.arange(n) for n in sizes])

    def steps_per_epoch(self) -> int:
        return len(batch_bounds(self.ds_id.numel(), self.recipe.batch_size, train=True))

    def _inputs(self, d: str, split: str, idx: torch.Tensor) -> list[torch.Tensor]:
        idx = to_device(idx, self.ctx.device)  # every cached split lives on the training device (load_cache)
        return [self.feats.x[t, d, split][idx].float() for t in self.plan.teachers]

    def train_batches(self, epoch: int) -> Iterator:
        self.gen.manual_seed(self.recipe.seed * 1000 + epoch)
        perm = torch.randperm(self.ds_id.numel(), generator=self.gen)
        for a, z in batch_bounds(perm.numel(), self.recipe.batch_size, train=True):
            b = perm[a:z]
            yield self.ds_id[b], self.sample[b]

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        ds_id, sample = batch
        # Grouped on the CPU (no GPU sync), each group's indices copied to the device once
        groups = [(i, to_device(sample[ds_id == i], self.ctx.device)) for i in range(len(self.plan.datasets))
                  if (ds_id == i).any()]
        # One forward over the whole mixed batch: every teacher's features have one shape whatever the dataset.
        inputs = [torch.cat(parts)
                  for parts in zip(*[self._inputs(self.plan.datasets[i], "train", idx) for i, idx in groups])]
        z, _ = self.module(inputs)
        total, start = 0.0, 0
        for i, idx in groups:
            y = self.feats.y[self.plan.datasets[i], "train"][idx]
            logits = self.module.logits(z[start: start + idx.numel()], i)
            total = total + ce_loss(logits, y, self.recipe.label_smoothing) * idx.numel()
            start += idx.numel()
        loss = total / sample.numel()
        return {"loss": loss, "ce": loss}

    def evaluate_dataset(self, d: str, split: str) -> dict[str, float]:
        i = self.plan.datasets.index(d)
        y = self.feats.y[d, split]

        def batches():
            for s in range(0, y.numel(), EVAL_BATCH):
                idx = torch.arange(s, min(s + EVAL_BATCH, y.numel()), device=y.device)
                z, _ = self.module(self._inputs(d, split, idx))
                yield self.module.logits(z, i), y[idx]

        return evaluate_logits(batches())

    def evaluate(self, split: str) -> dict[str, float]:
        """Mean over datasets (the selection metric) plus each dataset's own numbers."""
        per = {d: self.evaluate_dataset(d, split) for d in self.plan.datasets}
        out = {k: sum(p[k] for p in per.values()) / len(per) for k in ("acc1", "acc5", "loss")}
        if len(per) > 1:
            for d, p in per.items():
                out.update({f"{d}/acc1": p["acc1"], f"{d}/acc5": p["acc5"]})
        return out


def train_joint(ctx: Context, plan: JointPlan) -> Artifact:
    """Build (once) the joint teacher of ``plan``."""

    def build(tmp: Path) -> dict:
        task = JointTask(ctx, plan)
        res = fit(task, task.recipe, ctx.device, on_epoch=ctx.on_epoch, resume=ctx.resume, desc=f"joint {plan.label}",
                  progress=ctx.progress)
        task.module.eval()
        with torch.inference_mode():
            val = {d: task.evaluate_dataset(d, "val") for d in plan.datasets}
            test = {d: task.evaluate_dataset(d, "test") for d in plan.datasets}
        save_module(task.module, tmp / "model.pt")
        write_metrics(tmp, role="joint_teacher", level=plan.level, mode=plan.mode, datasets=list(plan.datasets),
                      teachers=list(plan.teachers), val=val, test=test, best_epoch=res.best_epoch,
                      epochs=res.epochs_run, seed=task.recipe.seed, history=res.history,
                      in_shapes=[list(s) for s in task.feats.shapes])
        return {"level": plan.level, "mode": plan.mode, "in_shapes": [list(s) for s in task.feats.shapes]}

    return ctx.store.get_or_build(KIND, joint_key(ctx, plan), build)


def load_joint(ctx: Context, plan: JointPlan, art: Artifact) -> JointTeacher:
    """A trained T*, frozen."""
    model = build_joint_model(ctx, plan, [tuple(s) for s in art.meta()["in_shapes"]])
    model.load_state_dict(load_torch(art.file("model.pt")))
    return model.eval().requires_grad_(False)


def joint_targets(ctx: Context, plan: JointPlan, target: str) -> tuple[Artifact, JointTeacher]:
    """T*'s logits (target's head) and embeddings e_1..e_k on the target's un-augmented train images, cached."""
    art = train_joint(ctx, plan)
    model = load_joint(ctx, plan, art)

    def build(tmp: Path) -> dict:
        feats = [load_cache(build_cache(ctx, t, target, plan.level), "train", ctx.device) for t in plan.teachers]
        head = plan.datasets.index(target)
        logits, embs = [], {c: [] for c in range(1, plan.level + 1)}
        with torch.inference_mode():
            for s in range(0, feats[0].shape[0], EVAL_BATCH):
                z, e = model([f[s: s + EVAL_BATCH].float() for f in feats])
                logits.append(model.logits(z, head).float().cpu())
                for c in embs:
                    embs[c].append(e[c].float().cpu())
        write_features(tmp / "logits.arrow", torch.cat(logits).numpy())
        for c, parts in embs.items():
            write_features(tmp / f"emb_l{c}.arrow", torch.cat(parts).numpy())
        return {"target": target, "level": plan.level}

    key = ArtifactStore.key(TARGETS_KIND, {"target": target}, {"joint": art.key})
    return ctx.store.get_or_build(TARGETS_KIND, key, build), model


def read_targets(art: Artifact, level: int, device: torch.device) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    logits = torch.from_numpy(read_features(art.file("logits.arrow"))[0].astype("float32")).to(device)
    embs = {c: torch.from_numpy(read_features(art.file(f"emb_l{c}.arrow"))[0].astype("float32")).to(device)
            for c in range(1, level + 1)}
    return logits, embs
