"""Mini-batches over in-memory tensors, resident on the training device."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorLoader:
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
        if batch_size < 1:
            raise ValueError(f"TensorLoader: batch_size must be >= 1, got {batch_size}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"TensorLoader: {images.shape[0]} images but {labels.shape[0]} labels")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        self.epoch += 1
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield idx, self.images[idx], self.labels[idx]
