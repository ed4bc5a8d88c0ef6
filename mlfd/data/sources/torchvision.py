"""Any ``torchvision.datasets`` classification dataset, by class name."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlfd.data.base import ImageSet, RawData
from mlfd.data.decode import image_to_array, one_line
from mlfd.data.sources.common import _class_names, _Options
from mlfd.errors import SpecError


TORCHVISION_ROOT = "~/.cache/mlfd/torchvision"
TORCHVISION_EXAMPLES = ["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST", "SVHN", "STL10",
                        "USPS", "GTSRB", "Flowers102", "FakeData"]


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
