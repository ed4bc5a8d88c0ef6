"""A folder of image files: the ImageFolder layout (``root/<class>/...`` or ``root/{train,val,test}/<class>/...``)
and TinyImageNet-200 as distributed; decoded into memory at load, or streamed from the files batch by batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlfd.data.base import DECODE_WORKERS, FileImages, ImageSet, RawData
from mlfd.data.decode import CHANNELS, check_image_header, decode_image
from mlfd.data.sources.common import _decode_all, _Options
from mlfd.errors import SpecError


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
