"""Datasets as uint8 tensors (in memory, or decoded from image files batch by batch): sources, deterministic splits,
batched transforms and device loaders."""

from mlfd.config import register_check
from mlfd.data.base import DatasetSplits, FileImages, ImageSet, RawData
from mlfd.data.loader import StreamLoader, TensorLoader, batch_bounds, make_loader, to_device
from mlfd.data.sources import SOURCES
from mlfd.data.splits import load_dataset
from mlfd.data.transforms import BatchTransform
from mlfd.errors import SpecError

__all__ = ["SOURCES", "BatchTransform", "DatasetSplits", "FileImages", "ImageSet", "RawData", "StreamLoader",
           "TensorLoader", "batch_bounds", "check_source", "load_dataset", "make_loader", "to_device"]


def check_source(name: str, path: str) -> None:
    """Raise :class:`SpecError` unless ``name`` is a key of :data:`SOURCES` (``DatasetSpec.source`` validation)."""
    if name not in SOURCES:
        raise SpecError(f"{path}: unknown source {name!r}; allowed: {sorted(SOURCES)}")


register_check("source", check_source)  # config validates DatasetSpec.source through this once mlfd.data is loaded
