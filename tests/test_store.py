"""The content-addressed artifact store and the float16 feature cache: keys, build-once, crashes, corruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ENV

from mlfd.config import DatasetSpec, JointSpec, RecipeSpec, to_dict  # noqa: E402
from mlfd.errors import SpecError  # noqa: E402
from mlfd.store import (  # noqa: E402
    CODE_VERSIONS, MANIFEST, ArtifactStore, CorruptArtifact, StorageError, atomic_write_text, load_torch, read_features,
    save_torch, write_features)


def run_py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (argv[1:] = args) and return the finished process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def temp_dirs(store: ArtifactStore, kind: str) -> list[Path]:
    parent = store.root / kind
    return sorted(parent.glob(".*.tmp")) if parent.exists() else []


# --------------------------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------------------------


def test_key_is_stable_for_equal_specs() -> None:
    a = ArtifactStore.key("joint", JointSpec(), {"t0": "abc", "t1": "def"})
    b = ArtifactStore.key("joint", JointSpec(), {"t1": "def", "t0": "abc"})  # input order does not matter
    assert a == b
    assert a == ArtifactStore.key("joint", to_dict(JointSpec()), {"t0": "abc", "t1": "def"})  # dict == dataclass
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)


def test_key_is_stable_across_processes() -> None:
    """No per-process salt (``hash()``, ids): another interpreter computes the same key."""
    key = ArtifactStore.key("joint", JointSpec(dropout=0.5), {"t0": "abc"})
    proc = run_py("""
        from mlfd.config import JointSpec
        from mlfd.store import ArtifactStore
        print(ArtifactStore.key("joint", JointSpec(dropout=0.5), {"t0": "abc"}))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == key


@pytest.mark.parametrize("change", [
    {"dropout": 0.5}, {"variant": "per_target"}, {"adaptor_width": 32}, {"width": 64},
    {"recipe": RecipeSpec(lr=1e-3, weight_decay=1e-4, epochs=11)},
    {"recipe": RecipeSpec(lr=1e-3, weight_decay=1e-4, epochs=10, seed=1)},
], ids=["dropout", "variant", "adaptor_width", "width", "recipe.epochs", "recipe.seed"])
def test_any_field_change_gives_a_new_key(change: dict) -> None:
    base = JointSpec()
    changed = JointSpec(**{**{f: getattr(base, f) for f in ("variant", "dropout", "adaptor_width", "width", "recipe")},
                           **change})
    assert ArtifactStore.key("joint", changed) != ArtifactStore.key("joint", base)


def test_nested_field_change_gives_a_new_key() -> None:
    a = DatasetSpec(name="d", source="sklearn_digits")
    b = DatasetSpec(name="d", source="sklearn_digits")
    b.model.input_size = 64
    c = DatasetSpec(name="d", source="sklearn_digits", options={"test_fraction": 0.3})
    keys = {ArtifactStore.key("teacher", s) for s in (a, b, c)}
    assert len(keys) == 3


def test_inputs_and_kind_matter() -> None:
    spec = JointSpec()
    base = ArtifactStore.key("joint", spec, {"t0": "abc"})
    assert ArtifactStore.key("joint", spec, {"t0": "abd"}) != base  # another input artifact
    assert ArtifactStore.key("joint", spec, {"t1": "abc"}) != base  # same key under another role
    assert ArtifactStore.key("joint", spec, {"t0": "abc", "t1": "x"}) != base  # one more input
    assert ArtifactStore.key("joint", spec) != base  # no inputs
    assert ArtifactStore.key("joint", spec, {}) == ArtifactStore.key("joint", spec, None)
    assert ArtifactStore.key("student", spec, {"t0": "abc"}) != base  # another kind


# --------------------------------------------------------------------------------------------------------------------
# Code versions in the keys
# --------------------------------------------------------------------------------------------------------------------


def test_every_stage_kind_has_a_code_version() -> None:
    from mlfd.stages import baselines, cache, joint, students, teachers

    kinds = {teachers.KIND, cache.KIND, joint.KIND, joint.TARGETS_KIND, students.KIND, baselines.KIND}
    assert kinds | {"data"} == set(CODE_VERSIONS)
    with pytest.raises(KeyError, match="CODE_VERSIONS"):
        ArtifactStore.key("no_such_kind", JointSpec())


