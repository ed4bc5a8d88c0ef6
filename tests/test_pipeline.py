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

# The smoke run trains 29 stages (six of them multi-dataset baselines, one per mode and student architecture): a few
# minutes on 2 idle cores, far more on a shared, loaded machine.
pytestmark = pytest.mark.timeout(2400)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "pipelines" / "offline_default.yaml"
CHANCE = {"mnist": 10.0, "fashion": 10.0, "digits": 10.0}


def _artifacts(store: Path) -> dict[str, float]:
    """Every complete artifact with the mtime of its manifest."""
    return {str(p.parent.relative_to(store)): p.stat().st_mtime for p in store.glob(f"*/*/{MANIFEST}")}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """`mlfd run pipelines/offline_default.yaml --smoke` through the real CLI (a few minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, "-m", "mlfd.cli", "run", str(DEFAULT), "--smoke", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=2300)
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
        net = timm.create_model(ds.student_net.arch, num_classes=10)
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


# --------------------------------------------------------------------------------------------------------------------
# Per-dataset recipes, given teachers, baselines per architecture
# --------------------------------------------------------------------------------------------------------------------


def _edited(tmp_path: Path, edit) -> PipelineSpec:
    data = to_dict(_tiny(tmp_path))
    edit(data)
    return from_dict(PipelineSpec, data)


def _state(art) -> dict:
    from mlfd.store import load_torch

    return load_torch(art.file("model.pt"))


def _same(a: dict, b: dict, skip: str = "fc.") -> list[bool]:
    """Per shared weight matrix or kernel (randomly initialised; classifier excluded unless ``skip`` says otherwise):
    bit-equal or not."""
    return [torch.equal(a[k], b[k]) for k in a if not k.startswith(skip) and k in b and a[k].ndim >= 2]


@pytest.mark.slow
def test_per_dataset_recipes_drive_the_stages_and_their_keys(tmp_path: Path) -> None:
    from mlfd.stages.students import student_key, student_variant
    from mlfd.stages.teachers import teacher_key, train_teacher

    def edit(data: dict) -> None:
        data["datasets"][1]["teacher"] = {"epochs": 2, "lr": 0.005}
        data["datasets"][1]["student"] = {"alpha": 0.3, "recipe": {"epochs": 2}}

    spec = _edited(tmp_path, edit)
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    assert read_metrics(train_teacher(ctx, "mnist"))["epochs"] == 1
    digits = read_metrics(train_teacher(ctx, "digits"))
    assert digits["epochs"] == 2 and len(digits["history"]) == 2
    assert read_metrics(train_student(ctx, "digits", 1))["epochs"] == 2
    assert read_metrics(train_student(ctx, "mnist", 1))["epochs"] == 1

    def keys(s: PipelineSpec) -> dict:
        c = Context(spec=s, store=ctx.store, progress=False)
        plan = {n: plan_for(c, 1, n) for n in ("mnist", "digits")}
        return {**{("teacher", n): teacher_key(c, n) for n in plan},
                **{("student", n): student_key(c, n, plan[n], student_variant(c, None, n)) for n in plan}}

    base = keys(spec)
    # a change of digits' student override re-keys digits' student only
    other = keys(_edited(tmp_path, lambda d: (edit(d), d["datasets"][1]["student"].update(alpha=0.4))))
    assert {k for k in base if base[k] != other[k]} == {("student", "digits")}
    # a change of digits' teacher override re-keys digits' teacher (and the students distilled through it)
    other = keys(_edited(tmp_path, lambda d: (edit(d), d["datasets"][1]["teacher"].update(lr=0.004))))
    assert {k for k in base if base[k] != other[k]} == {("teacher", "digits"), ("student", "mnist"),
                                                         ("student", "digits")}
    # keys follow effective values: an override that repeats the global value changes nothing
    plain = keys(_tiny(tmp_path))
    same = keys(_edited(tmp_path, lambda d: d["datasets"][0].update(teacher={"lr": d["teacher"]["lr"]},
                                                                   student={"alpha": d["student"]["alpha"]})))
    assert same == plain


@pytest.mark.slow
def test_checkpointed_teacher_is_fine_tuned_and_the_student_starts_fresh(tmp_path: Path) -> None:
    """A checkpoint is the teacher's starting point: fine-tuned by default, kept as is with epochs 0; the student and
    the baselines of that column never load it."""
    from mlfd.models import create_model
    from mlfd.stages.baselines import train_baseline
    from mlfd.stages.common import build_level_model, seed_everything
    from mlfd.stages.students import StudentTask
    from mlfd.stages.teachers import train_teacher
    from mlfd.config import ModelSpec

    torch.manual_seed(7)
    ckpt_state = create_model(ModelSpec(arch="test_resnet"), 10).state_dict()
    ckpt = tmp_path / "teacher.pt"
    torch.save(ckpt_state, ckpt)
    spec = _edited(tmp_path, lambda d: d["datasets"][0]["model"].update(checkpoint=str(ckpt)))
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    teacher = train_teacher(ctx, "mnist")
    assert read_metrics(teacher)["epochs"] == 1
    tuned = _state(teacher)
    assert set(tuned) == set(ckpt_state) and not all(_same(tuned, ckpt_state, skip="#"))  # fine-tuned

    plan = plan_for(ctx, 2, "mnist")
    task = StudentTask(ctx, "mnist", plan, spec.student_for("mnist"))
    seed_everything(spec.student_for("mnist").recipe.seed)
    fresh = build_level_model(spec.dataset("mnist").student_net, 10, ctx.device, False).model.state_dict()
    start = task.module.backbone.model.state_dict()
    assert all(_same(start, fresh, skip="#"))  # bit-equal to a fresh init of the student's seed
    assert not any(_same(start, ckpt_state)) and not any(_same(start, tuned))
    assert read_metrics(train_student(ctx, "mnist", 2))["epochs"] == 1

    for mode in ("multi_head", "joint_head"):  # used to fail: "unexpected keys" from the checkpoint's classifier
        m = read_metrics(train_baseline(ctx, mode, "mnist"))
        assert m["arch"] == "test_resnet" and set(m["test"]) == {"mnist", "digits"}

    as_is = _edited(tmp_path, lambda d: (d["datasets"][0]["model"].update(checkpoint=str(ckpt)),
                                        d["datasets"][0].update(teacher={"epochs": 0}),
                                        d["baselines"].update(recipe=d["teacher"])))
    given = train_teacher(Context(spec=as_is, store=ctx.store, progress=False), "mnist")
    assert read_metrics(given)["epochs"] == 0 and all(_same(_state(given), ckpt_state, skip="#"))


@pytest.mark.slow
def test_pretrained_teacher_is_fine_tuned_and_the_student_starts_from_the_pretrained_weights(tmp_path: Path) -> None:
    """timm pretrained weights, read offline from a local file through timm's own loader (``pretrained_cfg_overlay``):
    the teacher gets a new head and is fine-tuned; the student starts from the pretrained weights, not the teacher's."""
    import timm

    from mlfd.stages.baselines import train_baseline
    from mlfd.stages.students import StudentTask
    from mlfd.stages.teachers import train_teacher

    torch.manual_seed(3)
    weights = timm.create_model("test_resnet", num_classes=1000).state_dict()  # an "ImageNet" checkpoint
    file = tmp_path / "test_resnet_in1k.pth"
    torch.save(weights, file)
    model = {"arch": "test_resnet", "input_size": 32, "pretrained": True,
             "kwargs": {"pretrained_cfg_overlay": {"file": str(file)}}}
    spec = _edited(tmp_path, lambda d: d["datasets"][0].update(model=model))
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    teacher = train_teacher(ctx, "mnist")
    tuned = _state(teacher)
    assert read_metrics(teacher)["epochs"] == 1 and tuned["fc.weight"].shape == (10, weights["fc.weight"].shape[1])
    assert not all(_same(tuned, weights))  # fine-tuned away from the pretrained weights

    task = StudentTask(ctx, "mnist", plan_for(ctx, 1, "mnist"), spec.student_for("mnist"))
    start = task.module.backbone.model.state_dict()
    assert all(_same(start, weights)) and len(_same(start, weights)) > 10  # the pretrained backbone ...
    assert not any(_same(start, tuned, skip="#"))  # ... not the fine-tuned teacher
    m = read_metrics(train_baseline(ctx, "multi_head", "mnist"))
    assert m["arch"] == "test_resnet" and m["epochs"] == 1

    as_is = _edited(tmp_path, lambda d: (d["datasets"][0].update(model=model, teacher={"epochs": 0}),
                                        d["baselines"].update(recipe=d["teacher"])))
    given = _state(train_teacher(Context(spec=as_is, store=ctx.store, progress=False), "mnist"))
    assert all(_same(given, weights))  # epochs 0: the pretrained backbone as it is (with its new head)


