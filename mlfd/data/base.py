"""In-memory dataset containers shared by the sources, the split logic and the stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageSet:
    """One split of a dataset, resident in memory.

    Attributes:
        images: uint8 ``[N, C, H, W]`` with ``C`` in {1, 3}, contiguous, on the CPU.
        labels: int64 ``[N]`` with values in ``0..num_classes-1``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray) -> ImageSet:
        """An image set from a uint8 ``[N, C, H, W]`` array and integer labels ``[N]`` (copied if read-only)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        return cls(torch.from_numpy(images if images.flags.writeable else images.copy()),
                   torch.from_numpy(np.array(labels, dtype=np.int64)))

    def subset(self, index: np.ndarray | torch.Tensor) -> ImageSet:
        """The samples at ``index`` (a new, contiguous image set)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return ImageSet(self.images[idx].contiguous(), self.labels[idx].contiguous())


@dataclass
class DatasetSplits:
    """A loaded dataset: train/val/test image sets, class names and normalization statistics.

    Attributes:
        name: The dataset's name (``DatasetSpec.name``).
        classes: Class names; the index of a name is its label.
        train: Training split.
        val: Validation split (from the source, or carved from train).
        test: Test split (from the source, or carved from the source's only split).
        mean: Per-channel mean of the 3-channel train images, in [0, 1] units.
        std: Per-channel standard deviation of the 3-channel train images, in [0, 1] units.
    """

    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0..num_classes-1``)."""
        return len(self.classes)


@dataclass
class RawData:
    """What a source returns, before class filtering, val carving and subsetting.

    Attributes:
        classes: Class names of the source; the index of a name is its label.
        train: The source's training split (or its only split).
        test: The source's test split; None if the source has none (then ``test_fraction`` of train is carved).
        val: The source's validation split; None if the source has none (then ``val_fraction`` of train is carved).
        test_fraction: Stratified fraction of train carved as test when ``test`` is None.
    """

    classes: list[str]
    train: ImageSet
    test: ImageSet | None = None
    val: ImageSet | None = None
    test_fraction: float = 0.2
