"""Datasets as uint8 tensors (in memory, or decoded from image files batch by batch): sources, deterministic splits,
batched transforms and device loaders."""

from mlfd.data.base import DatasetSplits, FileImages, ImageSet, RawData
from mlfd.data.loader import StreamLoader, TensorLoader, batch_bounds, make_loader, to_device
from mlfd.data.sources import SOURCES
from mlfd.data.splits import clear_dataset_cache, load_dataset
from mlfd.data.transforms import BatchTransform

__all__ = ["SOURCES", "BatchTransform", "DatasetSplits", "FileImages", "ImageSet", "RawData", "StreamLoader",
           "TensorLoader", "batch_bounds", "clear_dataset_cache", "load_dataset", "make_loader", "to_device"]
