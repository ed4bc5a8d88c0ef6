"""Stage 2: the joint teacher T*, trained on cached frozen-teacher features only.

Three shapes of the same thing, all built by :func:`train_joint`:

* ``union`` (Algorithm 1): all teachers, trained on the union of all datasets, one head per dataset;
* ``per_target`` (the authors' code): all teachers, trained on one target dataset, one head;
* ``own`` (a control): the target's own teacher only, trained on the target dataset (distillation without fusion).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from mlfd.config import to_dict
from mlfd.data import batch_bounds, to_device
from mlfd.engine import accumulation_key, evaluate_logits, fit
from mlfd.losses import ce_loss
from mlfd.models import JointTeacher
from mlfd.stages.cache import (Prefetcher, build_cache, cache_key, open_cache, place_caches, resident,
                               to_device_async)
from mlfd.stages.common import (EVAL_BATCH, SPLITS, Context, dataset_key_spec, save_module, seed_everything,
                                write_metrics)
from mlfd.store import Artifact, ArtifactStore, FeatureFile, FeatureWriter, features_to_torch, load_torch

KIND = "joint"
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


READ_ONLY_FIELDS = ("cache_on_device", "cache_memory_fraction")
"""Fields of JointSpec that say how the caches are read, not what is computed: not part of artifact keys."""


def joint_key(ctx: Context, plan: JointPlan) -> str:
    inputs = {f"features/{t}/{d}": cache_key(ctx, t, d, plan.level) for t in plan.teachers for d in plan.datasets}
    joint = to_dict(ctx.spec.joint)
    for where in READ_ONLY_FIELDS:  # where the caches are read from changes no weight (same samples, same order)
        joint.pop(where)
    return ArtifactStore.key(KIND, {"joint": joint, "level": plan.level,
                                    "teachers": plan.teachers,
                                    "datasets": plan.datasets,
                                    "data": [dataset_key_spec(ctx.spec.dataset(d)) for d in plan.datasets],
                                    **accumulation_key(ctx.spec.joint.recipe)}, inputs)


class _Features:
    """Cached features of every (teacher, dataset, split), with labels (on the device).

    The features are either copied whole to the device (``on_device``: ``x[t, d, split]`` tensors) or kept out of core
    (``files[t, d, split]``, memory-mapped, read by :meth:`gather`), as ``joint.cache_on_device`` decides
    (:func:`mlfd.stages.cache.place_caches`). Either way a gather returns the same values in the storage type.
    """

    def __init__(self, ctx: Context, plan: JointPlan):
        self.device = ctx.device
        self.y: dict[tuple[str, str], torch.Tensor] = {}
        self.files: dict[tuple[str, str, str], FeatureFile] = {}
        for d in plan.datasets:
            data = ctx.data(d)
            for split in SPLITS:
                self.y[d, split] = getattr(data, split).labels.to(ctx.device)
            for t in plan.teachers:
                art = build_cache(ctx, t, d, plan.level)
                for split in SPLITS:
                    self.files[t, d, split] = open_cache(art, split)
        j = ctx.spec.joint
        self.placement = place_caches(j.cache_on_device, sum(f.nbytes for f in self.files.values()), ctx.device,
                                      j.cache_memory_fraction, f"joint teacher {plan.label}")
        self.on_device: bool = self.placement["on_device"]
        self.x: dict[tuple[str, str, str], torch.Tensor] = {}
        if self.on_device:
            self.x = {k: resident(f, ctx.device) for k, f in self.files.items()}
        self.shapes = [tuple(self.files[t, plan.datasets[0], "train"].shape[1:]) for t in plan.teachers]

    def gather(self, t: str, d: str, split: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of a cached split, in its storage type: on the device if the cache is there (``idx`` best on
        the device too), else on the host, read from the memory map (``idx`` on the CPU)."""
        if self.on_device:
            return self.x[t, d, split][to_device(idx, self.device)]
        f = self.files[t, d, split]
        return features_to_torch(f.take(idx.numpy()), f.dtype)


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
        """Every teacher's float32 features of samples ``idx`` of ``d``'s ``split``, on the device (``idx`` on the
        device when the caches are there, else on the CPU)."""
        return [to_device(self.feats.gather(t, d, split, idx), self.ctx.device).float() for t in self.plan.teachers]

    def _groups(self, ds_id: torch.Tensor, sample: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """A mixed batch's (dataset id, sample indices) groups, in dataset order, indices on the CPU."""
        return [(i, sample[ds_id == i]) for i in range(len(self.plan.datasets)) if (ds_id == i).any()]

    def _order(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's mixed batches: one seeded permutation of the union (the same whichever way the caches are
        read, so the two ways give the same weights)."""
        self.gen.manual_seed(self.recipe.seed * 1000 + epoch)
        perm = torch.randperm(self.ds_id.numel(), generator=self.gen)
        for a, z in batch_bounds(perm.numel(), self.recipe.batch_size, train=True):
            b = perm[a:z]
            yield self.ds_id[b], self.sample[b]

    def _prepare(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        """Out of core: a step's features gathered from the memory maps and copied to the device (prefetch thread)."""
        groups = self._groups(*batch)
        dev = self.ctx.device
        inputs = [to_device_async(torch.cat([self.feats.gather(t, self.plan.datasets[i], "train", idx)
                                             for i, idx in groups]), dev) for t in self.plan.teachers]
        return [(i, to_device_async(idx, dev)) for i, idx in groups], inputs

    def train_batches(self, epoch: int) -> Iterator:
        if self.feats.on_device:
            # Grouped on the CPU (no GPU sync), each group's indices copied to the device once
            for batch in self._order(epoch):
                groups = [(i, to_device(idx, self.ctx.device)) for i, idx in self._groups(*batch)]
                yield groups, None
            return
        yield from Prefetcher(self._order(epoch), self._prepare, self.ctx.device)

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        groups, inputs = batch
        if inputs is None:  # the caches are on the device: gather there
            # One forward over the whole mixed batch: every teacher's features have one shape whatever the dataset.
            inputs = [torch.cat(parts) for parts in zip(*[self._inputs(self.plan.datasets[i], "train", idx)
                                                          for i, idx in groups])]
        else:
            inputs = [x.float() for x in inputs]
        z, _ = self.module(inputs)
        total, start, n = 0.0, 0, 0
        for i, idx in groups:
            y = self.feats.y[self.plan.datasets[i], "train"][idx]
            logits = self.module.logits(z[start: start + idx.numel()], i)
            total = total + ce_loss(logits, y, self.recipe.label_smoothing) * idx.numel()
            start += idx.numel()
            n += idx.numel()
        loss = total / n
        return {"loss": loss, "ce": loss}

    def evaluate_dataset(self, d: str, split: str) -> dict[str, float]:
        i = self.plan.datasets.index(d)
        y = self.feats.y[d, split]
        where = y.device if self.feats.on_device else torch.device("cpu")

        def batches():
            for s in range(0, y.numel(), EVAL_BATCH):
                idx = torch.arange(s, min(s + EVAL_BATCH, y.numel()), device=where)
                z, _ = self.module(self._inputs(d, split, idx))
                yield self.module.logits(z, i), y[s: s + EVAL_BATCH]

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
                      in_shapes=[list(s) for s in task.feats.shapes], cache=task.feats.placement)
        return {"level": plan.level, "mode": plan.mode, "in_shapes": [list(s) for s in task.feats.shapes],
                "cache_on_device": task.feats.on_device}

    return ctx.store.get_or_build(KIND, joint_key(ctx, plan), build)