@pytest.mark.slow
def test_baselines_per_student_architecture(tmp_path: Path) -> None:
    """One multi-head / joint-head baseline per distinct student architecture; each column reports its own; columns
    with the same architecture share one artifact."""
    from mlfd.stages.baselines import baseline_key
    from mlfd.stages.pipeline import _rows

    spec = _tiny(tmp_path)  # mnist: test_resnet, digits: test_convnext
    store = ArtifactStore(tmp_path / "store")
    ctx = Context(spec=spec, store=store, progress=False)
    stages = [s for s in plan_stages(spec) if s.role in ("multi_head", "joint_head")]
    assert [(s.label, s.datasets) for s in stages] == [
        ("multi_head test_resnet (mnist)", ["mnist"]), ("multi_head test_convnext (digits)", ["digits"]),
        ("joint_head test_resnet (mnist)", ["mnist"]), ("joint_head test_convnext (digits)", ["digits"])]
    for st in stages:
        art = st.build(ctx)
        m = read_metrics(art)
        assert m["arch"] == ("test_resnet" if st.datasets == ["mnist"] else "test_convnext")
        rows = _rows(m, st.role, st.levels, 0, st.datasets)
        assert {r["dataset"] for r in rows} == set(st.datasets) and len(rows) == 2  # val and test
    assert len([k for k in _artifacts(tmp_path / "store") if k.startswith("baseline/")]) == 4

    # digits' student is mnist's test_resnet (same timm kwargs) too: one baseline per mode serves both columns, the one
    # already stored
    same = _edited(tmp_path, lambda d: d["datasets"][1].update(student_model=dict(d["datasets"][0]["model"])))
    sctx = Context(spec=same, store=store, progress=False)
    assert [(s.label, s.datasets) for s in plan_stages(same) if s.role == "multi_head"] == [("multi_head", None)]
    assert baseline_key(sctx, "multi_head", "digits") == baseline_key(sctx, "multi_head", "mnist") == \
        baseline_key(ctx, "multi_head", "mnist")
    # the multi-head batching is part of the multi-head key only
    concat = _edited(tmp_path, lambda d: d["baselines"].update(multi_head_batching="concat"))
    cctx = Context(spec=concat, store=store, progress=False)
    assert baseline_key(cctx, "multi_head", "mnist") != baseline_key(ctx, "multi_head", "mnist")
    assert baseline_key(cctx, "joint_head", "mnist") == baseline_key(ctx, "joint_head", "mnist")


