"""Content-addressed artifact store and the pyarrow feature cache.

An artifact is a directory ``ROOT/<kind>/<key>/`` whose key hashes the stage spec and the keys of its inputs. It is
built in a temporary sibling directory and renamed into place (atomic on POSIX filesystems), so a reader never sees a
half-written artifact; a ``MANIFEST.json`` with per-file SHA-256 sums marks it complete and lets readers detect
corruption. A per-key lock file (:mod:`filelock`) makes concurrent builders build it once: the first builds, the rest
wait and reuse it.

Keys carry code versions: :data:`STORE_SCHEMA` (the layout of the store itself) and :data:`CODE_VERSIONS` (one per
artifact kind, plus ``data`` for the split/subset/decode/transform code every artifact depends on). Bump the entry of
a kind when a change of code changes what an artifact of that kind holds; every key of that kind changes, and so do
the keys of the artifacts built from it (their inputs' keys are part of their own).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock
import numpy as np
import pyarrow as pa

from mlfd.config import spec_hash, to_dict
from mlfd.errors import CorruptArtifact, SpecError, StorageError
from mlfd.fileio import atomic_write_bytes, atomic_write_text, fsync_dir, storage_error

__all__ = ["MANIFEST", "STORE_SCHEMA", "CODE_VERSIONS", "Artifact", "ArtifactStore", "CorruptArtifact", "SpecError",
           "StorageError", "atomic_write_bytes", "atomic_write_text", "load_torch", "read_features", "save_torch",
           "sha256_file", "write_features"]

_logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"

STORE_SCHEMA = 1
"""Version of the store's layout (directories, manifest, key recipe). Part of every key."""

CODE_VERSIONS: dict[str, int] = {
    "data": 1,  # mlfd.data: sources, splits, subsets, decoding, transforms; part of every key
    # 2: timm optimizers (no decay on norm/bias) and schedulers, a real one-cycle; 3: a checkpointed or pretrained
    # teacher is fine-tuned unless its epochs are 0; 4: a lone last training sample joins the batch before it
    "teacher": 4,
    "features": 2,  # stages/cache.py. 2: record batches written as extracted, storage type from joint.cache_dtype
    # 2: timm optimizers and schedulers; 3: metrics say where the caches were read from; 4: no training batch of one
    "joint": 4,
    "joint_targets": 2,  # stages/joint.py: T*'s targets for the students. 2: written batch by batch, storage type
    # 2: timm optimizers and schedulers; 3: level 1 and logits from one head call; 4: no training batch of one
    "student": 4,
    # 2: timm optimizers and schedulers; 3: one per student architecture, alternate multi-head batches; 4: no
    # training batch of one
    "baseline": 4,
}
"""Code version of each artifact kind, mixed into its keys: bump a kind's entry when its artifacts change."""

LOCK_TIMEOUT_S = -1.0
"""How long a builder waits for another process building the same key (negative: as long as that build takes)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through an atomic write."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True and a clear error for a corrupt or truncated file."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle/zip errors for truncated files (an empty file raises with an empty message)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        detail = f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__
        raise CorruptArtifact(f"{path}: cannot load checkpoint ({detail})") from None


@dataclass
class Artifact:
    """A complete artifact directory."""

    kind: str
    key: str
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def meta(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text()).get("meta", {})

    def verify(self) -> None:
        """Re-hash every file against the manifest; raise CorruptArtifact naming the first bad file."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            files = dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptArtifact(f"{self.path / MANIFEST}: unreadable manifest ({type(e).__name__}); "
                                  f"delete {self.path} to rebuild") from None
        for name, digest in files.items():
            p = self.path / name
            if not p.is_file():
                raise CorruptArtifact(f"{p}: missing from artifact {self.kind}/{self.key}")
            if sha256_file(p) != digest:
                raise CorruptArtifact(f"{p}: checksum mismatch (corrupt or truncated); delete {self.path} to rebuild")


