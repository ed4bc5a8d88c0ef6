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
from mlfd.fileio import atomic_path, atomic_write_bytes, atomic_write_text, fsync_dir, storage_error

__all__ = ["MANIFEST", "STORE_SCHEMA", "CODE_VERSIONS", "Artifact", "ArtifactStore", "CorruptArtifact", "SpecError",
           "StorageError", "atomic_write_bytes", "atomic_write_text", "load_torch", "read_features", "save_torch",
           "sha256_file", "write_features"]

_logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"

STORE_SCHEMA = 1
"""Version of the store's layout (directories, manifest, key recipe). Part of every key."""

CODE_VERSIONS: dict[str, int] = {
    "data": 1,  # mlfd.data: sources, splits, subsets, decoding, transforms; part of every key
    "teacher": 2,  # 2: timm optimizers (no decay on norm/bias) and schedulers, a real one-cycle
    "features": 1,  # stages/cache.py: frozen-teacher features
    "joint": 2,  # 2: timm optimizers and schedulers
    "joint_targets": 1,  # stages/joint.py: the joint teacher's targets for the students
    "student": 2,  # 2: timm optimizers and schedulers
    "baseline": 2,  # 2: timm optimizers and schedulers
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
# Feature cache: float16 arrays in Arrow IPC files, memory-mapped on read, checksummed
# --------------------------------------------------------------------------------------------------------------------


def write_features(path: Path, array: np.ndarray, extra: dict | None = None) -> dict:
    """Write an [N, ...] array as float16 into an Arrow IPC file with its shape and SHA-256 in the schema metadata.

    Returns the metadata written.
    """
    arr = np.ascontiguousarray(array, dtype=np.float16)
    if arr.ndim == 0:
        raise ValueError("write_features needs an array of shape [N, ...], got a scalar")
    n = arr.shape[0]
    flat = arr.reshape(n, int(np.prod(arr.shape[1:], dtype=np.int64)))
    digest = hashlib.sha256(flat.tobytes()).hexdigest()
    meta = {"shape": list(arr.shape), "dtype": "float16", "sha256": digest, **(extra or {})}
    values = pa.array(flat.reshape(-1), type=pa.float16())
    col = pa.FixedSizeListArray.from_arrays(values, flat.shape[1]) if flat.shape[1] > 0 else values
    table = pa.table({"features": col}).replace_schema_metadata({"mlfd": json.dumps(meta)})
    # temp file + rename: a crash never leaves a half-written cache file under the final name
    with atomic_path(Path(path)) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return meta


def read_features(path: Path, verify: bool = True) -> tuple[np.ndarray, dict]:
    """Memory-map a feature file; return a read-only float16 array view and its metadata.

    With ``verify`` the data is re-hashed and a mismatch raises :class:`CorruptArtifact`.
    """
    path = Path(path)
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        meta = json.loads(table.schema.metadata[b"mlfd"])
        chunked = table.column("features")
        # One chunk (what write_features writes): use it as is. combine_chunks() would copy it out of the memory map.
        col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
        values = col.flatten() if pa.types.is_fixed_size_list(col.type) else col
        flat = values.to_numpy(zero_copy_only=True)
        arr = flat.reshape(meta["shape"])
        digest = meta["sha256"]
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, KeyError, ValueError, TypeError, NotImplementedError) as e:
        # ArrowInvalid for a truncated file; TypeError/KeyError for missing metadata; ValueError for a shape mismatch
        raise CorruptArtifact(f"{path}: unreadable feature cache ({type(e).__name__}); delete it to rebuild") from None
    if verify and hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() != digest:
        raise CorruptArtifact(f"{path}: feature cache checksum mismatch (corrupt); delete it to rebuild")
    return arr, meta
