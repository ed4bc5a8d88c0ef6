"""What every source shares: typed access to its options with one-line errors, decoding a list of images, and
class names from a dataset's labels."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlfd.data.decode import CHANNELS, decode_image
from mlfd.errors import SpecError


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


def _class_names(names: Any, labels: np.ndarray) -> list[str]:
    """The dataset's class names if it has a long enough list of them, else the label values as strings."""
    n = int(labels.max(initial=-1)) + 1
    if isinstance(names, (list, tuple)) and len(names) >= n and all(isinstance(c, str) for c in names):
        return list(names)
    return [str(i) for i in range(n)]