class ArtifactStore:
    """A directory of content-addressed stage outputs.

    Args:
        root: local directory (created on first use).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @staticmethod
    def key(kind: str, spec: Any, inputs: dict[str, str] | None = None) -> str:
        """Key of an artifact: a hash of its kind, its spec, the keys of its inputs and the code versions.

        The versions are :data:`STORE_SCHEMA`, ``CODE_VERSIONS["data"]`` and ``CODE_VERSIONS[kind]``: bumping one
        gives new keys, so a store written by an older mlfd is not reused for what the new code computes differently.

        Raises:
            KeyError: ``kind`` has no entry in :data:`CODE_VERSIONS`.
        """
        if kind not in CODE_VERSIONS:
            raise KeyError(f"artifact kind {kind!r} has no code version; add it to mlfd.store.CODE_VERSIONS")
        versions = {"schema": STORE_SCHEMA, "data": CODE_VERSIONS["data"], "kind": CODE_VERSIONS[kind]}
        return spec_hash({"kind": kind, "versions": versions, "spec": to_dict(spec),
                          "inputs": dict(sorted((inputs or {}).items()))})

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Artifact | None:
        p = self.path(kind, key)
        return Artifact(kind, key, p) if (p / MANIFEST).is_file() else None

    @contextlib.contextmanager
    def lock(self, kind: str, key: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """An exclusive inter-process lock for one key (released if the holder dies).

        Args:
            timeout: Seconds to wait for another holder (negative: as long as it holds it).

        Raises:
            StorageError: the lock file cannot be created, or another process held it past ``timeout``.
        """
        lock_dir = self.root / ".locks"
        lock_file = lock_dir / f"{kind}-{key}.lock"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(lock_file, timeout=timeout)
            lock.acquire()
        except filelock.Timeout:
            raise StorageError(f"{lock_file}: still held by another process after {timeout:g} s") from None
        except OSError as e:
            raise storage_error(e, lock_dir) from e
        try:
            yield
        finally:
            lock.release()

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], dict | None], verify: bool = False) -> Artifact:
        """Return the artifact ``kind/key``, building it with ``build(tmp_dir)`` if it is missing.

        ``build`` writes files into ``tmp_dir`` and may return a metadata dict stored in the manifest. Concurrent
        callers in other processes block on the lock and then reuse the result. A build that raises or is killed
        leaves only a temp directory that is never read (and is swept by the next builder of that key).
        """
        art = self.get(kind, key)
        if art is not None:
            if verify:
                art.verify()
            return art
        with self.lock(kind, key):
            art = self.get(kind, key)
            if art is not None:
                return art
            final = self.path(kind, key)
            parent = final.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
                for stale in parent.glob(f".{key}.*.tmp"):
                    _logger.debug("removing %s, left by a build that did not finish", stale)
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{key}.", suffix=".tmp"))
            except OSError as e:
                raise storage_error(e, parent) from e
            try:
                meta = build(tmp) or {}
                files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                manifest = {"kind": kind, "key": key, "created": time.time(), "files": files, "meta": meta}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                if final.exists():  # an incomplete leftover without a manifest
                    shutil.rmtree(final)
                tmp.rename(final)
                fsync_dir(parent)
            except StorageError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise storage_error(e, final) from e
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return Artifact(kind, key, final)


# --------------------------------------------------------------------------------------------------------------------
# Feature cache: float16 (or bfloat16 / float32) arrays in Arrow IPC files, written batch by batch, memory-mapped on
# read, checksummed
# --------------------------------------------------------------------------------------------------------------------

FEATURE_DTYPES = ("float16", "bfloat16", "float32")
"""Storage types of a feature file. Arrow has no bfloat16: its values are stored as their uint16 bit patterns."""
_ARROW_TYPE = {"float16": pa.float16(), "bfloat16": pa.uint16(), "float32": pa.float32()}
_NUMPY_TYPE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
_META = b"mlfd"
_RELEASE_EVERY = 64 << 20


class FeatureOverflow(SpecError):
    """A value does not fit the feature cache's storage type (float16 tops out at 65504)."""