@pytest.mark.parametrize("bump", ["kind", "data", "schema"])
def test_a_bumped_code_version_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bump: str) -> None:
    """Bumping a kind's version, the data version or the store schema gives new keys: the old artifact stays where
    it was and is never returned for the new code; the new one is built."""
    import mlfd.store as store_mod

    store = ArtifactStore(tmp_path)
    spec, inputs = DatasetSpec(name="d", source="sklearn_digits"), {"parent": "abc"}
    built: list[str] = []

    def build(d: Path) -> dict:
        built.append(d.name)
        (d / "w.txt").write_text(str(len(built)))
        return {}

    old_key = ArtifactStore.key("teacher", spec, inputs)
    other_old = ArtifactStore.key("student", spec, inputs)
    store.get_or_build("teacher", old_key, build)
    if bump == "schema":
        monkeypatch.setattr(store_mod, "STORE_SCHEMA", store_mod.STORE_SCHEMA + 1)
    else:
        monkeypatch.setitem(CODE_VERSIONS, "teacher" if bump == "kind" else "data",
                            CODE_VERSIONS["teacher" if bump == "kind" else "data"] + 1)
    new_key = ArtifactStore.key("teacher", spec, inputs)
    assert new_key != old_key and store.get("teacher", new_key) is None
    art = store.get_or_build("teacher", new_key, build)
    assert len(built) == 2 and art.file("w.txt").read_text() == "2"
    assert store.get("teacher", old_key).file("w.txt").read_text() == "1"  # untouched, just not used
    # A kind's bump leaves the other kinds' keys alone; the data version and the schema are in every key.
    assert (ArtifactStore.key("student", spec, inputs) == other_old) == (bump == "kind")


# --------------------------------------------------------------------------------------------------------------------
# get_or_build
# --------------------------------------------------------------------------------------------------------------------


