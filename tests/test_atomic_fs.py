"""The filesystem mlfd gives Ray Tune for a local storage_path: a writer killed mid-file leaves the previous file."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs

from mlfd.tune.atomic_fs import TMP_MARK, atomic_local_fs, storage_filesystem, sweep_partial

KILLED_WRITER = """
import os, signal, sys
import pyarrow.fs as pafs
from mlfd.tune.atomic_fs import atomic_local_fs
fs = atomic_local_fs() if sys.argv[2] == "atomic" else pafs.LocalFileSystem()
out = fs.open_output_stream(sys.argv[1])
out.write(b'{"counter": 3, "total_samples": ')  # half of the new state
out.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_a_writer(path: Path, kind: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), kind], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


def test_copy_files_through_it_writes_every_file_whole(tmp_path):
    src, dst = tmp_path / "staging", tmp_path / "storage"
    (src / "run_1" / "checkpoint_000002").mkdir(parents=True)
    (src / "tuner.pkl").write_bytes(bytes(range(256)) * 4000)
    (src / "run_1" / "checkpoint_000002" / "state.pt").write_bytes(b"\x01" * 3_000_001)
    pafs.copy_files(str(src), str(dst), destination_filesystem=atomic_local_fs())
    for f in ("tuner.pkl", "run_1/checkpoint_000002/state.pt"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    assert not [p for p in dst.rglob("*") if TMP_MARK in p.name]


def test_a_writer_killed_mid_file_leaves_the_previous_file(tmp_path):
    """What a SIGKILLed driver does to Ray's state files: with pyarrow's local filesystem the file is cut short (the
    failure this module exists for); through atomic_local_fs the complete previous version stays."""
    state = '{"counter": 2, "total_samples": 3, "finished": false}'
    plain, atomic = tmp_path / "plain" / "search_gen_state-1.json", tmp_path / "atomic" / "search_gen_state-1.json"
    for f in (plain, atomic):
        f.parent.mkdir()
        f.write_text(state)
    _kill_a_writer(plain, "plain")
    assert plain.read_text() == '{"counter": 3, "total_samples": '  # truncated
    _kill_a_writer(atomic, "atomic")
    assert atomic.read_text() == state
    left = [p.name for p in atomic.parent.iterdir() if p != atomic]
    assert len(left) == 1 and left[0].startswith(".search_gen_state-1.json" + TMP_MARK)  # hidden from Ray's globs
    assert sweep_partial(str(tmp_path)) == 1 and [p.name for p in atomic.parent.iterdir()] == [atomic.name]


def test_storage_filesystem_choice_and_pickling():
    """Local paths get the atomic filesystem (it travels to Ray's trial workers pickled); URIs keep Ray's own."""
    assert storage_filesystem("s3://bucket/ray") is None and storage_filesystem("gs://b/x") is None
    fs = storage_filesystem("/shared/ray")
    assert isinstance(fs, pafs.PyFileSystem) and fs.type_name == "py::mlfd-atomic-local"
    again = pickle.loads(pickle.dumps(fs))
    assert again.equals(fs)
    assert sweep_partial("s3://bucket/ray") == 0 and sweep_partial("/nonexistent/ray") == 0