def _as_storage(batch: Any, dtype: str, label: str) -> np.ndarray:
    """``batch`` (numpy array or torch tensor) in the storage type ``dtype``, as a C-contiguous numpy array.

    A finite value that the cast turns into an infinity raises :class:`FeatureOverflow` naming ``label``.
    """
    if dtype == "bfloat16":
        import torch  # the store's only torch use: numpy has no bfloat16

        t = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        src = t.detach().cpu().float()
        out = src.to(torch.bfloat16)
        bad = bool((torch.isfinite(src) & ~torch.isfinite(out)).any())
        arr = out.view(torch.int16).numpy().view(np.uint16)
        src_max = float(src[torch.isfinite(src)].abs().max()) if bad else 0.0
    else:
        src_np = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, by name
            arr = np.ascontiguousarray(src_np, dtype=_NUMPY_TYPE[dtype])
        bad = False
        if src_np.dtype != arr.dtype and src_np.size and np.issubdtype(src_np.dtype, np.floating):
            fin = np.isfinite(src_np)
            bad = bool((fin & ~np.isfinite(arr)).any())
            src_max = float(np.abs(src_np[fin]).max()) if bad else 0.0
    if bad:
        raise FeatureOverflow(f"{label}: a value of magnitude {src_max:.4g} overflows {dtype} (max "
                              f"{float(np.finfo(np.float16).max) if dtype == 'float16' else 3.39e38:.6g}); "
                              "set joint.cache_dtype to bfloat16 or float32")
    return np.ascontiguousarray(arr)


class FeatureWriter:
    """Stream an [N, ...] array into an Arrow IPC file, one record batch per :meth:`write`, so host memory is
    bounded by a batch, not by N.

    The schema carries the row shape; a trailing empty record batch carries the metadata known only at the end (the
    shape with N, the storage type, the SHA-256 of the values in row order, and ``extra``). The file is written to a
    temp name and renamed by :meth:`close`, so a crash never leaves a half-written cache under the final name. Use it
    as a context manager: an exception inside removes the temp file.

    Args:
        path: the final file.
        dtype: storage type, one of :data:`FEATURE_DTYPES`.
        extra: metadata stored alongside (teacher, level, split...).
        label: what the values are, named by an overflow error (e.g. "teacher mnist level 2 on fashion/train").
    """

    def __init__(self, path: Path, dtype: str = "float16", extra: dict | None = None, label: str | None = None):
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
        self.path, self.dtype, self.extra = Path(path), dtype, dict(extra or {})
        self.label = label or str(self.path)
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self._hash = hashlib.sha256()
        self._tmp: str | None = None
        self._sink = self._writer = None
        self._schema: pa.Schema | None = None
        self.max_batch_bytes = 0  # the largest batch held at once (what bounds the writer's host memory)
        self.meta: dict | None = None  # set by close()

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.meta is None:
            self.close()
        self.abort()

    def _open(self, row_shape: tuple[int, ...]) -> None:
        self.row_shape = row_shape
        width = int(np.prod(row_shape, dtype=np.int64))
        vtype = _ARROW_TYPE[self.dtype]
        ftype = pa.list_(vtype, width) if width > 0 else vtype
        self._width = width
        self._schema = pa.schema([pa.field("features", ftype)])
        try:
            fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            os.close(fd)
            self._sink = pa.OSFile(self._tmp, "wb")
            self._writer = pa.ipc.new_file(self._sink, self._schema)
        except OSError as e:
            self.abort()
            raise storage_error(e, self.path) from e

    def _record_batch(self, flat: np.ndarray) -> pa.RecordBatch:
        values = pa.array(flat.reshape(-1), type=_ARROW_TYPE[self.dtype])
        col = pa.FixedSizeListArray.from_arrays(values, self._width) if self._width > 0 else values
        return pa.record_batch([col], schema=self._schema)

    def write(self, batch: Any) -> None:
        """Append the rows of ``batch`` ([n, ...] numpy array or torch tensor of any float type)."""
        arr = _as_storage(batch, self.dtype, self.label)
        if arr.ndim == 0:
            raise ValueError("a feature file holds an array of shape [N, ...], got a scalar")
        if self.row_shape is None:
            self._open(tuple(arr.shape[1:]))
        elif tuple(arr.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.label}: rows of shape {tuple(arr.shape[1:])} after rows of {self.row_shape}")
        n = arr.shape[0]
        flat = arr.reshape(n, self._width) if self._width > 0 else arr.reshape(-1)
        self._hash.update(flat.data)  # the values' bytes in row order, no copy
        self.max_batch_bytes = max(self.max_batch_bytes, arr.nbytes)
        try:
            self._writer.write_batch(self._record_batch(flat))
        except OSError as e:
            self.abort()
            raise storage_error(e, self.path) from e
        self.rows += n

    def close(self) -> dict:
        """Finish the file (trailer with the metadata, rename into place); returns the metadata."""
        if self.row_shape is None:
            raise ValueError(f"{self.label}: nothing was written (a feature file needs at least one batch)")
        meta = {"shape": [self.rows, *self.row_shape], "dtype": self.dtype, "sha256": self._hash.hexdigest(),
                **self.extra}
        try:
            empty = self._record_batch(np.empty((0, self._width), _NUMPY_TYPE[self.dtype]))
            self._writer.write_batch(empty, custom_metadata={_META: json.dumps(meta).encode()})
            self._writer.close()
            self._sink.close()
            os.replace(self._tmp, self.path)
            self._tmp = None
        except OSError as e:
            raise storage_error(e, self.path) from e
        finally:
            self.abort()
        self.meta = meta
        return meta

    def abort(self) -> None:
        """Drop the temp file (no-op after a successful close)."""
        for obj in (self._writer, self._sink):
            with contextlib.suppress(Exception):
                if obj is not None and not getattr(obj, "closed", False):
                    obj.close()
        self._writer = self._sink = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