def test_get_or_build_builds_once_then_reuses(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    calls = []

    def build(d: Path) -> dict:
        calls.append(d)
        (d / "a.txt").write_text("hello")
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(b"\x00\x01")
        return {"n": 3}

    assert store.get("k", "key1") is None
    art = store.get_or_build("k", "key1", build)
    assert len(calls) == 1 and calls[0] != art.path  # built in a temp dir, renamed into place
    assert art.path == store.path("k", "key1") and art.file("a.txt").read_text() == "hello"
    assert (art.path / MANIFEST).is_file() and art.meta() == {"n": 3}
    art.verify()

    def must_not_build(d: Path) -> dict:
        raise AssertionError("rebuilt an artifact that exists")

    again = store.get_or_build("k", "key1", must_not_build)
    assert again.path == art.path and len(calls) == 1
    assert store.get_or_build("k", "key1", must_not_build, verify=True).path == art.path
    assert ArtifactStore(tmp_path / "store").get("k", "key1").path == art.path  # another store object, same root
    assert temp_dirs(store, "k") == []


def test_build_returning_none_stores_empty_meta(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = store.get_or_build("k", "x", lambda d: (d / "f").write_text("1") and None)
    assert art.meta() == {}


CONCURRENT = """
    import sys, time
    from pathlib import Path
    from mlfd.store import ArtifactStore

    root, counter, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def build(d):
        with open(counter, "a") as f:
            f.write("built\\n")
        time.sleep(1.5)  # long enough that the other process surely asks while this one builds
        (d / "value.txt").write_text("42")
        return {"pid": __import__("os").getpid()}

    while not go.exists():  # start both get_or_build calls at the same moment
        time.sleep(0.01)
    art = ArtifactStore(root).get_or_build("k", "shared", build)
    print(art.path, (art.path / "value.txt").read_text(), art.meta()["pid"])
"""


def test_concurrent_builders_in_two_processes_build_once(tmp_path: Path) -> None:
    counter, go = tmp_path / "counter.txt", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CONCURRENT), str(tmp_path / "store"),
                               str(counter), str(go)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(1.0)  # both interpreters have imported mlfd.store and are polling for `go`
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert counter.read_text() == "built\n"  # exactly one build
    lines = [out.split() for out, _ in outs]
    assert lines[0] == lines[1]  # same path, same content, same builder
    assert lines[0][1] == "42" and int(lines[0][2]) in {p.pid for p in procs}
    assert Path(lines[0][0]) == ArtifactStore(tmp_path / "store").path("k", "shared")


def test_failed_build_leaves_nothing_and_a_later_build_succeeds(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)

    def bad(d: Path) -> dict:
        (d / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.get_or_build("k", "x", bad)
    assert store.get("k", "x") is None
    assert not store.path("k", "x").exists()
    assert temp_dirs(store, "k") == []  # the temp dir was removed, not left looking complete
    assert not any((tmp_path / "k").rglob(MANIFEST))

    with pytest.raises(KeyboardInterrupt):  # BaseException too
        store.get_or_build("k", "x", lambda d: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert store.get("k", "x") is None and temp_dirs(store, "k") == []

    art = store.get_or_build("k", "x", lambda d: (d / "ok.txt").write_text("ok") and {"ok": True})
    assert art.file("ok.txt").read_text() == "ok" and not art.file("half.txt").exists()
    assert art.meta() == {"ok": True}


def test_failed_build_releases_the_lock(tmp_path: Path) -> None:
    """A build error must not leave the key locked for other processes."""
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError):
        store.get_or_build("k", "x", lambda d: (_ for _ in ()).throw(ValueError("x")))
    proc = run_py("""
        import sys
        from mlfd.store import ArtifactStore
        print(ArtifactStore(sys.argv[1]).get_or_build("k", "x", lambda d: (d / "f").write_text("1") and None).path)
    """, str(tmp_path), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert store.get("k", "x") is not None


KILLED = """
    import sys, time
    from pathlib import Path
    from mlfd.store import ArtifactStore

    root, started = sys.argv[1], Path(sys.argv[2])

    def build(d):
        (d / "big.bin").write_bytes(b"x" * 1000)
        started.write_text(str(d))
        time.sleep(120)  # killed here
        return {}

    ArtifactStore(root).get_or_build("k", "victim", build)
"""


def test_killed_build_leaves_no_artifact_and_is_swept(tmp_path: Path) -> None:
    root, started = tmp_path / "store", tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), str(root), str(started)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the builder never started"
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = ArtifactStore(root)
    assert store.get("k", "victim") is None
    leftovers = temp_dirs(store, "k")
    assert [str(p) for p in leftovers] == [started.read_text()]  # only an unreadable temp dir remains
    assert not (leftovers[0] / MANIFEST).exists()

    # The lock died with the process: the next builder gets it at once, sweeps the temp dir and builds.
    t0 = time.monotonic()
    art = store.get_or_build("k", "victim", lambda d: (d / "ok.txt").write_text("ok") and None)
    assert time.monotonic() - t0 < 10
    assert art.file("ok.txt").read_text() == "ok" and not art.file("big.bin").exists()
    assert temp_dirs(store, "k") == []


HOLDER = """
    import sys, time
    from pathlib import Path
    from mlfd.store import ArtifactStore

    with ArtifactStore(sys.argv[1]).lock("k", "held"):
        Path(sys.argv[2]).touch()
        time.sleep(120)  # killed here
"""


def test_lock_times_out_with_a_storage_error_and_frees_when_the_holder_dies(tmp_path: Path) -> None:
    root, held = tmp_path / "store", tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(root), str(held)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=r"k-held\.lock: still held by another process after 0\.3 s"):
            with ArtifactStore(root).lock("k", "held", timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - t0 < 10
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with ArtifactStore(root).lock("k", "held", timeout=10):  # died with its holder
        pass


def test_leftover_without_manifest_at_the_final_path_is_replaced(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    final = store.path("k", "x")
    final.mkdir(parents=True)
    (final / "junk.txt").write_text("incomplete")  # e.g. copied in by hand, no manifest
    assert store.get("k", "x") is None
    art = store.get_or_build("k", "x", lambda d: (d / "f.txt").write_text("1") and None)
    assert art.file("f.txt").is_file() and not art.file("junk.txt").exists()


def test_verify_detects_a_flipped_byte(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = store.get_or_build("k", "x", lambda d: (d / "w.bin").write_bytes(bytes(range(256)) * 4) and None)
    art.verify()
    f = art.file("w.bin")
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="w.bin"):
        art.verify()
    with pytest.raises(CorruptArtifact, match="w.bin"):
        store.get_or_build("k", "x", lambda d: None, verify=True)
    f.unlink()
    with pytest.raises(CorruptArtifact, match="w.bin.*missing"):
        art.verify()


def test_verify_on_a_corrupt_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = store.get_or_build("k", "x", lambda d: (d / "f").write_text("1") and None)
    art.file(MANIFEST).write_text("{not json")
    with pytest.raises(CorruptArtifact, match=MANIFEST):
        art.verify()


def test_corrupt_artifact_is_a_spec_error() -> None:
    """The CLI turns SpecError into a one-line message and exit 2; corrupt files must take that path."""
    assert issubclass(CorruptArtifact, SpecError)
    assert issubclass(StorageError, OSError)


# --------------------------------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 3, 4, 5), (9, 16), (5,), (0, 8)], ids=str)
def test_feature_cache_round_trip(tmp_path: Path, shape: tuple) -> None:
    rng = np.random.default_rng(0)
    src = (rng.standard_normal(shape) * 10).astype(np.float32)
    f = tmp_path / "f.arrow"
    meta = write_features(f, src, {"level": 2, "split": "train"})
    assert meta["shape"] == list(shape) and meta["dtype"] == "float16" and meta["level"] == 2
    arr, read_meta = read_features(f)
    assert read_meta == meta
    assert arr.dtype == np.float16 and arr.shape == shape
    np.testing.assert_array_equal(arr, src.astype(np.float16))  # exact: stored as float16, read as float16
    assert not arr.flags.writeable  # a read-only view of the memory map
    with pytest.raises(ValueError):
        arr[...] = 0
    assert [p.name for p in tmp_path.iterdir()] == ["f.arrow"]  # no temp file left behind


def test_feature_cache_keeps_float16_specials(tmp_path: Path) -> None:
    src = np.array([[0.0, -0.0, 65504.0, -65504.0], [np.inf, -np.inf, 6e-8, 1e-4]], dtype=np.float16)
    write_features(tmp_path / "f.arrow", src)
    arr, _ = read_features(tmp_path / "f.arrow")
    assert arr.tobytes() == src.tobytes()


def test_feature_cache_is_memory_mapped(tmp_path: Path) -> None:
    """The array is a view of the file's memory mapping, not a copy in the heap (checked in /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc")
    f = tmp_path / "f.arrow"
    write_features(f, np.ones((64, 128), np.float32))
    arr, _ = read_features(f)
    ptr = arr.ctypes.data
    regions = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(f.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            regions.append((lo, hi))
    assert any(lo <= ptr and ptr + arr.nbytes <= hi for lo, hi in regions), (hex(ptr), regions)


def _flip_data_byte(f: Path, value: np.float16) -> None:
    """Flip one bit in the stored array by finding a float16 value's bytes in the file."""
    data = bytearray(f.read_bytes())
    pos = data.find(np.float16(value).tobytes())
    assert pos >= 0
    data[pos] ^= 0x04
    f.write_bytes(bytes(data))


def test_feature_cache_checksum_failure_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "train.arrow"
    src = np.arange(60, dtype=np.float32).reshape(6, 10) + 1000
    write_features(f, src)
    _flip_data_byte(f, np.float16(1037))
    with pytest.raises(CorruptArtifact, match=r"train\.arrow.*checksum"):
        read_features(f)
    arr, _ = read_features(f, verify=False)  # the caller may opt out (then reads the corrupt values)
    assert arr.shape == (6, 10) and not np.array_equal(arr, src.astype(np.float16))


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.99], ids=lambda k: f"keep{k}")
def test_truncated_feature_cache_is_corrupt(tmp_path: Path, keep: float) -> None:
    f = tmp_path / "val.arrow"
    write_features(f, np.random.default_rng(1).standard_normal((50, 20)))
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptArtifact, match=r"val\.arrow"):
        read_features(f)


