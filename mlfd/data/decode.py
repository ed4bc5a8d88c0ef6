"""Decoding image files and bytes to uint8 ``[C, H, W]`` arrays (shared by the sources and :class:`FileImages`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mlfd.errors import SpecError

CHANNELS = {"L": 1, "RGB": 3}
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises for a file that is not a readable image."""


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Grayscale 16/32-bit integer or float images as 8-bit "L".

    16-bit images (and any with values above 255) are scaled by 1/257, float images in [0, 1] by 255.
    """
    a = np.asarray(img).astype(np.float64)
    top = a.max(initial=0.0)
    if img.mode.startswith("I;16") or top > 255:
        a = a / 257.0
    elif img.mode == "F" and top <= 1:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def image_to_array(img: Image.Image, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PIL image as uint8 ``[C, H, W]`` in ``mode`` ("RGB" or "L"), resized (bilinear) to ``size`` = (H, W).

    Handles 1, L, LA, P, RGB, RGBA, CMYK and 16-bit ("I;16", "I") or float ("F") grayscale inputs; alpha is dropped.
    """
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    img = img.convert(mode)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_image(src: Path | bytes, where: str, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One encoded image (a file or its bytes) as uint8 ``[C, H, W]`` (see :func:`image_to_array`).

    Raises:
        SpecError: naming ``where`` if it is not a readable image.
    """
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            img.load()
            return image_to_array(img, mode, size)
    except _UNREADABLE as e:
        raise SpecError(f"{where}: not a readable image ({one_line(e)})") from None


def check_image_header(file: Path, where: str) -> None:
    """Raise :class:`SpecError` naming ``where`` unless ``file`` opens as an image (its header only: no decoding)."""
    try:
        with Image.open(file):  # parses the header, decodes nothing
            pass
    except _UNREADABLE as e:
        raise SpecError(f"{where}: not a readable image ({one_line(e)})") from None