def write_features(path: Path, array: Any, extra: dict | None = None, dtype: str = "float16",
                   label: str | None = None) -> dict:
    """Write an [N, ...] array as ``dtype`` (float16 by default) into an Arrow IPC file with its shape and SHA-256
    in the metadata (one :class:`FeatureWriter` batch). Returns the metadata written."""
    w = FeatureWriter(path, dtype, extra, label)
    try:
        w.write(array)
        return w.close()
    finally:
        w.abort()


class FeatureFile:
    """A feature file opened for reading: its record batches as read-only numpy views of one memory map.

    Rows are read by :meth:`take` (an index gather, in the order given) or :meth:`rows` (a contiguous range), both
    copies made with positioned reads; :meth:`array` is the map itself (one batch) and :meth:`release` drops the map's
    pages from this process (they stay in the OS page cache), so a reader that sweeps a file larger than memory
    through the map keeps its resident set bounded. bfloat16 values come back as their uint16 bit
    patterns (:func:`features_to_torch` turns them into a bfloat16 tensor).

    Args:
        path: the file.
        verify: re-hash the values against the recorded SHA-256 (:class:`CorruptArtifact` on a mismatch).
    """

    def __init__(self, path: Path, verify: bool = True):
        self.path = path = Path(path)
        try:
            self._fd = os.open(path, os.O_RDONLY)
            self._mm = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
            whole = pa.py_buffer(self._mm)
            reader = pa.ipc.open_file(whole)
            n_batches = reader.num_record_batches
            schema_meta = reader.schema.metadata or {}
            if _META in schema_meta:  # a file of the first format: one batch, metadata in the schema
                meta, data_batches = json.loads(schema_meta[_META]), range(n_batches)
            else:
                _, custom = reader.get_batch_with_custom_metadata(n_batches - 1)
                meta, data_batches = json.loads(custom[_META]), range(n_batches - 1)
            self.meta: dict = meta
            self.dtype: str = meta.get("dtype", "float16")
            self.shape: tuple[int, ...] = tuple(meta["shape"])
            parts, starts, offsets, total = [], [], [], 0
            for i in data_batches:
                col = reader.get_batch(i).column(0)
                values = col.flatten() if pa.types.is_fixed_size_list(col.type) else col
                flat = values.to_numpy(zero_copy_only=True)
                rows = len(col)
                parts.append(flat.reshape((rows, *self.shape[1:])))
                starts.append(total)
                offsets.append(flat.ctypes.data - whole.address)  # where the batch's values start in the file
                total += rows
            if total != self.shape[0] or (parts and parts[0].dtype != np.dtype(_NUMPY_TYPE[self.dtype])):
                raise ValueError("rows or type do not match the metadata")
            self._parts, self._starts, self._offsets = parts, np.asarray(starts, np.int64), offsets
            digest = meta["sha256"]
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError, KeyError, ValueError, TypeError, IndexError, NotImplementedError) as e:
            # ArrowInvalid for a truncated file; TypeError/KeyError for missing metadata; ValueError for a shape
            # mismatch or an empty file (mmap of 0 bytes); IndexError for a file without batches
            raise CorruptArtifact(f"{path}: unreadable feature cache ({type(e).__name__}); "
                                  "delete it to rebuild") from None
        if verify:
            h, mapped = hashlib.sha256(), 0
            for part in self._parts:
                h.update(np.ascontiguousarray(part).data)
                mapped += part.nbytes
                if mapped >= _RELEASE_EVERY:  # hashing a file larger than memory keeps the resident set bounded
                    self.release()
                    mapped = 0
            self.release()
            if h.hexdigest() != digest:
                raise CorruptArtifact(f"{path}: feature cache checksum mismatch (corrupt); delete it to rebuild")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the values (what a whole copy in memory takes)."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_NUMPY_TYPE[self.dtype]).itemsize

    def array(self) -> np.ndarray:
        """The whole array: a zero-copy view of the map when the file is one batch, else a copy."""
        if len(self._parts) == 1:
            return self._parts[0]
        return self.rows(0, len(self))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows ``start:stop``."""
        return self.take(np.arange(start, min(stop, len(self)), dtype=np.int64))

    def take(self, idx: Any) -> np.ndarray:
        """A copy of the rows ``idx`` (any order, repeats allowed), read with positioned reads (``preadv``), not
        through the map: a fault on the map brings in a whole large folio of the page cache, so random rows read
        through it would map most of the file into this process; a read copies just the row and leaves the page
        cache to the OS."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        dtype = self._parts[0].dtype if self._parts else np.dtype(_NUMPY_TYPE[self.dtype])
        out = np.empty((idx.size, *self.shape[1:]), dtype)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"{self.path}: rows out of range 0..{len(self) - 1}")
        row = out[0].nbytes
        flat = out.reshape(idx.size, -1).view(np.uint8).reshape(idx.size, row)
        part = np.searchsorted(self._starts, idx, side="right") - 1
        pos = np.asarray(self._offsets, np.int64)[part] + (idx - self._starts[part]) * row
        order = np.argsort(pos, kind="stable")
        # runs of rows that follow each other in the file are read with one call
        i = 0
        while i < idx.size:
            j = i + 1
            while j < idx.size and pos[order[j]] == pos[order[j - 1]] + row and order[j] == order[j - 1] + 1:
                j += 1
            if os.preadv(self._fd, [flat[order[i]:order[j - 1] + 1]], int(pos[order[i]])) != (j - i) * row:
                raise CorruptArtifact(f"{self.path}: short read (truncated?); delete it to rebuild")
            i = j
        return out

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._fd)

    def release(self) -> None:
        """Drop this process's mapping of the pages read so far (re-read from the page cache on the next access)."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._mm.madvise(mmap.MADV_DONTNEED)


def features_to_torch(arr: np.ndarray, dtype: str) -> "torch.Tensor":  # noqa: F821
    """A numpy array read from a feature file as a torch tensor of its storage type (no copy)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mmap views; never written into
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def read_features(path: Path, verify: bool = True) -> tuple[np.ndarray, dict]:
    """Memory-map a feature file; return its array (a read-only view when the file is one batch, as
    :func:`write_features` writes it; else a copy) and its metadata.

    With ``verify`` the data is re-hashed and a mismatch raises :class:`CorruptArtifact`.
    """
    f = FeatureFile(path, verify=verify)
    return f.array(), f.meta
