"""The two multi-dataset baselines: a shared backbone with one head per dataset, or one head over all classes.

Each is trained once per distinct student architecture among the datasets (``PipelineSpec.baseline_groups``), so
every column compares a student with baselines of its own architecture."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mlfd.config import ModelSpec, PipelineSpec, RecipeSpec, to_dict
from mlfd.data import make_loader
from mlfd.data.transforms import autoaugment_key
from mlfd.engine import accumulation_key, fit, use_channels_last
from mlfd.losses import ce_loss
from mlfd.models import create_model
from mlfd.stages.common import (Context, EvalLoaders, dataset_key_spec, eval_model, save_module, seed_everything,
                                write_metrics)
from mlfd.store import Artifact, ArtifactStore

KIND = "baseline"
MODES = ("multi_head", "joint_head")


def _cycle(ld) -> Iterator:
    """Endless batches, a fresh permutation each pass (itertools.cycle would replay the first pass)."""
    while True:
        yield from ld


class _Shared(nn.Module):
    """A timm backbone without classifier (pooled features) and linear heads."""

    def __init__(self, model: ModelSpec, out: list[int]):
        super().__init__()
        self.backbone = create_model(model, 0)
        width = self.backbone.num_features
        self.heads = nn.ModuleList(nn.Linear(width, k) for k in out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class SharedTask:
    """multi_head: each dataset through its own head, CE with weight 1/m each. joint_head: one head over the union of
    classes (labels offset per dataset), the m batches concatenated into one forward.

    multi_head ``batching``: ``alternate`` (the paper) yields one dataset's batch per micro-step, each with its own
    forward and backward, and :meth:`fit_recipe` accumulates m of them per optimizer step (BatchNorm sees one dataset
    at a time; memory holds one batch's graph); ``concat`` concatenates the m batches into one forward like joint_head.
    Both weigh the datasets equally and take one optimizer step per batch of each dataset.

    An epoch is as many (per-dataset) batches as the largest dataset needs; smaller datasets cycle.
    """

    def __init__(self, ctx: Context, mode: str, model: ModelSpec, recipe: RecipeSpec, batching: str | None = None):
        self.ctx, self.mode, self.recipe = ctx, mode, recipe
        self.alternate = mode == "multi_head" and (batching or ctx.spec.baselines.multi_head_batching) == "alternate"
        self.names = [d.name for d in ctx.spec.datasets]
        self.data = [ctx.data(n) for n in self.names]
        counts = [d.num_classes for d in self.data]
        self.offsets = [sum(counts[:i]) for i in range(len(counts))]
        self.counts = counts
        self.gen = seed_everything(recipe.seed)
        self.module = _Shared(model, counts if mode == "multi_head" else [sum(counts)]).to(ctx.device)
        if use_channels_last(ctx.device, recipe.channels_last):
            self.module = self.module.to(memory_format=torch.channels_last)
        self.tfs = [ctx.transform(d, model, recipe) for d in self.data]
        self.loaders = [make_loader(d.train.images, d.train.labels, recipe.batch_size, True, recipe.seed + i,
                                    ctx.device) for i, d in enumerate(self.data)]
        self.eval_loaders = [EvalLoaders(d, ctx.device) for d in self.data]

    def fit_recipe(self) -> RecipeSpec:
        """The recipe :func:`mlfd.engine.fit` runs: alternate batching accumulates one batch of each dataset."""
        if not self.alternate:
            return self.recipe
        return dataclasses.replace(self.recipe, grad_accum=self.recipe.grad_accum * len(self.names))

    def _rounds(self) -> int:
        return max(len(ld) for ld in self.loaders)

    def steps_per_epoch(self) -> int:
        return self._rounds() * (len(self.names) if self.alternate else 1)

    def train_batches(self, epoch: int) -> Iterator:
        self.gen.manual_seed(self.recipe.seed * 1000 + epoch)
        for ld in self.loaders:
            ld.epoch = epoch * self._rounds()  # distinct, resumable permutations for cycled datasets
        iters = [_cycle(ld) for ld in self.loaders]
        for _ in range(self._rounds()):
            batch = []
            for i, it in enumerate(iters):
                _, x, y = next(it)
                item = (i, self.tfs[i](x, train=True, generator=self.gen), y)
                if self.alternate:
                    yield [item]
                else:
                    batch.append(item)
            if not self.alternate:
                yield batch

    def _head(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        if self.mode == "multi_head":
            return self.module.heads[i](feats)
        return self.module.heads[0](feats)

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        if self.alternate:  # one dataset's batch; fit_recipe's accumulation divides by m (equal weights)
            (i, x, y), = batch
            ce = ce_loss(self._head(i, self.module(x)), y, self.recipe.label_smoothing)
            return {"loss": ce}
        feats = self.module(torch.cat([x for _, x, _ in batch]))
        parts, start = [], 0
        for i, x, y in batch:
            f = feats[start: start + x.shape[0]]
            start += x.shape[0]
            target = y if self.mode == "multi_head" else y + self.offsets[i]
            parts.append(ce_loss(self._head(i, f), target, self.recipe.label_smoothing))
        loss = sum(parts) / len(parts)
        return {"loss": loss, **{f"ce_{n}": p for n, p in zip(self.names, parts)}}

    def _dataset_logits(self, i: int):
        """Logits of dataset i's own classes (the joint head is read on the target's class slice)."""
        if self.mode == "multi_head":
            return lambda f: self.module.heads[i](f)
        lo, hi = self.offsets[i], self.offsets[i] + self.counts[i]
        return lambda f: self.module.heads[0](f)[:, lo:hi]

    def evaluate_dataset(self, i: int, split: str) -> dict[str, float]:
        return eval_model(self.module, self.eval_loaders[i](split), self.tfs[i], self.ctx.dtype(self.recipe),
                          head=self._dataset_logits(i))

    def evaluate(self, split: str) -> dict[str, float]:
        per = [self.evaluate_dataset(i, split) for i in range(len(self.names))]
        out = {k: sum(p[k] for p in per) / len(per) for k in ("acc1", "acc5", "loss")}
        for n, p in zip(self.names, per):
            out.update({f"{n}/acc1": p["acc1"], f"{n}/acc5": p["acc5"]})
        return out


def baseline_model(ctx: Context, name: str | None = None) -> tuple[ModelSpec, RecipeSpec]:
    """Backbone and recipe of the baselines reported in dataset ``name``'s column (default: the first dataset's).

    The backbone is ``baselines.model`` if set, else that dataset's student architecture; the recipe is
    ``baselines.recipe`` if set, else the effective teacher recipe of the first dataset with that architecture.
    """
    return baseline_spec(ctx.spec, name)


def baseline_spec(spec: PipelineSpec, name: str | None = None) -> tuple[ModelSpec, RecipeSpec]:
    """:func:`baseline_model` of a pipeline spec (no context needed)."""
    name = name or spec.datasets[0].name
    for model, names in spec.baseline_groups():
        if name in names:
            return model, spec.baselines.recipe or spec.teacher_for(names[0])
    raise KeyError(name)  # unreachable: every dataset is in one group


def baseline_key(ctx: Context, mode: str, name: str | None = None) -> str:
    """Store key of the ``mode`` baseline reported in ``name``'s column: datasets sharing an architecture share it."""
    model, recipe = baseline_model(ctx, name)
    how = {"batching": ctx.spec.baselines.multi_head_batching} if mode == "multi_head" else {}
    return ArtifactStore.key(KIND, {"mode": mode, "model": to_dict(model), "recipe": to_dict(recipe),
                                    "data": [dataset_key_spec(d) for d in ctx.spec.datasets], **how,
                                    **autoaugment_key(recipe.augment), **accumulation_key(recipe)})


def train_baseline(ctx: Context, mode: str, name: str | None = None) -> Artifact:
    """Build (once) the ``multi_head`` or ``joint_head`` baseline over all datasets with the backbone of dataset
    ``name``'s column (see :func:`baseline_model`)."""
    model, recipe = baseline_model(ctx, name)

    def build(tmp: Path) -> dict:
        task = SharedTask(ctx, mode, model, recipe)
        res = fit(task, task.fit_recipe(), ctx.device, on_epoch=ctx.on_epoch, resume=ctx.resume,
                  desc=f"{mode} {model.arch}", progress=ctx.progress)
        task.module.eval()
        with torch.inference_mode():
            val = {n: task.evaluate_dataset(i, "val") for i, n in enumerate(task.names)}
            test = {n: task.evaluate_dataset(i, "test") for i, n in enumerate(task.names)}
        save_module(task.module, tmp / "model.pt")
        write_metrics(tmp, role=mode, arch=model.arch, val=val, test=test, best_epoch=res.best_epoch,
                      epochs=res.epochs_run, seed=recipe.seed, history=res.history)
        return {"mode": mode, "arch": model.arch}

    return ctx.store.get_or_build(KIND, baseline_key(ctx, mode, name), build)
