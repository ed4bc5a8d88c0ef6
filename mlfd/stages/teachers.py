"""Stage 1: one teacher per dataset, trained from scratch, or fine-tuned from a checkpoint or timm pretrained weights
(taken as they are with ``teacher.epochs: 0``). The same run is the dataset-specific baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from mlfd.config import to_dict
from mlfd.data import make_loader
from mlfd.data.transforms import autoaugment_key
from mlfd.engine import accumulation_key, fit, use_channels_last
from mlfd.losses import ce_loss
from mlfd.models import create_model
from mlfd.stages.common import (Context, EvalLoaders, build_level_model, dataset_key_spec, eval_model, save_module,
                                seed_everything, write_metrics)
from mlfd.store import Artifact, ArtifactStore

KIND = "teacher"


class ClassifierTask:
    """Plain supervised training of one classifier on one dataset (CE on augmented batches)."""

    def __init__(self, ctx: Context, name: str, model_spec, recipe):
        self.ctx, self.recipe = ctx, recipe
        self.ds = ctx.data(name)
        self.gen = seed_everything(recipe.seed)
        self.tf = ctx.transform(self.ds, model_spec, recipe)
        self.module = build_level_model(model_spec, self.ds.num_classes, ctx.device,
                                        use_channels_last(ctx.device, recipe.channels_last))
        self.train_loader = make_loader(self.ds.train.images, self.ds.train.labels, recipe.batch_size, True,
                                        recipe.seed, ctx.device)
        self.eval_loaders = EvalLoaders(self.ds, ctx.device)

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_batches(self, epoch: int) -> Iterator:
        self.gen.manual_seed(self.recipe.seed * 1000 + epoch)
        self.train_loader.epoch = epoch  # same permutations after a resume
        for _, x, y in self.train_loader:
            yield self.tf(x, train=True, generator=self.gen), y

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits, _ = self.module(x)
        ce = ce_loss(logits, y, self.recipe.label_smoothing)
        return {"loss": ce, "ce": ce}

    def evaluate(self, split: str) -> dict[str, float]:
        return eval_model(self.module, self.eval_loaders(split), self.tf, self.ctx.dtype(self.recipe))


def teacher_key(ctx: Context, name: str) -> str:
    """The store key of dataset ``name``'s teacher: its data, model and effective recipe."""
    ds = ctx.spec.dataset(name)
    recipe = ctx.spec.teacher_for(name)
    return ArtifactStore.key(KIND, {"data": dataset_key_spec(ds), "model": to_dict(ds.model),
                                    "recipe": to_dict(recipe), **autoaugment_key(recipe.augment),
                                    **accumulation_key(recipe)})


def train_teacher(ctx: Context, name: str) -> Artifact:
    """The trained (or fine-tuned, or given) teacher of dataset ``name``, built once per spec."""
    ds_spec = ctx.spec.dataset(name)
    recipe = ctx.spec.teacher_for(name)

    def build(tmp: Path) -> dict:
        if recipe.epochs == 0:  # validation allows 0 only for a checkpointed or pretrained model
            return _load_given(ctx, name, tmp)
        task = ClassifierTask(ctx, name, ds_spec.model, recipe)
        res = fit(task, recipe, ctx.device, on_epoch=ctx.on_epoch, resume=ctx.resume, desc=f"teacher {name}",
                  progress=ctx.progress)
        test = task.evaluate("test")
        save_module(task.module.model, tmp / "model.pt")
        val = {k[4:]: v for k, v in res.best_metrics.items() if k.startswith("val/")}
        write_metrics(tmp, role="dataset_specific", dataset=name, val=val, test=test, best_epoch=res.best_epoch,
                      epochs=res.epochs_run, seed=recipe.seed, history=res.history)
        given = bool(ds_spec.model.checkpoint or ds_spec.model.pretrained)
        return {"dataset": name, "arch": ds_spec.model.arch, **({"fine_tuned": True} if given else {})}

    return ctx.store.get_or_build(KIND, teacher_key(ctx, name), build)


def _load_given(ctx: Context, name: str, tmp: Path) -> dict:
    """Skip training (``teacher.epochs: 0``): take a checkpoint / timm weights as the teacher, evaluate it."""
    ds_spec = ctx.spec.dataset(name)
    ds = ctx.data(name)
    net = create_model(ds_spec.model, ds.num_classes)
    save_module(net, tmp / "model.pt")
    lm = build_level_model(ds_spec.model, ds.num_classes, ctx.device, False)
    lm.model.load_state_dict(net.state_dict())
    tf = ctx.transform(ds, ds_spec.model, None)
    recipe = ctx.spec.teacher_for(name)
    dtype = ctx.dtype(recipe)
    loaders = EvalLoaders(ds, ctx.device)
    val = eval_model(lm, loaders("val"), tf, dtype)
    test = eval_model(lm, loaders("test"), tf, dtype)
    write_metrics(tmp, role="dataset_specific", dataset=name, val=val, test=test, best_epoch=0, epochs=0,
                  seed=recipe.seed, history=[])
    return {"dataset": name, "arch": ds_spec.model.arch, "loaded": True}
