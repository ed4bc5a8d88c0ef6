"""Dataset containers shared by the sources, the split logic and the stages: uint8 images in memory, or read from
their files batch by batch (:class:`FileImages`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mlfd.errors import SpecError
from mlfd.data.decode import CHANNELS, decode_image

DECODE_WORKERS = 4
"""Default DataLoader worker processes that decode a streamed image folder (``folder`` source, ``workers``)."""

SPLIT_BYTES = 64 * 2**20
"""Most bytes of one decoded chunk of :meth:`FileImages.split` (each worker holds two ahead)."""


class FileImages:
    """The images of a split left in their files: decoded batch by batch, never held whole in memory.

    It stands in for the uint8 ``[N, C, H, W]`` tensor of :attr:`ImageSet.images` where the split logic and the
    stages need one: ``shape``, ``dtype``, ``len``, indexing by an index array (a subset, still in files),
    ``contiguous()`` and ``split(chunk)`` (decoded chunks in order). Loaders read it with DataLoader workers
    (:class:`mlfd.data.loader.StreamLoader`).

    Args:
        files: One image file per sample.
        mode: "RGB" or "L".
        size: (H, W) every image is resized to.
        workers: DataLoader worker processes that decode (0: in the reading process).
    """

    dtype = torch.uint8

    def __init__(self, files: Sequence[str], mode: str, size: tuple[int, int], workers: int = DECODE_WORKERS):
        self.files, self.mode, self.size, self.workers = list(files), mode, (int(size[0]), int(size[1])), workers

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), CHANNELS[self.mode], *self.size))

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: np.ndarray | torch.Tensor | Sequence[int]) -> FileImages:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64)).tolist()
        return FileImages([self.files[i] for i in idx], self.mode, self.size, self.workers)

    def contiguous(self) -> FileImages:
        return self

    def decode(self, i: int) -> torch.Tensor:
        """Sample ``i`` as uint8 ``[C, H, W]`` (a contiguous, writable copy)."""
        return torch.from_numpy(np.array(decode_image(self.files[i], self.files[i], self.mode, self.size)))

    def split(self, chunk: int) -> Iterator[torch.Tensor]:
        """Every image in order, decoded in chunks of ``chunk`` images, or fewer to keep a chunk within
        :data:`SPLIT_BYTES` (uint8 ``[<=chunk, C, H, W]``)."""
        from torch.utils.data import DataLoader  # local: keeps torch.utils.data out of in-memory runs

        chunk = max(1, min(chunk, SPLIT_BYTES // max(1, self.shape[1:].numel())))
        batches = [list(range(s, min(s + chunk, len(self)))) for s in range(0, len(self), chunk)]
        yield from worker_errors(DataLoader(_Decoded(self), batch_sampler=batches,
                                            num_workers=min(self.workers, len(batches))))

    def __repr__(self) -> str:
        return f"FileImages({len(self)} files, {self.mode}, {self.size[0]}x{self.size[1]})"


def worker_errors(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches``, with a :class:`SpecError` raised in a DataLoader worker (an unreadable file) brought back to its
    own one line (the DataLoader re-raises it with the worker's traceback in the message)."""
    try:
        yield from batches
    except SpecError as e:
        raise SpecError(str(e).strip().splitlines()[-1].split("SpecError: ", 1)[-1]) from None


class _Decoded:
    """A map-style dataset over :class:`FileImages`: index -> uint8 ``[C, H, W]``."""

    def __init__(self, images: FileImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images.decode(i)


@dataclass
class ImageSet:
    """One split of a dataset.

    Attributes:
        images: uint8 ``[N, C, H, W]`` with ``C`` in {1, 3}, contiguous, on the CPU; or the same images left in their
            files (:class:`FileImages`, a streamed image folder).
        labels: int64 ``[N]`` with values in ``0..num_classes-1``.
    """

    images: torch.Tensor | FileImages
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