def load_joint(ctx: Context, plan: JointPlan, art: Artifact) -> JointTeacher:
    """A trained T*, frozen."""
    model = build_joint_model(ctx, plan, [tuple(s) for s in art.meta()["in_shapes"]])
    model.load_state_dict(load_torch(art.file("model.pt")))
    return model.eval().requires_grad_(False)


def joint_targets(ctx: Context, plan: JointPlan, target: str) -> tuple[Artifact, JointTeacher]:
    """T*'s logits (target's head) and embeddings e_1..e_k on the target's un-augmented train images, cached.

    Streamed: the target's cached features are read from their memory maps a batch at a time and each batch of
    targets is written as it is computed (host memory bounded by a batch), in ``joint.cache_dtype``.
    """
    art = train_joint(ctx, plan)
    model = load_joint(ctx, plan, art)
    dtype = ctx.spec.joint.cache_dtype

    def build(tmp: Path) -> dict:
        files = [open_cache(build_cache(ctx, t, target, plan.level), "train") for t in plan.teachers]
        head = plan.datasets.index(target)
        label = f"T* {plan.label} targets on {target}"
        with contextlib.ExitStack() as stack:
            w_logits = stack.enter_context(FeatureWriter(tmp / "logits.arrow", dtype, label=f"{label} (logits)"))
            w_embs = {c: stack.enter_context(FeatureWriter(tmp / f"emb_l{c}.arrow", dtype,
                                                           label=f"{label} (embedding e_{c})"))
                      for c in range(1, plan.level + 1)}
            with torch.inference_mode():
                for s in range(0, len(files[0]), EVAL_BATCH):
                    z, e = model([to_device(features_to_torch(f.rows(s, s + EVAL_BATCH), f.dtype), ctx.device).float()
                                  for f in files])
                    w_logits.write(model.logits(z, head).float().cpu())
                    for c, w in w_embs.items():
                        w.write(e[c].float().cpu())
        return {"target": target, "level": plan.level, "dtype": dtype}

    return ctx.store.get_or_build(TARGETS_KIND, targets_key(ctx, art.key, target), build), model


