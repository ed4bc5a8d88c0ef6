"""A local pyarrow filesystem whose every written file appears whole or not at all, for Ray Tune's ``storage_path``.

Ray Tune keeps a search's state (``tuner.pkl``, ``experiment_state-*.json``, ``search_gen_state-*.json``, the
searcher's pickle, trial checkpoints) in a staging folder and copies it to the storage path every few seconds with
``pyarrow.fs.copy_files``, which writes each destination file in place. A driver SIGKILLed during such a copy leaves a
truncated file there (seen: a 0-byte ``search_gen_state``), and ``Tuner.restore`` then resumes from a broken state:
the searcher starts over and proposes the finished trials again. Through :func:`atomic_local_fs` every file is
written to a hidden temporary name beside it and renamed into place once complete (``os.replace``, atomic on POSIX),
so a kill leaves the previous complete version. Reads, listings and deletions are the local filesystem's own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

TMP_MARK = ".mlfd-tmp-"
"""Part of the name of a file being written (``.<name>.mlfd-tmp-<pid>-<n>``); hidden, so Ray's globs skip it."""


class _AtomicFile:
    """A binary file written under a temporary name and renamed to ``path`` on a successful close."""

    _count = 0

    def __init__(self, path: str):
        _AtomicFile._count += 1
        p = Path(path)
        self.path = str(p)
        self.tmp = str(p.with_name(f".{p.name}{TMP_MARK}{os.getpid()}-{_AtomicFile._count}"))
        self.f = open(self.tmp, "wb")  # noqa: SIM115 (closed in close())
        self.closed = False

    def write(self, data) -> int:
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.f.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            Path(self.tmp).unlink(missing_ok=True)
            raise


class AtomicLocalHandler(pafs.FileSystemHandler):
    """The local filesystem, with whole-file-or-nothing writes (see the module docstring)."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "mlfd-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("mlfd-atomic-local: refusing to delete the contents of the root directory")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.fs.open_input_stream(src) as fin, self.open_output_stream(dest, None) as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata) -> pa.NativeFile:
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path: str, metadata) -> pa.NativeFile:
        return self.fs.open_append_stream(path)


def atomic_local_fs() -> pafs.PyFileSystem:
    """A pyarrow filesystem over local paths whose written files appear whole or not at all."""
    return pafs.PyFileSystem(AtomicLocalHandler())


def storage_filesystem(storage_path: str) -> pafs.FileSystem | None:
    """The filesystem to give Ray Tune for ``storage_path``: :func:`atomic_local_fs` for a local path, None (Ray's
    own choice) for a URI such as ``s3://`` (object stores write whole objects already)."""
    return None if "://" in storage_path else atomic_local_fs()


def sweep_partial(path: str) -> int:
    """Delete the temporary files that killed writers left under a local ``path``; the number deleted. Call it only
    when no process writes there (``mlfd tune --resume`` before Ray restarts)."""
    if "://" in path or not Path(path).is_dir():
        return 0
    n = 0
    for f in Path(path).rglob(f".*{TMP_MARK}*"):
        f.unlink(missing_ok=True)
        n += 1
    return n
