"""Datasets as in-memory uint8 tensors: sources, deterministic splits, batched transforms and a device loader."""

from mlfd.data.base import DatasetSplits, ImageSet, RawData
from mlfd.data.loader import TensorLoader
from mlfd.data.sources import SOURCES
from mlfd.data.splits import clear_dataset_cache, load_dataset
from mlfd.data.transforms import BatchTransform

__all__ = ["SOURCES", "BatchTransform", "DatasetSplits", "ImageSet", "RawData", "TensorLoader", "clear_dataset_cache",
           "load_dataset"]