def targets_key(ctx: Context, joint: str, target: str) -> str:
    """Store key of the targets of the joint teacher with key ``joint`` on dataset ``target``."""
    return ArtifactStore.key(TARGETS_KIND, {"target": target, "dtype": ctx.spec.joint.cache_dtype}, {"joint": joint})


class CachedTargets:
    """T*'s cached targets for a student's training batches: whole on the device, or gathered per batch from the
    Arrow files in a background thread that runs ahead of the training step (``joint.cache_on_device``).

    Both paths give the same float32 values for the same batch, so a student's weights do not depend on the choice.

    Args:
        ctx: the run context.
        art: the ``joint_targets`` artifact.
        level: the plan's fusion level (files ``emb_l1..emb_l<level>``).
        levels: the levels the student distils (the embeddings it reads).
    """

    def __init__(self, ctx: Context, art: Artifact, level: int, levels: list[int]):
        self.device, self.levels = ctx.device, list(levels)
        self.logits = open_cache_file(art, "logits.arrow")
        self.embs = {c: open_cache_file(art, f"emb_l{c}.arrow") for c in self.levels}
        files = [self.logits, *self.embs.values()]
        j = ctx.spec.joint
        self.placement = place_caches(j.cache_on_device, sum(f.nbytes for f in files), ctx.device,
                                      j.cache_memory_fraction, f"student targets of {art.meta().get('target')}")
        self.on_device: bool = self.placement["on_device"]
        if self.on_device:
            self.x_logits = resident(self.logits, ctx.device)
            self.x_embs = {c: resident(f, ctx.device) for c, f in self.embs.items()}

    def _fetch(self, batch: tuple) -> tuple:
        idx = batch[0].cpu().numpy()
        rows = [self.logits.take(idx), *(f.take(idx) for f in self.embs.values())]
        t = [to_device_async(features_to_torch(r, self.logits.dtype), self.device) for r in rows]
        return (*batch, (t[0], dict(zip(self.embs, t[1:]))))

    def attach(self, loader: Iterable) -> Iterator[tuple]:
        """``(idx, x, y, targets)`` for each ``(idx, x, y)`` batch of ``loader``; ``targets`` is None when they are on
        the device (:meth:`lookup` gathers them there)."""
        if self.on_device:
            for batch in loader:
                yield (*batch, None)
            return
        yield from Prefetcher(loader, self._fetch, self.device)

    def lookup(self, idx: torch.Tensor, fetched: tuple | None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """float32 (logits, {level: embedding}) of samples ``idx`` on the device."""
        if fetched is None:
            idx = idx.to(self.device)
            return self.x_logits[idx].float(), {c: self.x_embs[c][idx].float() for c in self.levels}
        logits, embs = fetched
        return logits.float(), {c: e.float() for c, e in embs.items()}


def open_cache_file(art: Artifact, name: str) -> FeatureFile:
    return FeatureFile(art.file(name))


def read_targets(art: Artifact, level: int, device: torch.device) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """All of T*'s cached targets, float32, whole on ``device``."""
    def whole(name: str) -> torch.Tensor:
        return resident(FeatureFile(art.file(name)), device).float()

    return whole("logits.arrow"), {c: whole(f"emb_l{c}.arrow") for c in range(1, level + 1)}
