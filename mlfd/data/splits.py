"""From a :class:`DatasetSpec` to :class:`DatasetSplits`: class filtering, stratified carving, subsets, statistics."""

from __future__ import annotations

import numpy as np
import torch

from mlfd.config import DatasetSpec, spec_hash, to_dict
from mlfd.errors import SpecError
from mlfd.data.base import DatasetSplits, FileImages, ImageSet, RawData
from mlfd.data.sources import SOURCES

# Independent random streams of one split_seed, one per use, so that e.g. max_train does not move the val carve.
_STREAM = {"test": 1, "val": 2, "max_train": 3, "max_val": 4, "max_test": 5, "stream_stats": 6}
_CACHE: dict[str, DatasetSplits] = {}

STREAM_STATS_IMAGES = 10_000
"""A streamed split's normalization statistics come from at most this many of its train images (a seeded sample;
all of them when there are fewer): every process that loads the dataset computes them, by decoding."""


def stratified_split(labels: np.ndarray, n: int, rng: np.random.Generator,
                     keep_rest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``n`` samples with class proportions as close as possible to those of ``labels``.

    Per-class counts follow the largest-remainder rule; when ``n`` is at least the number of classes every class gets
    at least one sample. Within a class the samples are drawn by ``rng``.

    Args:
        labels: Integer labels ``[N]``.
        n: How many samples to take (clipped to what is available).
        rng: The random generator (its state advances).
        keep_rest: Leave at least one sample of every class in the rest.

    Returns:
        The sorted indices taken and the sorted indices left.
    """
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    upper = counts - 1 if keep_rest else counts
    n = min(n, int(upper.sum()))
    quota = counts * (n / max(len(labels), 1))
    lower = np.minimum(1, upper) if n >= len(classes) else np.zeros_like(upper)
    alloc = np.clip(np.floor(quota).astype(np.int64), lower, upper)
    while alloc.sum() < n:
        alloc[np.argmax(np.where(alloc < upper, quota - alloc, -np.inf))] += 1
    while alloc.sum() > n:
        alloc[np.argmax(np.where(alloc > lower, alloc - quota, -np.inf))] -= 1
    take = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(alloc)]
    taken = np.sort(np.concatenate(take)) if take else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[taken] = False
    return taken, np.flatnonzero(mask)


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[stream]])


def _select_classes(raw: RawData, wanted: list, path: str) -> RawData:
    """Keep only the ``wanted`` classes (indices or names), relabelled 0..n-1 in the given order."""
    names = {c: i for i, c in enumerate(raw.classes)}
    picked = []
    for c in wanted:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(raw.classes):
            picked.append(c)
        elif isinstance(c, str) and c in names:
            picked.append(names[c])
        else:
            shown = raw.classes if len(raw.classes) <= 20 else raw.classes[:20] + ["..."]
            raise SpecError(f"{path}.classes: unknown class {c!r}; allowed: indices 0..{len(raw.classes) - 1} "
                            f"or names {shown}")
    if len(set(picked)) != len(picked):
        raise SpecError(f"{path}.classes: {wanted} names the same class twice")
    lut = torch.full((len(raw.classes),), -1, dtype=torch.int64)
    lut[torch.tensor(picked)] = torch.arange(len(picked))

    def keep(s: ImageSet | None) -> ImageSet | None:
        if s is None:
            return None
        new = lut[s.labels]
        idx = torch.nonzero(new >= 0).flatten()
        return ImageSet(s.images[idx].contiguous(), new[idx].contiguous())

    return RawData(classes=[raw.classes[i] for i in picked], train=keep(raw.train), test=keep(raw.test),
                   val=keep(raw.val), test_fraction=raw.test_fraction)


def _carve(s: ImageSet, fraction: float, rng: np.random.Generator) -> tuple[ImageSet, ImageSet]:
    """Split ``s`` into (rest, carved) with a stratified ``fraction`` carved."""
    carved, rest = stratified_split(s.labels.numpy(), int(round(fraction * len(s))), rng, keep_rest=True)
    return s.subset(rest), s.subset(carved)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, C, H, W]`` images in [0, 1] units, repeated to 3 channels if C == 1."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in images.split(chunk):
        x = part.to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    n = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean = total / n
    std = (total_sq / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    if images.shape[1] == 1:
        mean, std = mean.repeat(3), std.repeat(3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _stats_images(train: ImageSet, seed: int) -> torch.Tensor | FileImages:
    """The images the train statistics are computed on: all of them, or a sample of a large streamed split."""
    if isinstance(train.images, FileImages) and len(train) > STREAM_STATS_IMAGES:
        pick = np.sort(_rng(seed, "stream_stats").choice(len(train), STREAM_STATS_IMAGES, replace=False))
        return train.images[pick]
    return train.images


def build_splits(spec: DatasetSpec, path: str | None = None) -> DatasetSplits:
    """Load ``spec``'s source and derive its splits (no memoisation; see :func:`load_dataset`).

    Order: class filter, test carve (if the source has no test), val carve (``val_fraction``, if the source has no
    val), stratified ``max_*`` subsets, then train statistics (of a streamed split: of at most
    :data:`STREAM_STATS_IMAGES` of its images). Every random choice is seeded by ``spec.split_seed``.

    Args:
        spec: The dataset spec.
        path: Field path of ``spec`` in error messages (default ``datasets.<name>``).

    Raises:
        SpecError: on bad options, unreadable data, unknown classes or an empty split.
    """
    path = path or f"datasets.{spec.name}"
    if spec.source not in SOURCES:
        raise SpecError(f"{path}.source: unknown source {spec.source!r}; allowed: {sorted(SOURCES)}")
    raw = SOURCES[spec.source](spec.options, f"{path}.options")
    if spec.classes is not None:
        raw = _select_classes(raw, spec.classes, path)
    train, val, test = raw.train, raw.val, raw.test
    if test is None:
        train, test = _carve(train, raw.test_fraction, _rng(spec.split_seed, "test"))
    if val is None:
        train, val = _carve(train, spec.val_fraction, _rng(spec.split_seed, "val"))
    parts = {"train": train, "val": val, "test": test}
    for name, limit in (("train", spec.max_train), ("val", spec.max_val), ("test", spec.max_test)):
        if limit is not None and limit < len(parts[name]):
            taken, _ = stratified_split(parts[name].labels.numpy(), limit, _rng(spec.split_seed, f"max_{name}"))
            parts[name] = parts[name].subset(taken)
    for name, s in parts.items():
        if len(s) == 0:
            cause = f"{path}.classes" if spec.classes is not None else f"{path}.options"
            if name == "val" and raw.val is None:
                cause = f"{path}.val_fraction"
            elif name == "test" and raw.test is None:
                cause = f"{path}.options.test_fraction"
            raise SpecError(f"{cause}: the {name} split of dataset {spec.name!r} is empty; it needs at least one image")
    mean, std = channel_stats(_stats_images(parts["train"], spec.split_seed))
    return DatasetSplits(name=spec.name, classes=list(raw.classes), mean=mean, std=std, **parts)


def load_dataset(spec: DatasetSpec, path: str | None = None) -> DatasetSplits:
    """The splits of ``spec``, memoised in-process by the spec's data fields (its models do not matter).

    The returned object is shared between callers: treat its tensors as read-only.

    Args:
        spec: The dataset spec.
        path: Field path of ``spec`` in error messages (default ``datasets.<name>``).

    Raises:
        SpecError: see :func:`build_splits`.
    """
    data = to_dict(spec)
    data.pop("model")
    data.pop("student_model")
    key = spec_hash(data)
    if key not in _CACHE:
        _CACHE[key] = build_splits(spec, path)
    return _CACHE[key]