def test_multi_head_alternates_datasets_with_equal_weights(tmp_path: Path) -> None:
    """alternate (default): one dataset's batch per micro-step in turn, m micro-steps per optimizer step, and the
    accumulated gradient equals the concatenated batch's (weights 1/m each) where BatchNorm does not couple them."""
    from mlfd.stages.baselines import SharedTask, baseline_model

    spec = _tiny(tmp_path)
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    model, recipe = baseline_model(ctx, "digits")
    assert model.arch == "test_convnext" and spec.baselines.multi_head_batching == "alternate"
    alt = SharedTask(ctx, "multi_head", model, recipe)
    cat = SharedTask(ctx, "multi_head", model, recipe, batching="concat")
    rounds = max(len(ld) for ld in cat.loaders)
    assert alt.steps_per_epoch() == 2 * rounds and cat.steps_per_epoch() == rounds
    assert alt.fit_recipe().grad_accum == 2 * recipe.grad_accum and cat.fit_recipe() is recipe
    micro = list(alt.train_batches(0))
    assert [b[0][0] for b in micro] == [0, 1] * rounds
    cat.module.load_state_dict(alt.module.state_dict())
    for task in (alt, cat):
        task.module.eval()  # BatchNorm on running statistics: the two batchings must give the same gradient
    alt.module.zero_grad()
    for b in micro[:2]:
        (alt.train_step(b)["loss"] / alt.fit_recipe().grad_accum).backward()
    cat.module.zero_grad()
    cat.train_step([item for b in micro[:2] for item in b])["loss"].backward()
    for (name, p), q in zip(alt.module.named_parameters(), cat.module.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------------------------


def _seeded(tmp_path: Path, seeds: list[int]) -> PipelineSpec:
    """The tiny pipeline at fusion level 1 with one baseline and no controls, over ``seeds``."""
    return _edited(tmp_path, lambda d: d.update(fusion_levels=[1], seeds=seeds,
                                                baselines={"multi_head": True, "joint_head": False},
                                                controls={"own_teacher": False, "no_kd": False}))


def test_seed_zero_keeps_the_keys_and_other_seeds_change_every_trained_key(tmp_path: Path) -> None:
    from mlfd.stages.baselines import baseline_key
    from mlfd.stages.cache import cache_key
    from mlfd.stages.joint import joint_key
    from mlfd.stages.students import student_key
    from mlfd.stages.teachers import teacher_key

    def keys(spec: PipelineSpec) -> list[str]:
        ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
        plan = plan_for(ctx, 1)
        return [teacher_key(ctx, "mnist"), cache_key(ctx, "mnist", "digits", 1), joint_key(ctx, plan),
                student_key(ctx, "digits", plan, spec.student_for("digits")), baseline_key(ctx, "multi_head", "mnist")]

    def edit(d: dict) -> None:  # per-dataset seeds are shifted too
        d["datasets"][1]["teacher"] = {"seed": 7}
        d["datasets"][1]["student"] = {"recipe": {"seed": 5}}

    spec = _edited(tmp_path, edit)
    assert spec.seeds == [0]
    assert keys(spec.for_seed(0)) == keys(spec)
    one, two = spec.for_seed(1), spec.for_seed(2)
    assert (one.teacher_for("mnist").seed, one.teacher_for("digits").seed, one.student_for("digits").recipe.seed,
            one.joint.recipe.seed, one.seeds) == (1, 8, 6, 1, [1])
    k0, k1, k2 = keys(spec), keys(one), keys(two)
    assert all(a != b != c != a for a, b, c in zip(k0, k1, k2))  # teacher, cache, joint, student, baseline
    assert keys(spec.for_seed(1)) == k1
    assert from_dict(PipelineSpec, to_dict(spec)).seeds == [0]
    assert spec.dataset("mnist").split_seed == one.dataset("mnist").split_seed == 0  # splits fixed across seeds


@pytest.mark.slow
def test_two_seeds_train_twice_reuse_per_seed_and_report_mean_std(tmp_path: Path) -> None:
    """seeds [0, 1]: every trained stage twice with different weights and keys; seed 1 again reuses everything;
    results.md / report.md give mean ± std (n=2) of the per-seed rows; MLflow has one child per stage and seed."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from mlfd.report import write_report
    from mlfd.stages.teachers import teacher_key
    from mlfd.tracking import TAG_PARENT, TAG_SEED, TAG_STAGE, PipelineTracking

    spec = _seeded(tmp_path, [0, 1])
    store = tmp_path / "store"
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = PipelineTracking(uri, spec, out)
    df = run_pipeline(spec, out, store=store, progress=False, log=tracking.log_stage)
    tracking.finish(write_report(out))
    assert list(df.columns) == RESULT_COLUMNS and sorted(set(df["seed"])) == [0, 1]
    assert len(df[df.seed == 0]) == len(df[df.seed == 1]) == len(df) // 2
    assert not df.duplicated(["dataset", "role", "levels", "split", "seed"]).any()
    assert set(pd.read_parquet(out / "curves.parquet")["seed"]) == {0, 1}

    arts = _artifacts(store)
    for kind, n in (("teacher", 4), ("features", 8), ("joint", 2), ("student", 4), ("baseline", 4)):
        assert len([k for k in arts if k.startswith(f"{kind}/")]) == n, kind  # 2 per seed (baselines: 2 archs)
    t0, t1 = (ArtifactStore(store).get("teacher", teacher_key(Context(spec=spec.for_seed(s), store=ArtifactStore(
        store), progress=False), "mnist")) for s in (0, 1))
    assert t0.key != t1.key and not all(_same(_state(t0), _state(t1), skip="<none>"))

    # the same seed again trains nothing and gives the same rows
    again = run_pipeline(_seeded(tmp_path, [1]), tmp_path / "again", store=store, progress=False)
    assert _artifacts(store) == arts
    pd.testing.assert_frame_equal(again.reset_index(drop=True), df[df.seed == 1].reset_index(drop=True))

    # mean ± std (n=2) of the per-seed rows, in results.md and report.md
    md, report = (out / "results.md").read_text(), (out / "report.md").read_text()
    for role, title, lv in (("student", "Students", "L1"), ("dataset_specific", "Dataset-specific models", "-")):
        line = next(x for x in md.splitlines() if x.startswith(f"| {title} | {lv} |"))
        assert line in report
        cells = line.strip("| ").split(" | ")[2:]
        i = 0
        for d in ("mnist", "digits"):
            for split in ("val", "test"):
                for k in ("acc1", "acc5"):
                    v = df[(df.dataset == d) & (df.role == role) & (df.split == split)].sort_values("seed")[k]
                    assert len(v) == 2
                    assert cells[i] == f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f} (n=2)"
                    i += 1

    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name(spec.name).experiment_id], max_results=1000)
    kids = [r for r in runs if TAG_PARENT in r.data.tags]
    n_stages = len(plan_stages(spec))
    assert len(kids) == 2 * n_stages
    assert sorted(r.data.tags[TAG_SEED] for r in kids) == ["0"] * n_stages + ["1"] * n_stages
    teacher1 = next(r for r in kids if r.data.tags[TAG_STAGE] == "teacher mnist [seed 1]")
    row = df[(df.dataset == "mnist") & (df.role == "dataset_specific") & (df.split == "test") & (df.seed == 1)]
    assert teacher1.data.tags[TAG_SEED] == "1"
    assert teacher1.data.metrics["test/acc1"] == pytest.approx(float(row.acc1.iloc[0]))


def test_a_train_split_one_over_a_multiple_of_the_batch_trains(tmp_path: Path) -> None:
    """120 train images in batches of 17 (7 x 17 + 1): the last sample joins the batch before it (a batch of one
    crashes BatchNorm in training mode), in the loaders and the joint teacher's batches, and every sample is seen."""
    from mlfd.data import batch_bounds, make_loader
    from mlfd.stages.joint import JointTask
    from mlfd.stages.teachers import ClassifierTask, train_teacher

    assert batch_bounds(120, 17, train=True)[-1] == (102, 120) and len(batch_bounds(120, 17, train=True)) == 7
    assert batch_bounds(120, 17)[-1] == (119, 120)  # evaluation keeps its order and sizes
    assert batch_bounds(1, 17, train=True) == [(0, 1)] and batch_bounds(18, 17, drop_last=True, train=True) == [(0, 17)]
    spec = _edited(tmp_path, lambda d: (d["teacher"].update(batch_size=17), d["joint"]["recipe"].update(batch_size=239),
                                        d.update(fusion_levels=[2])))
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    ds = ctx.data("mnist")
    assert ds.train.labels.numel() == 120
    task = ClassifierTask(ctx, "mnist", spec.dataset("mnist").model, spec.teacher_for("mnist"))
    sizes = [y.numel() for _, y in task.train_batches(0)]
    assert sizes == [17] * 6 + [18] and task.steps_per_epoch() == 7
    loader = make_loader(ds.train.images, ds.train.labels, 17, True, 0)
    assert sorted(torch.cat([i for i, _, _ in loader]).tolist()) == list(range(120))
    for name in ("mnist", "digits"):
        assert read_metrics(train_teacher(ctx, name))["epochs"] == 1  # crashed in BatchNorm before the fix
    joint = JointTask(ctx, plan_for(ctx, 2))
    n = joint.ds_id.numel()
    sizes = [sum(idx.numel() for _, idx in groups) for groups, _ in joint.train_batches(0)]
    assert n == 240 and sizes == [240] and joint.steps_per_epoch() == 1
    assert read_metrics(train_joint(ctx, plan_for(ctx, 2)))["epochs"] == 1


def test_a_searched_stage_trial_builds_what_its_key_names(tmp_path: Path) -> None:
    """StageTrial (the one home of what a trial trains and produces, read by the trainable, the best-model logging,
    the search summary and the packing dry run): a teacher trial with a per-dataset recipe builds the artifact its
    output() names, with that recipe; a joint trial names the joint teacher of the pipeline's one level."""
    from mlfd.stages.joint import joint_key
    from mlfd.stages.trial import StageTrial

    spec = _edited(tmp_path, lambda d: (d["datasets"][0].update(teacher={"lr": 0.0005, "epochs": 1}),
                                        d.update(fusion_levels=[2])))
    ctx = Context(spec=spec, store=ArtifactStore(tmp_path / "store"), progress=False)
    name = spec.datasets[0].name
    trial = StageTrial(ctx, "teachers", name)
    assert trial.recipe().lr == 0.0005 and trial.recipe().epochs == 1 and trial.artifact() is None
    art = trial.build()
    assert (art.kind, art.key) == trial.output() and trial.artifact().key == art.key
    assert read_metrics(art)["epochs"] == 1
    assert StageTrial(ctx, "joint").output() == ("joint", joint_key(ctx, plan_for(ctx, 2)))
    with pytest.raises(ValueError, match="not one of"):
        StageTrial(ctx, "controls")