def test_feature_file_without_metadata_is_corrupt(tmp_path: Path) -> None:
    import pyarrow as pa

    f = tmp_path / "plain.arrow"
    table = pa.table({"features": pa.array([1.0, 2.0], pa.float16())})
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(CorruptArtifact, match=r"plain\.arrow"):
        read_features(f)


def test_feature_cache_in_an_artifact_verifies(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = store.get_or_build("features", "k", lambda d: write_features(d / "train.arrow", np.ones((4, 3))))
    assert art.meta()["shape"] == [4, 3]
    art.verify()
    arr, _ = read_features(art.file("train.arrow"))
    assert arr.shape == (4, 3)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints and atomic writes
# --------------------------------------------------------------------------------------------------------------------


def test_torch_round_trip_and_truncated_checkpoint(tmp_path: Path) -> None:
    import torch

    f = tmp_path / "model.pt"
    state = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.zeros(3)}
    save_torch(state, f)
    back = load_torch(f)
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["b"], state["b"])
    data = f.read_bytes()
    for keep in (0, 10, len(data) // 2, len(data) - 10):
        f.write_bytes(data[:keep])
        with pytest.raises(CorruptArtifact, match=r"model\.pt"):
            load_torch(f)
    with pytest.raises(FileNotFoundError):
        load_torch(tmp_path / "missing.pt")


def test_load_torch_refuses_pickled_code(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint that would run code on load is rejected, as a corrupt file."""
    import torch

    f = tmp_path / "evil.pt"
    torch.save({"x": _Arbitrary()}, f)
    with pytest.raises(CorruptArtifact, match=r"evil\.pt"):
        load_torch(f)


class _Arbitrary:
    pass


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "out.txt"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two"
    assert [p.name for p in f.parent.iterdir()] == ["out.txt"]


def test_atomic_write_under_a_file_parent_raises_storage_error(tmp_path: Path) -> None:
    """Root ignores permissions, so provoke a real OSError with a parent path that is a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("i am a file")
    target = blocker / "out.txt"
    with pytest.raises(StorageError) as info:
        atomic_write_text(target, "new")
    msg = str(info.value)
    assert "cannot write" in msg and str(target) in msg and "not a directory" in msg
    assert "\n" not in msg
    assert blocker.read_text() == "i am a file"
    with pytest.raises(StorageError, match="not a directory"):
        atomic_write_text(blocker / "deeper" / "out.txt", "new")


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing midway (disk full) keeps the old content and removes the temp file."""
    import errno

    f = tmp_path / "results.md"
    atomic_write_text(f, "old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="no space left on device") as info:
        atomic_write_text(f, "new content")
    assert info.value.errno == errno.ENOSPC and str(f) in str(info.value)
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_atomic_write_real_write_error_keeps_the_old_file(tmp_path: Path) -> None:
    """A real failing write(2): a file-size limit (EFBIG) in a child process, as a full disk would fail it."""
    f = tmp_path / "state.bin"
    f.write_bytes(b"old")
    proc = run_py("""
        import resource, signal, sys
        from pathlib import Path
        from mlfd.store import StorageError, atomic_write_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            atomic_write_bytes(Path(sys.argv[1]), b"x" * 100_000)
        except StorageError as e:
            print("StorageError", e.errno, e)
    """, str(f))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("StorageError") and "file too large" in proc.stdout and str(f) in proc.stdout
    assert f.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_store_under_a_file_raises_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("not a dir")
    with pytest.raises(StorageError):
        ArtifactStore(blocker).get_or_build("k", "x", lambda d: None)
    assert blocker.read_text() == "not a dir"


def test_build_storage_error_is_not_wrapped_twice(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    blocker = tmp_path / "blocker"
    blocker.write_text("")

    def build(d: Path) -> None:
        atomic_write_text(blocker / "x.txt", "1")

    with pytest.raises(StorageError) as info:
        store.get_or_build("k", "x", build)
    assert str(info.value).count("cannot write") == 1
    assert store.get("k", "x") is None and temp_dirs(store, "k") == []
