"""Parquet and Arrow IPC tables whose cells are encoded PNG/JPEG images, with a label column (class names from
Hugging Face ``datasets`` metadata when present)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlfd.data.base import ImageSet, RawData
from mlfd.data.decode import CHANNELS, one_line
from mlfd.data.sources.common import _class_names, _decode_all, _Options
from mlfd.errors import SpecError


TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


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
