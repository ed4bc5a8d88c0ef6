"""End-to-end runs of the method on the offline datasets: the smoke pipeline, store reuse, variants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from mlfd.config import from_dict, PipelineSpec, load_pipeline, smoke_pipeline, to_dict
from mlfd.stages.common import Context, read_metrics
from mlfd.stages.joint import plan_for, train_joint
from mlfd.stages.pipeline import RESULT_COLUMNS, plan_stages, run_pipeline
from mlfd.stages.students import train_student
from mlfd.store import MANIFEST, ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "pipelines" / "offline_default.yaml"
CHANCE = {"mnist": 10.0, "fashion": 10.0, "digits": 10.0}


def _artifacts(store: Path) -> dict[str, float]:
    """Every complete artifact with the mtime of its manifest."""
    return {str(p.parent.relative_to(store)): p.stat().st_mtime for p in store.glob(f"*/*/{MANIFEST}")}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """`mlfd run pipelines/offline_default.yaml --smoke` through the real CLI (about a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, "-m", "mlfd.cli", "run", str(DEFAULT), "--smoke", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(smoke_run: Path) -> None:
    df = pd.read_parquet(smoke_run / "results.parquet")
    assert list(df.columns) == RESULT_COLUMNS
    spec = smoke_pipeline(load_pipeline(DEFAULT))
    roles = {"dataset_specific", "multi_head", "joint_head", "joint_teacher", "student", "student_own_teacher",
             "student_no_kd"}
    assert set(df["role"]) == roles
    # one row per dataset x role x levels x split
    per_level = 4  # joint teacher, student, own-teacher control, no-KD control
    expected = len(spec.datasets) * 2 * (3 + per_level * len(spec.fusion_levels))
    assert len(df) == expected
    assert not df.duplicated(["dataset", "role", "levels", "split"]).any()
    assert set(df[df["role"] == "student"]["levels"]) == {"L1", "L2"}
    # every model learned something on every dataset (chance is 10%)
    for role in ("dataset_specific", "joint_teacher", "student"):
        for d, chance in CHANCE.items():
            acc = df[(df["role"] == role) & (df["dataset"] == d)]["acc1"]
            assert (acc > chance + 10).all(), (role, d, acc.tolist())
    assert (df["acc5"] >= df["acc1"]).all()
    assert (df["epochs"] >= 1).all()
    md = (smoke_run / "results.md").read_text()
    assert "| Students | L2 |" in md and "| Dataset-specific models | - |" in md
    report = (smoke_run / "report.md").read_text()
    for d in CHANCE:  # each dataset's learning curves: a real PNG, linked from the report
        png = smoke_run / f"curves_{d}.png"
        assert f"]({png.name})" in report, png.name
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 100


@pytest.mark.slow
def test_test_split_evaluated_for_the_val_selected_epoch(smoke_run: Path) -> None:
    """The reported val number is the best epoch's, the history holds every epoch, and test is a separate number."""
    store = ArtifactStore(smoke_run / "store")
    for p in (smoke_run / "store" / "student").iterdir():
        m = json.loads((p / "metrics.json").read_text())
        vals = [h["val/acc1"] for h in m["history"]]
        assert m["val"]["acc1"] == max(vals)
        assert m["best_epoch"] == vals.index(max(vals)) + 1
        assert 0 <= m["test"]["acc1"] <= 100
    assert store.root.is_dir()


@pytest.mark.slow
def test_second_run_reuses_every_artifact(smoke_run: Path, tmp_path: Path) -> None:
    """A second run over the same store trains nothing: no new artifact, no artifact rewritten, same numbers."""
    store = smoke_run / "store"
    before = _artifacts(store)
    spec = smoke_pipeline(load_pipeline(DEFAULT))
    df = run_pipeline(spec, tmp_path / "again", store=store, progress=False)
    assert _artifacts(store) == before
    first = pd.read_parquet(smoke_run / "results.parquet")
    pd.testing.assert_frame_equal(df.reset_index(drop=True), first.reset_index(drop=True))


def _tiny(tmp_path: Path, **changes) -> PipelineSpec:
    data = to_dict(smoke_pipeline(load_pipeline(DEFAULT)))
    data["datasets"] = [d for d in data["datasets"] if d["name"] in ("mnist", "digits")]
    for d in data["datasets"]:
        d.update(max_train=120, max_val=60, max_test=60)
    for r in (data["teacher"], data["student"]["recipe"], data["joint"]["recipe"]):
        r["epochs"] = 1
    data.update(changes)
    return from_dict(PipelineSpec, data)


@pytest.mark.slow
def test_online_targets_and_per_target_variant(tmp_path: Path) -> None:
    """Both teacher-target modes and both joint-teacher variants run and give valid students."""
    base = _tiny(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    for student in ({"targets": "online"}, {"targets": "cache"}):
        for joint in ({"variant": "per_target"}, {"variant": "union"}):
            data = to_dict(base)
            data["student"].update(student)
            data["joint"].update(joint)
            spec = from_dict(PipelineSpec, data)
            ctx = Context(spec=spec, store=store, progress=False)
            art = train_student(ctx, "digits", 2)
            m = read_metrics(art)
            assert m["role"] == "student" and m["epochs"] == 1
            plan = plan_for(ctx, 2, "digits")
            assert plan.mode == joint["variant"]
            assert plan.datasets == (("digits",) if joint["variant"] == "per_target" else ("mnist", "digits"))
            jm = read_metrics(train_joint(ctx, plan))
            assert set(jm["val"]) == set(plan.datasets)
    # the online and cache students differ (different targets), and both were stored
    assert len(list((tmp_path / "store" / "student").iterdir())) == 4


def test_own_teacher_control_fuses_only_its_teacher(tmp_path: Path) -> None:
    ctx = Context(spec=_tiny(tmp_path), store=ArtifactStore(tmp_path / "store"), progress=False)
    plan = plan_for(ctx, 1, "mnist", own=True)
    assert plan.teachers == ("mnist",) and plan.datasets == ("mnist",)
    labels = [s.label for s in plan_stages(ctx.spec)]
    assert "student_own_teacher mnist L1" in labels and "student_no_kd digits L2" in labels


@pytest.mark.slow
def test_student_deploys_without_adaptors(smoke_run: Path) -> None:
    """The stored student is the bare timm model (no adaptors): same parameter count as a fresh one."""
    import timm

    from mlfd.store import load_torch

    spec = smoke_pipeline(load_pipeline(DEFAULT))
    for p in (smoke_run / "store" / "student").iterdir():
        m = json.loads((p / "metrics.json").read_text())
        ds = spec.dataset(m["dataset"])
        state = load_torch(p / "model.pt")
        net = timm.create_model(ds.student.arch, num_classes=10)
        net.load_state_dict(state)  # strict: exactly the timm model's keys
        net.eval()
        assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in net.state_dict().values())
        with torch.no_grad():
            assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        break


@pytest.mark.slow
def test_stage_weights_do_not_depend_on_what_ran_before(tmp_path: Path) -> None:
    """T* and the student get the same weights whether the teachers were trained just before in the same process
    (`mlfd run`) or found in the store by a process whose global RNG is elsewhere (a Ray trial): `mlfd export`'s rerun
    relies on this."""
    from mlfd.stages.teachers import train_teacher

    spec = _tiny(tmp_path)
    one_go = Context(spec=spec, store=ArtifactStore(tmp_path / "a"), progress=False)
    train_student(one_go, "digits", 2)
    split = Context(spec=spec, store=ArtifactStore(tmp_path / "b"), progress=False)
    for d in ("mnist", "digits"):
        train_teacher(split, d)
    torch.manual_seed(12345)
    torch.rand(77)  # another history of the global RNG before T* and the student are built
    train_student(split, "digits", 2)
    for kind in ("teacher", "joint", "student"):
        keys = sorted(p.name for p in (tmp_path / "a" / kind).iterdir() if not p.name.startswith("."))
        assert keys and keys == sorted(p.name for p in (tmp_path / "b" / kind).iterdir() if not p.name.startswith("."))
        for k in keys:
            assert (tmp_path / "a" / kind / k / "model.pt").read_bytes() == \
                (tmp_path / "b" / kind / k / "model.pt").read_bytes(), (kind, k)


@pytest.mark.slow
def test_failed_write_of_the_outputs_keeps_the_earlier_ones(smoke_run: Path, tmp_path: Path) -> None:
    """`mlfd run` again over an earlier output directory, on a "full disk" (a real write(2) failure: a 16 KiB file
    size limit, EFBIG): one-line error, exit 1, and the earlier results are still there, byte for byte."""
    import resource
    import shutil
    import signal

    out = tmp_path / "out"
    shutil.copytree(smoke_run, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def limit() -> None:  # in the child: writes past 16 KiB fail with EFBIG (SIGXFSZ ignored, as a full disk fails)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "mlfd.cli", "run", str(DEFAULT), "--smoke", "--out", str(out),
                           "--quiet", "--no-tracking"], capture_output=True, text=True, timeout=600,
                          preexec_fn=limit)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("mlfd: error: ") and "file too large" in lines[0], proc.stderr
    assert str(out) in lines[0]  # names the file it could not write
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing earlier destroyed
    assert not [k for k in after if k not in before], "temp files left behind"


