"""Mini-batches for the training device: over in-memory tensors resident there, or decoded from image files by
DataLoader workers (pinned memory, persistent workers), in the same order either way."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mlfd.data.base import FileImages, _Decoded, worker_errors


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A CPU tensor goes to a GPU through pinned memory without blocking the host: a copy from
    pageable memory makes the host wait for the GPU's queued work, which at every training step would leave the GPU
    idle while the next step is prepared. Used for what a step draws or slices on the CPU (augmentation randomness,
    sample indices)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batch_bounds(n: int, batch_size: int, drop_last: bool = False, train: bool = False) -> list[tuple[int, int]]:
    """``[start, stop)`` of each batch over ``n`` samples in order.

    A training epoch (``train``) never ends on a batch of one sample: that sample joins the batch before it (BatchNorm
    cannot normalize a single sample in training mode), so the last batch holds ``batch_size + 1``.
    """
    count = n // batch_size if drop_last else -(-n // batch_size)
    bounds = [(b * batch_size, min(n, (b + 1) * batch_size)) for b in range(count)]
    if train and len(bounds) >= 2 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class _EpochLoader:
    """What both loaders share: batch count, and a per-epoch sample order drawn from ``seed + epoch``.

    A shuffled (training) loader never yields a last batch of one sample: it joins the batch before it
    (:func:`batch_bounds`).
    """

    def __init__(self, n: int, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int,
                 device: str | torch.device, drop_last: bool, name: str):
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        if n != labels.shape[0]:
            raise ValueError(f"{name}: {n} images but {labels.shape[0]} labels")
        self.device = torch.device(device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def _bounds(self) -> list[tuple[int, int]]:
        return batch_bounds(self.labels.shape[0], self.batch_size, self.drop_last, train=self.shuffle)

    def __len__(self) -> int:
        return len(self._bounds())

    def _next_batches(self, device: torch.device) -> list[torch.Tensor]:
        """This epoch's batches of sample indices (int64 on ``device``, one copy there), and start the next epoch."""
        n = self.labels.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).to(device)
        else:
            order = torch.arange(n, device=device)
        self.epoch += 1
        return [order[a:b] for a, b in self._bounds()]


class TensorLoader(_EpochLoader):
    """Batches over in-memory tensors on a device, yielding ``(idx, images_uint8, labels)``.

    ``idx`` holds the int64 indices of the batch's samples in the source tensors (on ``device``), used to look up cached
    per-sample targets. The tensors are moved to ``device`` once, at construction, so a CUDA loader keeps the whole
    dataset resident on the GPU and batches are gathered there.

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``.
        batch_size: Samples per batch.
        shuffle: Draw a new permutation every epoch (from a CPU generator seeded with ``seed + epoch``).
        seed: Base seed of the permutations.
        device: Where the tensors and the batches live.
        drop_last: Drop the last, incomplete batch.

    Attributes:
        epoch: Number of epochs started so far; the next ``iter()`` uses permutation seed ``seed + epoch``. Set it to
            resume a run's sequence of permutations.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False):
        super().__init__(images.shape[0], labels, batch_size, shuffle, seed, device, drop_last, "TensorLoader")
        self.images = images.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx in self._next_batches(self.device):
            yield idx, self.images[idx], self.labels[idx]


class _Batches:
    """A batch sampler whose batches are replaced every epoch (a persistent DataLoader asks it anew each epoch)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader(_EpochLoader):
    """Batches of images decoded from their files (:class:`FileImages`), yielding ``(idx, images_uint8, labels)`` on
    ``device`` exactly as :class:`TensorLoader` would for the same images held in memory.

    A ``torch.utils.data.DataLoader`` decodes in ``images.workers`` processes, kept alive across epochs (persistent
    workers) and prefetching ahead; batches land in pinned memory when ``device`` is CUDA and are copied to it
    without blocking. Arguments and attributes: as :class:`TensorLoader`.
    """

    PREFETCH = 4
    """Batches each worker decodes ahead."""

    def __init__(self, images: FileImages, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False):
        super().__init__(len(images), labels, batch_size, shuffle, seed, device, drop_last, "StreamLoader")
        self.images = images
        self._sampler = _Batches()
        self._loader = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = self._next_batches(torch.device("cpu"))
        self._sampler.batches = [b.tolist() for b in batches]
        if self._loader is None:
            from torch.utils.data import DataLoader  # local: keeps torch.utils.data out of in-memory runs

            workers = self.images.workers
            self._loader = DataLoader(_Decoded(self.images), batch_sampler=self._sampler, num_workers=workers,
                                      pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                      prefetch_factor=self.PREFETCH if workers > 0 else None)
        for x, b in zip(worker_errors(self._loader), batches):
            idx = to_device(b, self.device)
            yield idx, x.to(self.device, non_blocking=True), self.labels[idx]


def make_loader(images: torch.Tensor | FileImages, labels: torch.Tensor, batch_size: int, shuffle: bool,
                seed: int = 0, device: str | torch.device = "cpu",
                drop_last: bool = False) -> TensorLoader | StreamLoader:
    """The loader for a split's images: :class:`StreamLoader` for images left in files, else :class:`TensorLoader`."""
    cls = StreamLoader if isinstance(images, FileImages) else TensorLoader
    return cls(images, labels, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device, drop_last=drop_last)
