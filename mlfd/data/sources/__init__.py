"""Dataset sources: each turns a ``DatasetSpec.options`` mapping into :class:`RawData` of uint8 images.

Every loader has the signature ``loader(options, path) -> RawData`` where ``path`` is the dotted field path of the
options mapping (e.g. ``datasets.digits.options``), used to name the offending option in :class:`SpecError` messages.
Unknown option keys are rejected with the list of allowed options.

One module per source family: :mod:`~mlfd.data.sources.offline` (sklearn_digits, mnist5k, fashion_mnist),
:mod:`~mlfd.data.sources.torchvision`, :mod:`~mlfd.data.sources.folder` (imagefolder and tinyimagenet layouts),
:mod:`~mlfd.data.sources.parquet`; :mod:`~mlfd.data.sources.common` holds what they share. The registry
:data:`SOURCES` is here.
"""

from __future__ import annotations

from collections.abc import Callable

from mlfd.data.base import RawData
from mlfd.data.sources.folder import FOLDER_LAYOUTS, load_folder
from mlfd.data.sources.offline import (FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist5k, load_sklearn_digits,
                                       read_idx)
from mlfd.data.sources.parquet import load_parquet
from mlfd.data.sources.torchvision import load_torchvision

__all__ = ["FASHION_MNIST_CLASSES", "FOLDER_LAYOUTS", "SOURCES", "Loader", "load_fashion_mnist", "load_folder",
           "load_mnist5k", "load_parquet", "load_sklearn_digits", "load_torchvision", "read_idx"]

Loader = Callable[[dict, str], RawData]


SOURCES: dict[str, Loader] = {
    "sklearn_digits": load_sklearn_digits,
    "mnist5k": load_mnist5k,
    "fashion_mnist": load_fashion_mnist,
    "torchvision": load_torchvision,
    "folder": load_folder,
    "parquet": load_parquet,
}
"""Source name -> loader ``(options, options_field_path) -> RawData``."""
