"""Feature cache: frozen-teacher features per (teacher, dataset, split, level), extracted once, float16 Arrow files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from mlfd.data import make_loader
from mlfd.engine import autocast
from mlfd.stages.common import EVAL_BATCH, SPLITS, Context, dataset_key_spec, load_frozen
from mlfd.stages.teachers import teacher_key, train_teacher
from mlfd.store import Artifact, ArtifactStore, read_features, write_features

KIND = "features"


def cache_key(ctx: Context, teacher: str, data: str, level: int) -> str:
    return ArtifactStore.key(KIND, {"data": dataset_key_spec(ctx.spec.dataset(data)), "level": level,
                                    "dtype": "float16"}, {"teacher": teacher_key(ctx, teacher)})


def build_cache(ctx: Context, teacher: str, data: str, level: int) -> Artifact:
    """Features at ``level`` of the frozen teacher of dataset ``teacher`` over every split of dataset ``data``.

    Images are un-augmented and preprocessed the teacher's way (its input size, its dataset's normalization).
    """
    t_art = train_teacher(ctx, teacher)

    def build(tmp: Path) -> dict:
        t_spec = ctx.spec.dataset(teacher)
        t_data = ctx.data(teacher)
        ds = ctx.data(data)
        net = load_frozen(t_art, t_spec.model, t_data.num_classes, ctx.device)
        net.check_levels([level], f"fusion level for datasets[{teacher}].model")
        tf = ctx.transform(t_data, t_spec.model, None)  # teacher's own input convention
        dtype = ctx.dtype(ctx.spec.teacher)
        meta = {}
        with torch.inference_mode():
            for split in SPLITS:
                s = getattr(ds, split)
                chunks = []
                for _, x, _ in make_loader(s.images, s.labels, EVAL_BATCH, False, 0, ctx.device):
                    with autocast(ctx.device, dtype):
                        chunks.append(net.forward_level(tf(x, train=False), level).float().cpu())
                arr = torch.cat(chunks).numpy()
                meta[split] = write_features(tmp / f"{split}.arrow", arr, {"teacher": teacher, "data": data,
                                                                           "level": level, "split": split})
        return {"teacher": teacher, "data": data, "level": level,
                "shape": meta["train"]["shape"][1:], "bytes_per_image": int(np.prod(meta["train"]["shape"][1:]) * 2)}

    return ctx.store.get_or_build(KIND, cache_key(ctx, teacher, data, level), build)


def load_cache(art: Artifact, split: str, device: torch.device, verify: bool = True) -> torch.Tensor:
    """A cached split as a float16 tensor on ``device`` (memory-mapped on CPU; one copy to a GPU)."""
    arr, _ = read_features(art.file(f"{split}.arrow"), verify=verify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mmap; we never write into it
        t = torch.from_numpy(arr)
    return t.to(device) if device.type != "cpu" else t
