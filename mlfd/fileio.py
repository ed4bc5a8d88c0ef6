"""Atomic file writes (temp file in the same directory, then rename), shared by every layer.

A reader never sees a half-written file under its final name; on any failure the old file, if any, is left as it was
and the temp file is removed. ``OSError``s become one-line :class:`~mlfd.errors.StorageError`s naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mlfd.errors import StorageError


def storage_error(e: OSError, what: Path) -> StorageError:
    """``e`` as a one-line :class:`StorageError` saying why ``what`` could not be written (as is if it is one)."""
    if isinstance(e, StorageError):
        return e
    reason = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
              errno.EROFS: "read-only filesystem", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file too large"}.get(e.errno, e.strerror or type(e).__name__)
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir of a parent that is a file
        blocker = next((a for a in Path(what).parents if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            reason = f"{blocker} exists and is not a directory"
    return StorageError(e.errno, f"cannot write {what}: {reason}")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename into it) to disk, where the filesystem allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; when the block exits normally, the temp file replaces ``path``.

    The block writes the temp file (any way it likes: ``open``, pyarrow, ...). If it raises, ``path`` is untouched and
    the temp file is removed.

    Raises:
        StorageError: creating, writing or renaming failed (disk full, permissions, a parent that is a file).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        yield Path(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise storage_error(e, path) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename; the old file survives any failure."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())