def _png_folder(root: Path, source: str, n: int) -> None:
    """The first ``n`` train and n // 2 test images of an offline source as PNG files in root/{train,test}/<class>/."""
    from PIL import Image

    from mlfd.data import SOURCES

    raw = SOURCES[source]({}, "opts")
    for split, part, count in (("train", raw.train, n), ("test", raw.test or raw.train, n // 2)):
        offset = 0 if split == "train" or raw.test is not None else n
        for i in range(offset, offset + count):
            d = root / split / f"c{int(part.labels[i])}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(part.images[i, 0].numpy(), "L").save(d / f"{i:05d}.png")


@pytest.mark.slow
def test_streamed_folders_train_the_same_weights_as_in_memory(tmp_path: Path) -> None:
    """Two image-folder datasets, read into memory or streamed from their files by DataLoader workers: the same
    store keys (how files are read is not part of them) and byte-identical teacher, T* and student weights."""
    for name, source in (("mnist", "mnist5k"), ("digits", "sklearn_digits")):
        _png_folder(tmp_path / name, source, 150)
    stores = {}
    for stream in (False, True):
        data = to_dict(_tiny(tmp_path))
        for d in data["datasets"]:
            d.update(source="folder", classes=None,
                     options={"root": str(tmp_path / d["name"]), "mode": "L", "stream": stream, "workers": 2})
        store = tmp_path / f"store-{stream}"
        ctx = Context(spec=from_dict(PipelineSpec, data), store=ArtifactStore(store), progress=False)
        if stream:
            assert type(ctx.data("digits").train.images).__name__ == "FileImages"
        m = read_metrics(train_student(ctx, "digits", 2))
        assert m["val"]["acc1"] > 10 + 20  # learned (chance is 10%)
        stores[stream] = store
    for kind in ("teacher", "features", "joint", "joint_targets", "student"):
        keys = sorted(p.name for p in (stores[False] / kind).iterdir() if not p.name.startswith("."))
        assert keys and keys == sorted(p.name for p in (stores[True] / kind).iterdir() if not p.name.startswith("."))
        for k in keys:
            files = [f for f in (stores[False] / kind / k).iterdir() if f.suffix in (".pt", ".arrow")]
            assert files
            for f in files:
                assert f.read_bytes() == (stores[True] / kind / k / f.name).read_bytes(), (kind, k, f.name)


def test_a_tasks_evaluations_reuse_their_loaders(tmp_path: Path) -> None:
    """Every evaluation of a task reads a split through the same loader (stages/common.py EvalLoaders): a streamed
    split keeps its decode worker processes from one evaluation to the next, and gives the in-memory numbers."""
    from mlfd.stages.teachers import ClassifierTask

    _png_folder(tmp_path / "digits", "sklearn_digits", 80)
    results = {}
    for stream in (False, True):
        data = to_dict(_tiny(tmp_path))
        digits = next(d for d in data["datasets"] if d["name"] == "digits")
        digits.update(source="folder", classes=None, options={
            "root": str(tmp_path / "digits"), "mode": "L", "stream": stream, "workers": 2})
        ctx = Context(spec=from_dict(PipelineSpec, data), store=ArtifactStore(tmp_path / "store"), progress=False)
        task = ClassifierTask(ctx, "digits", ctx.spec.dataset("digits").model, ctx.spec.teacher)
        first = [task.evaluate("val"), task.evaluate("test")]
        loader = task.eval_loaders("val")
        assert task.eval_loaders("val") is loader and task.eval_loaders("test") is not loader
        if stream:
            workers = loader._loader._iterator
            assert workers is not None and len(workers._workers) == 2
            assert [task.evaluate("val"), task.evaluate("test")] == first
            assert loader._loader._iterator is workers  # the same worker processes served the second evaluation
        results[stream] = first
    assert results[True] == results[False]
    assert results[False][0]["loss"] > 0 and set(results[False][0]) == {"acc1", "acc5", "loss"}
