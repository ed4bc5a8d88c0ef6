"""Out-of-core feature caches: streamed extraction, reading from the memory maps, the placement decision, and the
storage type (issue 11, items 1 and 10c)."""

from __future__ import annotations

import logging
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mlfd.config import PipelineSpec, SpecError, from_dict, load_pipeline, smoke_pipeline, to_dict
from mlfd.stages import cache as cache_mod
from mlfd.stages.cache import Prefetcher, build_cache, cache_key, place_caches
from mlfd.stages.common import Context, read_metrics
from mlfd.stages.joint import JointTask, joint_key, plan_for, train_joint
from mlfd.stages.students import train_student
from mlfd.store import (ArtifactStore, FeatureFile, FeatureOverflow, FeatureWriter, features_to_torch, read_features,
                        write_features)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "pipelines" / "offline_default.yaml"


def _tiny(**joint) -> PipelineSpec:
    """mnist + digits, 120 train images each, one teacher epoch; T* two epochs of 8 mixed batches."""
    data = to_dict(smoke_pipeline(load_pipeline(DEFAULT)))
    data["datasets"] = [d for d in data["datasets"] if d["name"] in ("mnist", "digits")]
    for d in data["datasets"]:
        d.update(max_train=120, max_val=60, max_test=60)
    for r in (data["teacher"], data["student"]["recipe"]):
        r["epochs"] = 1
    data["joint"]["recipe"].update(epochs=2, batch_size=30)
    data["joint"].update(joint)
    return from_dict(PipelineSpec, data)


# --------------------------------------------------------------------------------------------------------------------
# Files: streamed writes, gathers from the memory map
# --------------------------------------------------------------------------------------------------------------------


def test_streamed_file_gathers_rows_across_record_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = rng.standard_normal((100, 3, 2, 2)).astype(np.float32)
    with FeatureWriter(tmp_path / "f.arrow", extra={"level": 3}) as w:
        for a, b in ((0, 7), (7, 7), (7, 40), (40, 99), (99, 100)):  # uneven batches, one of them empty
            w.write(src[a:b])
    meta = w.meta
    assert meta["shape"] == [100, 3, 2, 2] and meta["dtype"] == "float16" and meta["level"] == 3
    with pa.memory_map(str(tmp_path / "f.arrow")) as m:
        assert pa.ipc.open_file(m).num_record_batches == 6  # five data batches and the metadata trailer
    f = FeatureFile(tmp_path / "f.arrow")
    want = src.astype(np.float16)
    idx = rng.integers(0, 100, 257)
    np.testing.assert_array_equal(f.take(idx), want[idx])
    np.testing.assert_array_equal(f.rows(35, 45), want[35:45])
    f.release()  # the pages go; the next read maps them again
    np.testing.assert_array_equal(f.array(), want)
    assert f.nbytes == want.nbytes
    arr, read_meta = read_features(tmp_path / "f.arrow")
    assert read_meta == meta and arr.tobytes() == want.tobytes()
    # the checksum covers every batch: the same as one write of the whole array
    assert write_features(tmp_path / "g.arrow", src)["sha256"] == meta["sha256"]


def _rss_file_kib() -> int:
    return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith("RssFile:"))


def test_random_gather_does_not_map_the_file(tmp_path: Path) -> None:
    """Rows gathered at random from a 32 MiB cache: file-backed RSS grows by far less than the file (the pages stay in
    the OS page cache, not in this process), and the rows are the right ones."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    src = np.random.default_rng(0).standard_normal((8192, 2048), dtype=np.float32)
    with FeatureWriter(tmp_path / "f.arrow") as w:
        for s in range(0, 8192, 1000):
            w.write(src[s: s + 1000])
    f = FeatureFile(tmp_path / "f.arrow", verify=False)
    idx = np.random.default_rng(1).integers(0, 8192, 512)
    f.take(idx[:4])  # warm-up (code paths)
    before = _rss_file_kib()
    rows = f.take(idx)
    grown = _rss_file_kib() - before
    np.testing.assert_array_equal(rows, src[idx].astype(np.float16))
    assert grown < 4096, grown  # KiB, against a 32 MiB file of which 512 random rows touch nearly every folio


def test_writer_holds_one_batch_not_the_file(tmp_path: Path) -> None:
    """Streaming 64 batches of 1 MiB: the Python heap (numpy buffers) and Arrow's pool peak near one batch."""
    batch = np.ones((2048, 256), np.float32)  # 2 MiB float32, 1 MiB float16
    with FeatureWriter(tmp_path / "big.arrow") as w:
        w.write(batch)  # warm-up: schema, file, first allocations
        tracemalloc.start()
        arrow_peak = 0
        try:
            for i in range(63):
                w.write(batch * (i % 7))
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
            _, py_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert w.meta["shape"] == [64 * 2048, 256]
    total = 64 * 2048 * 256 * 2  # 64 MiB written
    assert w.max_batch_bytes == 2048 * 256 * 2
    # the input batch (float32), its float16 cast and the overflow masks: about two float32 batches, not 64 MiB
    assert py_peak < 3 * batch.nbytes and py_peak < total / 10, py_peak
    assert arrow_peak < 2 * batch.nbytes, arrow_peak


