"""What every stage shares: the run context, frozen-model loading, batching helpers and artifact metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mlfd.config import DatasetSpec, ModelSpec, PipelineSpec, RecipeSpec, to_dict
from mlfd.data import BatchTransform, DatasetSplits, StreamLoader, TensorLoader, load_dataset, make_loader
from mlfd.engine import amp_dtype, autocast, evaluate_logits, resolve_device, use_channels_last
from mlfd.models import LevelModel, create_model
from mlfd.store import Artifact, ArtifactStore, atomic_write_text, load_torch, save_torch

SPLITS = ("train", "val", "test")
EVAL_BATCH = 512

EpochHook = Callable[[int, dict, Callable[[], dict]], None]


@dataclass
class Context:
    """Everything a stage needs besides its own spec.

    Args:
        spec: the pipeline.
        store: where artifacts live.
        progress: show progress bars / per-epoch lines.
        on_epoch: forwarded to :func:`mlfd.engine.fit` of the stage being trained (Ray Tune reporting).
        resume: resumable state for the stage being trained (from a Tune checkpoint).
        log: callback for stage-level events (MLflow tracking); receives (role, dataset, level, metrics dict).
    """

    spec: PipelineSpec
    store: ArtifactStore
    progress: bool = True
    on_epoch: EpochHook | None = None
    resume: dict | None = None
    log: Callable[..., None] | None = None
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.spec.device)

    def data(self, name: str) -> DatasetSplits:
        return load_dataset(self.spec.dataset(name))

    def transform(self, ds: DatasetSplits, model: ModelSpec, recipe: RecipeSpec | None) -> BatchTransform:
        """The batch transform of ``model`` on ``ds`` (train-time augmentation from ``recipe`` if given)."""
        cl = use_channels_last(self.device, recipe.channels_last if recipe else "auto")
        return BatchTransform(model.input_size, ds.mean, ds.std, recipe.augment if recipe else None, channels_last=cl)

    def dtype(self, recipe: RecipeSpec) -> torch.dtype | None:
        return amp_dtype(self.device, recipe.amp)


READ_ONLY_OPTIONS = {"folder": ("stream", "workers")}
"""Source options that change how the images are read, not which images or their pixels: not part of store keys."""


def dataset_key_spec(ds: DatasetSpec) -> dict:
    """The part of a dataset spec that defines its data (not the models or recipes trained on it, nor how its files
    are read)."""
    d = to_dict(ds)
    for k in ("model", "student_model", "teacher", "student"):
        d.pop(k)
    d["options"] = {k: v for k, v in d["options"].items() if k not in READ_ONLY_OPTIONS.get(ds.source, ())}
    return d


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_level_model(model: ModelSpec, num_classes: int, device: torch.device, channels_last: bool) -> LevelModel:
    net = LevelModel(create_model(model, num_classes), model.input_size).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def load_frozen(art: Artifact, model: ModelSpec, num_classes: int, device: torch.device) -> LevelModel:
    """A trained model from an artifact, in eval mode with gradients off ("frozen means frozen")."""
    net = LevelModel(create_model(ModelSpec(**{**to_dict(model), "checkpoint": None, "pretrained": False}),
                                  num_classes), model.input_size)
    net.model.load_state_dict(load_torch(art.file("model.pt")))
    net.to(device).eval().requires_grad_(False)
    return net


class EvalLoaders:
    """Un-shuffled loaders over a dataset's splits, each built on first use and kept for the life of the task that
    owns it: between evaluations a streamed split keeps its decode workers and a GPU keeps its copy of the images.

    Args:
        ds: The dataset.
        device: Where the batches go.
    """

    def __init__(self, ds: DatasetSplits, device: torch.device):
        self.ds, self.device = ds, device
        self._loaders: dict[str, TensorLoader | StreamLoader] = {}

    def __call__(self, split: str) -> TensorLoader | StreamLoader:
        if split not in self._loaders:
            s = getattr(self.ds, split)
            self._loaders[split] = make_loader(s.images, s.labels, EVAL_BATCH, False, 0, self.device)
        return self._loaders[split]


@torch.inference_mode()
def eval_model(net: nn.Module, loader: TensorLoader | StreamLoader, tf: BatchTransform, dtype: torch.dtype | None,
               head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Top-1/top-5 of a classifier over one un-shuffled loader of a split (un-augmented)."""
    was = net.training
    net.eval()

    def batches():
        for _, x, y in loader:
            with autocast(loader.device, dtype):
                out = net(tf(x, train=False))
                logits = out[0] if isinstance(out, tuple) else out
                if head is not None:
                    logits = head(logits)
            yield logits, y

    res = evaluate_logits(batches())
    net.train(was)
    return res


def write_metrics(path: Path, **payload: Any) -> None:
    atomic_write_text(path / "metrics.json" if path.is_dir() else path, json.dumps(payload, indent=1, default=float))


def read_metrics(art: Artifact) -> dict:
    return json.loads(art.file("metrics.json").read_text())


def save_module(module: nn.Module, path: Path) -> None:
    save_torch({k: v.detach().cpu() for k, v in module.state_dict().items()}, path)