def test_cache_build_writes_each_extracted_batch(tmp_path: Path, monkeypatch) -> None:
    """build_cache hands the writer one teacher batch at a time: as many record batches as extraction batches."""
    monkeypatch.setattr(cache_mod, "EVAL_BATCH", 32)
    ctx = Context(spec=_tiny(), store=ArtifactStore(tmp_path / "store"), progress=False)
    art = build_cache(ctx, "mnist", "digits", 2)
    meta = art.meta()
    row_bytes = 2 * int(np.prod(meta["shape"]))
    assert meta["max_batch_bytes"] == 32 * row_bytes and meta["dtype"] == "float16"
    f = FeatureFile(art.file("train.arrow"))
    assert len(f) == 120 and len(f._parts) == 4 and [len(p) for p in f._parts] == [32, 32, 32, 24]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_wider_storage_types_round_trip(tmp_path: Path, dtype: str) -> None:
    src = torch.tensor([[1e5, -3.0e6], [0.5, 7.0]])
    meta = write_features(tmp_path / "f.arrow", src, dtype=dtype)
    assert meta["dtype"] == dtype
    f = FeatureFile(tmp_path / "f.arrow")
    t = features_to_torch(f.take([1, 0]), f.dtype)
    want = src.to(torch.bfloat16) if dtype == "bfloat16" else src
    assert t.dtype == want.dtype and torch.equal(t, want[[1, 0]])
    assert f.nbytes == 4 * (2 if dtype == "bfloat16" else 4)


def test_float16_overflow_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FeatureOverflow, match=r"^teacher x level 3: a value of magnitude 7e\+04 overflows float16 "
                                              r"\(max 65504\); set joint.cache_dtype to bfloat16 or float32$"):
        write_features(tmp_path / "f.arrow", np.array([[1.0, 70000.0]], np.float32), label="teacher x level 3")
    assert not list(tmp_path.iterdir())  # no file, no temp file
    # values that are already infinite are not an overflow of the cast
    write_features(tmp_path / "g.arrow", np.array([[np.inf, 1.0]], np.float32))
    assert issubclass(FeatureOverflow, SpecError)  # the CLI's one-line error, exit 2


def test_cache_overflow_names_the_teacher_and_level_and_bfloat16_stores_it(tmp_path: Path, monkeypatch) -> None:
    from mlfd.models import LevelModel

    plain = LevelModel.forward_level
    monkeypatch.setattr(LevelModel, "forward_level", lambda self, x, level: plain(self, x, level) * 1e6 + 1e5)
    store = ArtifactStore(tmp_path / "store")
    ctx = Context(spec=_tiny(), store=store, progress=False)
    with pytest.raises(FeatureOverflow, match=r"^features of teacher mnist at level 2 on digits/train: a value of "
                                              r"magnitude .* overflows float16"):
        build_cache(ctx, "mnist", "digits", 2)
    ctx16 = ctx
    ctx = Context(spec=_tiny(cache_dtype="bfloat16"), store=store, progress=False)
    assert cache_key(ctx, "mnist", "digits", 2) != cache_key(ctx16, "mnist", "digits", 2)
    art = build_cache(ctx, "mnist", "digits", 2)
    f = FeatureFile(art.file("train.arrow"))
    x = features_to_torch(f.array(), f.dtype)
    assert f.dtype == "bfloat16" and x.dtype == torch.bfloat16 and bool(torch.isfinite(x).all())
    assert float(x.float().abs().max()) > 65504


# --------------------------------------------------------------------------------------------------------------------
# Placement: auto decides from bytes against free memory, and says so
# --------------------------------------------------------------------------------------------------------------------


def test_auto_placement_both_ways(caplog) -> None:
    cpu = torch.device("cpu")
    free = cache_mod.free_memory(cpu)
    assert free > 0
    with caplog.at_level(logging.DEBUG, logger="mlfd.stages.cache"):
        small = place_caches("auto", 1 << 20, cpu, 0.5, "T* L2")
        big = place_caches("auto", 1 << 20, cpu, (1 << 19) / free, "T* L3")
        forced = place_caches(True, 1 << 50, cpu, 0.5, "T* L4")
    assert small["on_device"] and small["budget_bytes"] > 1 << 20 and small["setting"] == "auto"
    assert not big["on_device"] and big["budget_bytes"] < 1 << 20
    assert forced == {"setting": True, "cache_bytes": 1 << 50, "on_device": True}
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("T* L2: feature caches whole on the device (1.0 MiB of cache <= 0.5 x ")
    assert msgs[1].startswith("T* L3: feature caches out of core (1.0 MiB of cache > ")
    assert msgs[2] == "T* L4: feature caches whole on the device (joint.cache_on_device: true)"


def test_joint_task_takes_the_path_the_budget_allows(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    for fraction, on_device in ((1.0, True), (1e-12, False)):
        ctx = Context(spec=_tiny(cache_memory_fraction=fraction), store=store, progress=False)
        task = JointTask(ctx, plan_for(ctx, 2))
        assert task.feats.on_device is on_device and task.feats.placement["on_device"] is on_device
        assert bool(task.feats.x) is on_device
        assert task.feats.placement["cache_bytes"] == sum(f.nbytes for f in task.feats.files.values())


def test_placement_is_not_in_the_keys_but_the_dtype_is(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    keys = set()
    for joint in ({}, {"cache_on_device": True}, {"cache_on_device": False}, {"cache_memory_fraction": 0.1}):
        ctx = Context(spec=_tiny(**joint), store=store, progress=False)
        keys.add((cache_key(ctx, "mnist", "digits", 2), joint_key(ctx, plan_for(ctx, 2))))
    assert len(keys) == 1
    ctx = Context(spec=_tiny(cache_dtype="float32"), store=store, progress=False)
    other = (cache_key(ctx, "mnist", "digits", 2), joint_key(ctx, plan_for(ctx, 2)))
    assert other[0] not in {k[0] for k in keys} and other[1] not in {k[1] for k in keys}


def test_bad_placement_setting_is_one_line() -> None:
    with pytest.raises(SpecError, match=r"^pipeline.joint.cache_on_device: got 'sometimes'; allowed: auto, True, "
                                        r"False$"):
        _tiny(cache_on_device="sometimes")
    with pytest.raises(SpecError, match=r"^pipeline.joint.cache_dtype: got 'int8'"):
        _tiny(cache_dtype="int8")


# --------------------------------------------------------------------------------------------------------------------
# The two paths train the same weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_in_and_out_of_core_train_bit_identical_joint_teacher_and_student(tmp_path: Path) -> None:
    """Features whole on the device or read out of core (gathers from the memory maps in a prefetch thread), for T*
    and for the student's cached targets: the same keys and byte-identical T*, targets and student weights."""
    stores = {}
    for on_device in (True, False):
        store = tmp_path / f"store-{on_device}"
        ctx = Context(spec=_tiny(cache_on_device=on_device), store=ArtifactStore(store), progress=False)
        art = train_student(ctx, "digits", 2)
        assert read_metrics(art)["val"]["acc1"] > 10 + 10  # learned (chance is 10%)
        joint = train_joint(ctx, plan_for(ctx, 2))
        jm = read_metrics(joint)
        assert jm["cache"]["on_device"] is on_device and jm["cache"]["setting"] is on_device
        assert joint.meta()["cache_on_device"] is on_device
        assert len(jm["history"]) == 2
        stores[on_device] = store
    for kind in ("features", "joint", "joint_targets", "student"):
        keys = sorted(p.name for p in (stores[True] / kind).iterdir() if not p.name.startswith("."))
        assert keys and keys == sorted(p.name for p in (stores[False] / kind).iterdir() if not p.name.startswith("."))
        for k in keys:
            files = [f for f in (stores[True] / kind / k).iterdir() if f.suffix in (".pt", ".arrow")]
            assert files
            for f in files:
                assert f.read_bytes() == (stores[False] / kind / k / f.name).read_bytes(), (kind, k, f.name)


# --------------------------------------------------------------------------------------------------------------------
# The prefetcher
# --------------------------------------------------------------------------------------------------------------------


def test_prefetcher_keeps_order_raises_and_stops() -> None:
    cpu = torch.device("cpu")
    assert list(Prefetcher(range(10), lambda i: torch.tensor([i]) * 2, cpu)) == [torch.tensor([i * 2])
                                                                                 for i in range(10)]

    def bad(i):
        if i == 3:
            raise RuntimeError("boom at 3")
        return i

    got = []
    with pytest.raises(RuntimeError, match="boom at 3"):
        for x in Prefetcher(range(10), bad, cpu):
            got.append(x)
    assert got == [0, 1, 2]
    made = []
    it = iter(Prefetcher(range(1000), lambda i: made.append(i) or i, cpu, depth=2))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops early: the thread ends, having run at most depth + 2 items ahead
    assert not [t for t in threading.enumerate() if t.name == "mlfd-prefetch"]
    assert len(made) <= 3 + 2 + 1
