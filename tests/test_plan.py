"""``mlfd plan``: stage list and keys as ``mlfd run`` builds them, synthetic counts, cache bytes against what the cache
stage writes, fit warnings, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mlfd.cli import main
from mlfd.config import PipelineSpec, SpecError, from_dict, load_pipeline, smoke_pipeline
from mlfd.models import LevelModel, create_model
from mlfd.plan import (Planner, StagePlan, cache_bytes, fit_warning, fitting_batch, make_plan, parse_counts,
                       parse_memory, peak_line, plan_table, synthetic_shape, write_json)
from mlfd.stages.cache import build_cache
from mlfd.stages.common import Context
from mlfd.stages.pipeline import plan_stages
from mlfd.stages.teachers import train_teacher
from mlfd.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
DEFAULT = ROOT / "pipelines" / "offline_default.yaml"

# The shape of the paper's T1 files (torchvision CIFAR-100, TinyImageNet and ImageNet-Sketch folders) at 32 px with
# tiny models; the data paths do not exist: --synthetic never reads them.
PAPER_LIKE = {
    "name": "paper-like",
    "fusion_levels": [2],
    "datasets": [
        {"name": "cifar100", "source": "torchvision",
         "options": {"name": "CIFAR100", "root": "/nonexistent/cifar", "download": False},
         "model": {"arch": "test_resnet", "input_size": 32}},
        {"name": "tiny", "source": "folder", "options": {"root": "/nonexistent/tiny-imagenet-200"},
         "model": {"arch": "test_efficientnet", "input_size": 32}},
        {"name": "sketch", "source": "folder", "options": {"root": "/nonexistent/imagenet-sketch/sketch",
                                                           "image_size": 48},
         "model": {"arch": "test_convnext", "input_size": 32}},
    ],
    "teacher": {"epochs": 2, "batch_size": 16},
    "joint": {"recipe": {"epochs": 3, "batch_size": 64}},
    "student": {"recipe": {"epochs": 2, "batch_size": 16}},
    "baselines": {"multi_head": True, "joint_head": False},
    "controls": {"own_teacher": False, "no_kd": False},
}


def _paper_like() -> PipelineSpec:
    return from_dict(PipelineSpec, PAPER_LIKE)


def test_synthetic_counts_follow_the_known_table_and_the_split_rules() -> None:
    """CIFAR-100 50k/10k with val carved 10% from train; TinyImageNet 100k/10k (val serves as test); ImageNet-Sketch
    50,889 in one split, test carved 20% then val 10%, at its declared image size; --count overrides."""
    spec = _paper_like()
    shapes = [synthetic_shape(d, i) for i, d in enumerate(spec.datasets)]
    got = [(s.name, s.train, s.val, s.test, s.classes, s.image_size, s.channels) for s in shapes]
    assert got == [("cifar100", 45_000, 5_000, 10_000, 100, (32, 32), 3),
                   ("tiny", 90_000, 10_000, 10_000, 200, (64, 64), 3),
                   ("sketch", 36_640, 4_071, 10_178, 1_000, (48, 48), 3)]
    capped = spec.datasets[0]
    capped.max_train, capped.classes = 1000, list(range(10))
    s = synthetic_shape(capped, 0)
    assert (s.train, s.val, s.test, s.classes) == (1000, 500, 1000, 10)
    over = parse_counts(["sketch=train:1000,test:100,classes:5,image_size:16"])
    assert over == {"sketch": {"train": 1000, "test": 100, "classes": 5, "image_size": 16}}
    s = synthetic_shape(spec.datasets[2], 2, over["sketch"])
    assert (s.train, s.val, s.test, s.classes, s.image_size) == (900, 100, 100, 5, (16, 16))


def test_paper_t1_cache_sizes_from_the_known_counts_and_the_models_shapes() -> None:
    """The T1 setting (CIFAR-100 + TinyImageNet + ImageNet-Sketch, 220,889 images, resnet18 / efficientnet_b0 /
    seresnext26d_32x4d at 224 px): the float16 caches of design.md, 1.7 / 83.1 / 120.5 / 235.5 GB at L1-L4."""
    spec = load_pipeline(ROOT / "pipelines" / "paper_t1.yaml")  # the shipped file; its data folders need not exist
    assert [d.model.arch for d in spec.datasets] == ["resnet18", "efficientnet_b0", "seresnext26d_32x4d"]
    shapes = [synthetic_shape(d, i) for i, d in enumerate(spec.datasets)]
    assert sum(s.total for s in shapes) == 220_889
    levels = [LevelModel(create_model(d.model, 10), 224).level_shapes() for d in spec.datasets]
    assert [lv[2] for lv in levels] == [(512, 7, 7), (1280, 7, 7), (2048, 7, 7)]
    total = {k: sum(sum(cache_bytes(s, lv[k]).values()) for s in shapes for lv in levels) for k in (1, 2, 3, 4)}
    assert {k: round(v / 1e9, 1) for k, v in total.items()} == {1: 1.7, 2: 83.1, 3: 120.5, 4: 235.5}


@pytest.mark.parametrize("items, message", [
    (["sketch"], "expected NAME=KEY:N"),
    (["sketch=train:10,colour:3"], "unknown key 'colour'"),
    (["sketch=train:-5"], "train needs a positive integer"),
])
def test_bad_counts_are_one_line_errors(items: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_counts(items)


def test_an_unknown_dataset_needs_its_count() -> None:
    data = json.loads(json.dumps(PAPER_LIKE))
    data["datasets"][1]["options"]["root"] = "/nonexistent/my-photos"
    spec = from_dict(PipelineSpec, data)
    with pytest.raises(SpecError, match=r"pipeline.datasets\[1\]: --synthetic does not know .* --count tiny=train:N"):
        synthetic_shape(spec.datasets[1], 1)
    with pytest.raises(SpecError, match="--count nope=...: unknown dataset 'nope'"):
        Planner(spec, counts={"nope": {"train": 5}})


def test_stages_and_keys_are_the_ones_run_builds(tmp_path: Path) -> None:
    """Labels in run order, keys the stage functions ask the store for; an artifact in the store shows as stored."""
    spec = load_pipeline(DEFAULT)
    planner = Planner(spec, store=tmp_path / "store")
    try:
        listed = planner.stages()
        assert [st.label for st, *_ in listed] == [st.label for st in plan_stages(spec)]
        assert all(job is not None for *_, job in listed)  # every stage of the default pipeline is measured
        kinds = [kind for _, kind, _, _ in listed]
        assert kinds.count("teacher") == 3 and kinds.count("baseline") == 6 and kinds.count("joint") == 2
        assert kinds.count("student") == 18  # 3 datasets x 2 levels x (student, own teacher, no KD)
        assert len({key for _, _, key, _ in listed}) == len(listed)
        _, kind, key, _ = listed[0]
        assert not planner.stored(kind, key)
        ArtifactStore(tmp_path / "store").get_or_build(kind, key, lambda tmp: (tmp / "model.pt").write_bytes(b"x"))
        assert planner.stored(kind, key) and not planner.stored(*listed[1][1:3])
    finally:
        planner.close()


def _stage(kind: str, peak: int, resident: int, batch: int = 128) -> StagePlan:
    return StagePlan("joint teacher L3" if kind == "joint" else "teacher tiny", kind, kind, "k", False,
                     batch_field="joint.recipe.batch_size" if kind == "joint" else "teacher.batch_size",
                     batch_size=batch, resident_bytes=resident, resident_what="cached features 120.0 GB",
                     peak_bytes=peak)


def test_fit_warnings_name_the_switch() -> None:
    gb = 10**9
    assert fit_warning(_stage("joint", 50 * gb, 45 * gb), 80 * gb, "cuda") == ""
    w = fit_warning(_stage("joint", 125 * gb, 120 * gb), 80 * gb, "cuda")
    assert w == ("joint teacher L3: needs about 125.0 GB, 80.0 GB on cuda; it holds its cached features 120.0 GB "
                 "whole: set joint.cache_on_device: false (out of core)")
    # working memory 90 GB at batch 128 besides 10 GB of images: 70 GB left for it -> batch 99
    assert fit_warning(_stage("teacher", 100 * gb, 10 * gb), 80 * gb, "cuda").endswith(
        "lower teacher.batch_size to 99 or less")
    assert "options.stream: true" in fit_warning(_stage("teacher", 100 * gb, 90 * gb), 80 * gb, "cuda")
    student = _stage("student", 34 * gb, 10 * gb)
    student.targets_bytes = 9 * gb  # its cached targets, besides 1 GB of images: 25 GB without them
    assert fit_warning(student, 26 * gb, "cuda") == (
        "teacher tiny: needs about 34.0 GB, 26.0 GB on cuda; it holds its cached targets 9.0 GB whole: set "
        "joint.cache_on_device: false (read out of core)")
    assert fit_warning(student, 24 * gb, "cuda").endswith("lower teacher.batch_size to 74 or less")  # 128 x 14 / 24
    assert fit_warning(_stage("teacher", 100 * gb, 10 * gb), 80 * gb, "--memory").startswith(
        "teacher tiny: needs about 100.0 GB, --memory gives 80.0 GB; lower")


def test_memory_sizes() -> None:
    assert parse_memory("24GiB") == 24 * 2**30 and parse_memory("80GB") == 80 * 10**9
    assert parse_memory("512mib") == 512 * 2**20 and parse_memory("1.5 G") == 1_500_000_000
    assert parse_memory("4096") == 4096
    for bad in ("0GB", "-1GB", "x", "1e9", "GB"):
        with pytest.raises(SpecError, match="--memory: .* is not a size"):
            parse_memory(bad)


def test_the_probe_batch_follows_the_line_through_two_measured_steps() -> None:
    mb = 10**6
    # 20 MB at batch 32, 36 MB at 64: 0.5 MB per sample over 4 MB fixed
    assert peak_line(32, 20 * mb, 64, 36 * mb) == (4 * mb, 0.5 * mb)
    assert peak_line(32, 20 * mb, 64, 10 * mb) == (20 * mb, 0.0)  # a noisy second step: never a negative slope
    assert peak_line(32, 20 * mb, 64, None) == (0.0, 20 * mb / 32)
    # batch 512 needs 260 MB; 100 MB fits batch 128 (68 MB) but not 256 (132 MB)
    assert fitting_batch(512, 32, 4 * mb, 0.5 * mb, 100 * mb) == 128
    assert fitting_batch(512, 32, 4 * mb, 0.5 * mb, 300 * mb) == 512
    assert fitting_batch(512, 32, 4 * mb, 0.5 * mb, 1 * mb) == 32  # never below the smallest step measured
    assert fitting_batch(100, 6, 0.0, 1.0, 30.0) == 25


def test_a_batch_that_does_not_fit_is_measured_smaller_and_its_peak_extrapolated() -> None:
    """With a declared 40 MB, a teacher's batch of 512 is predicted not to fit from steps at 32 and 64: it is timed
    at a halving of the batch, the peak is extrapolated to 512, and the warning names the batch field."""
    data = json.loads(json.dumps(PAPER_LIKE))
    data["datasets"] = data["datasets"][:2]
    data["teacher"]["batch_size"] = 512
    data["baselines"]["multi_head"] = False
    spec = from_dict(PipelineSpec, data)
    planner = Planner(spec, synthetic=True, steps=1, memory=40 * 10**6)
    try:
        plan = planner.plan()
    finally:
        planner.close()
    assert plan.budget_bytes == 40 * 10**6 and plan.budget_what == "given by --memory"
    teacher = plan.stages[0]
    cut = re.match(r"measured at batch (\d+) of 512 \(batch 512 would need about .*, more than 80% of 40\.0 MB\); "
                   r"peak extrapolated$", teacher.note)
    assert cut is not None, teacher.note
    assert int(cut.group(1)) in (32, 64, 128, 256)
    assert teacher.batch_size == 512 and teacher.images_per_s > 0 and teacher.peak_bytes > teacher.resident_bytes
    assert teacher.warning.startswith("teacher cifar100: needs about ") and "teacher.batch_size" in teacher.warning
    assert plan.stages[-1].note == ""  # a student's batch of 16 is measured whole: 1/16 of it is below two samples
    # cache_on_device: auto reads a student's cached targets out of core beyond half the budget, as CachedTargets does
    student = plan.stages[-1]
    what = student.resident_what
    assert re.fullmatch(r"images \S+ \S+ \(targets \S+ MB read out of core\)", what), what
    assert student.targets_bytes == 0 and student.resident_bytes == 110_000 * 3 * 64 * 64  # its images only


def test_out_of_memory_in_a_probe_halves_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path on a CPU: a probe step above batch 128 raises the error CUDA raises (injected), the probe halves
    the batch until one trains, then extrapolates the peak along the line through steps at 128 and 64."""
    data = json.loads(json.dumps(PAPER_LIKE))
    data["datasets"] = data["datasets"][:2]
    data["datasets"][0]["teacher"] = {"batch_size": 512}
    data["baselines"]["multi_head"] = False
    spec = from_dict(PipelineSpec, data)
    measured, stepped = [], []
    real_measure, real_step = Planner._measure_task, Planner._step_peak

    def measure(self: Planner, job, pctx, batch):  # type: ignore[no-untyped-def]
        measured.append(batch)
        if job.kind == "teacher" and job.dataset == "cifar100" and (batch is None or batch > 128):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_measure(self, job, pctx, batch)

    def step(self: Planner, job, pctx, batch):  # type: ignore[no-untyped-def]
        stepped.append(batch)
        return real_step(self, job, pctx, batch)

    monkeypatch.setattr(Planner, "_measure_task", measure)
    monkeypatch.setattr(Planner, "_step_peak", step)
    monkeypatch.setattr(Planner, "_fitting_batch", lambda self, job, pctx, full: (full, "", None))  # as on a GPU
    planner = Planner(spec, synthetic=True, steps=1)
    try:
        plan = planner.plan()
    finally:
        planner.close()
    assert measured[:3] == [None, 256, 128] and stepped == [128, 64]
    teacher = plan.stages[0]
    assert teacher.note == "measured at batch 128 of 512 (batch 256 ran out of memory on cpu); peak extrapolated"
    assert teacher.batch_size == 512 and teacher.images_per_s > 0 and teacher.peak_bytes >= teacher.resident_bytes
    assert plan.stages[1].note == ""


def test_probe_batch_measures_large_batches_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--probe-batch 16``: cifar100's teacher batch of 64 (a per-dataset override) and the multi-head baseline of
    its architecture, which trains with that recipe, are timed at 16, their peaks extrapolated along the line through
    steps at 16 and 8, and their fit warnings would name that override; batches of 16 and the joint teacher's 64 are
    measured whole. The probe holds just enough images for the largest measured batch (the joint teacher's 64 drawn
    from two datasets: 32 each, for the warm-up and the timed step)."""
    data = json.loads(json.dumps(PAPER_LIKE))
    data["datasets"] = data["datasets"][:2]
    data["datasets"][0]["teacher"] = {"batch_size": 64}
    spec = from_dict(PipelineSpec, data)
    measured, stepped, probes = [], [], []
    real_measure, real_step, real_load = Planner._measure_task, Planner._step_peak, Planner._load_data

    def measure(self: Planner, job, pctx, batch):  # type: ignore[no-untyped-def]
        measured.append((job.kind, batch))
        return real_measure(self, job, pctx, batch)

    def step(self: Planner, job, pctx, batch):  # type: ignore[no-untyped-def]
        stepped.append((job.kind, batch))
        return real_step(self, job, pctx, batch)

    monkeypatch.setattr(Planner, "_measure_task", measure)
    monkeypatch.setattr(Planner, "_step_peak", step)
    monkeypatch.setattr(Planner, "_load_data", lambda self: probes.append(real_load(self)) or probes[-1])
    planner = Planner(spec, synthetic=True, steps=1, probe_batch=16)
    try:
        plan = planner.plan()
    finally:
        planner.close()
    assert [len(p.train) for p in probes[0][1].values()] == [2 * 32, 2 * 32]
    assert [s.label for s in plan.stages] == ["teacher cifar100", "teacher tiny", "multi_head test_resnet (cifar100)",
                                              "multi_head test_efficientnet (tiny)", "joint teacher L2",
                                              "student cifar100 L2", "student tiny L2"]
    assert measured == [("teacher", 16), ("teacher", None), ("baseline", 16), ("baseline", None), ("joint", None),
                        ("student", None), ("student", None)]
    cut = "measured at batch 16 of 64 (--probe-batch 16); peak extrapolated"
    assert [s.note for s in plan.stages] == [cut, "", cut, "", "", "", ""]
    assert [s.batch_size for s in plan.stages] == [64, 16, 64, 16, 64, 16, 16]
    assert [s.batch_field for s in plan.stages[:4]] == ["datasets.cifar100.teacher.batch_size", "teacher.batch_size",
                                                        "datasets.cifar100.teacher.batch_size", "teacher.batch_size"]
    # a pilot at 1/16 of each measured batch (a CPU checks the fit first), then the line of each cut: 16 and 8
    assert stepped == [("teacher", 2), ("teacher", 16), ("teacher", 8), ("teacher", 2), ("baseline", 2),
                       ("baseline", 16), ("baseline", 8), ("baseline", 2), ("joint", 4), ("student", 2), ("student", 2)]
    for s in plan.stages:
        assert s.images_per_s > 0 and s.peak_bytes >= s.resident_bytes
    with pytest.raises(SpecError, match=r"^--probe-batch: must be >= 2 \(batch norm trains on two or more samples\), "
                                        r"got 1$"):
        Planner(spec, synthetic=True, probe_batch=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_in_a_probe_is_measured_at_half_the_batch() -> None:
    """On a GPU capped to 2 GiB, a teacher batch of 2048 at 224 px (test_resnet: about 16 MB of activations per
    image in float32) runs out of memory: the probe halves it until a batch trains, and the plan still comes back, with
    the peak extrapolated to 2048 and a warning naming the batch field. (Extraction at 512 images peaks well under the
    cap.)"""
    data = json.loads(json.dumps(PAPER_LIKE))
    data["datasets"] = data["datasets"][:2]
    data["datasets"][0]["model"]["input_size"] = 224
    data["datasets"][0]["teacher"] = {"batch_size": 2048}
    data["baselines"]["multi_head"] = False
    data["device"] = "cuda"
    spec = from_dict(PipelineSpec, data)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(2 * 2**30 / total)
    try:
        planner = Planner(spec, synthetic=True, steps=1)
        try:
            plan = planner.plan()
        finally:
            planner.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    teacher = plan.stages[0]
    assert re.match(r"measured at batch \d+ of 2048 \(batch \d+ ran out of memory on cuda\S*\); peak extrapolated$",
                    teacher.note), teacher.note
    assert teacher.batch_size == 2048 and teacher.peak_bytes > 2 * 2**30
    assert "lower datasets.cifar100.teacher.batch_size to " in fit_warning(teacher, 2 * 2**30, "cuda")


def test_sigterm_removes_the_probe_store(tmp_path: Path) -> None:
    """A plan stopped with SIGTERM exits 143 and leaves no throwaway probe store behind in the temp dir."""
    path = tmp_path / "paper_like.yaml"
    path.write_text(yaml.safe_dump(PAPER_LIKE))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mlfd.cli", "plan", str(path), "--synthetic"],
                            env={**ENV, "TMPDIR": str(tmp)}, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp.glob("mlfd-plan-*/store/teacher/*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(tmp.glob("mlfd-plan-*")), "the plan never started its probe"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().endswith("mlfd plan: stopped by SIGTERM")
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("argv", [["--synthetic"], []])
def test_a_malformed_file_fails_before_torch_is_imported(argv: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [1\n")
    code = ("import sys; from mlfd.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "plan", str(bad), *argv], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"mlfd: error: {bad}: malformed YAML") and proc.stderr.count("\n") == 1
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("argv, message", [
    (["--set", "teacher.batch_size=0"], "pipeline.teacher.batch_size: must be >= 1, got 0"),
    (["--synthetic", "--count", "mnist=size:3"],
     "--count mnist=size:3: unknown key 'size'; allowed: train, val, test, classes, image_size, channels"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--count", "mnist=train:10"], "--count: image counts are for --synthetic; a real run counts its data"),
    (["--probe-batch", "1"], "--probe-batch: must be >= 2 (batch norm trains on two or more samples), got 1"),
    (["--memory", "24 parsecs"], "--memory: '24 parsecs' is not a size; allowed: a positive number with an optional "
                                 "unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB"),
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(DEFAULT), *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"mlfd: error: {message}\n"


@pytest.mark.slow
def test_synthetic_plan_of_a_paper_shaped_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No data read: every stage measured on random images of the declared sizes, full-size counts and cache bytes."""
    path = tmp_path / "paper_like.yaml"
    path.write_text(yaml.safe_dump(PAPER_LIKE))
    assert main(["plan", str(path), "--synthetic", "--steps", "2", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [(d["name"], d["train"], d["val"], d["test"]) for d in plan["data"]] == [
        ("cifar100", 45_000, 5_000, 10_000), ("tiny", 90_000, 10_000, 10_000), ("sketch", 36_640, 4_071, 10_178)]
    counts = {d["name"]: d for d in plan["data"]}
    # level-2 maps of the tiny models at 32 px: channels from the model, 1x1 maps
    shapes = {c["teacher"]: tuple(c["shape"]) for c in plan["caches"]}
    assert shapes == {"cifar100": (96, 1, 1), "tiny": (256, 1, 1), "sketch": (64, 1, 1)}
    assert len(plan["caches"]) == 9
    for c in plan["caches"]:
        for split in ("train", "val", "test"):
            assert c["bytes"][split] == counts[c["data"]][split] * math.prod(c["shape"]) * 2
        assert c["images_per_s"] > 0 and c["seconds"] > 0 and not c["stored"]
    assert plan["cache_bytes_by_level"] == {"2": sum(c["bytes"]["train"] + c["bytes"]["val"] + c["bytes"]["test"]
                                                     for c in plan["caches"])}
    labels = [s["label"] for s in plan["stages"]]
    assert labels == ["teacher cifar100", "teacher tiny", "teacher sketch", "multi_head test_resnet (cifar100)",
                      "multi_head test_efficientnet (tiny)", "multi_head test_convnext (sketch)", "joint teacher L2",
                      "student cifar100 L2", "student tiny L2", "student sketch L2"]
    for s in plan["stages"]:
        assert s["images_per_s"] > 0 and s["eval_images_per_s"] > 0 and s["seconds"] > 0 and s["peak_bytes"] >= 0
    joint = plan["stages"][6]
    assert joint["images"] == 45_000 + 90_000 + 36_640 and joint["epochs"] == 3
    # cache_on_device: auto holds caches this small whole on the device
    assert joint["resident_bytes"] == plan["cache_bytes_by_level"]["2"]
    teacher_tiny = plan["stages"][1]
    assert teacher_tiny["resident_bytes"] == 110_000 * 3 * 64 * 64  # its images, held whole
    assert teacher_tiny["seconds"] == pytest.approx(
        90_000 * 2 / teacher_tiny["images_per_s"] + (2 * 10_000 + 20_000) / teacher_tiny["eval_images_per_s"])
    assert plan["total_seconds"] == pytest.approx(sum(s["seconds"] for s in plan["stages"])
                                                  + sum(c["seconds"] for c in plan["caches"]))
    assert "cache cifar100->tiny L2" in out and "estimated time of what is not stored" in out


@pytest.mark.slow
def test_planned_cache_bytes_match_what_the_cache_stage_writes(tmp_path: Path) -> None:
    """On real data (the offline pipeline, smoke sizes): the planned bytes against the Arrow files the real cache
    build writes, within 5%; afterwards the plan sees the teachers and caches as stored."""
    spec = smoke_pipeline(load_pipeline(DEFAULT, ["teacher.epochs=1", "baselines.multi_head=false",
                                                  "baselines.joint_head=false", "controls.own_teacher=false",
                                                  "controls.no_kd=false", "fusion_levels=[1, 2]"]))
    store = tmp_path / "store"
    plan = make_plan(spec, store=store, steps=1)
    assert len(plan.caches) == 18 and not any(c.stored for c in plan.caches)
    ctx = Context(spec=spec, store=ArtifactStore(store), progress=False)
    for c in plan.caches:
        art = build_cache(ctx, c.teacher, c.data, c.level)
        assert art.key == c.key
        written = sum(art.file(f"{s}.arrow").stat().st_size for s in ("train", "val", "test"))
        assert written == pytest.approx(c.total_bytes, rel=0.05), c.label
        assert c.total_bytes <= written  # the files hold the planned values plus a small header
    for name in ("mnist", "fashion", "digits"):
        train_teacher(ctx, name)
    again = make_plan(spec, store=store, steps=1)
    assert all(c.stored for c in again.caches)
    assert [s.stored for s in again.stages] == [True] * 3 + [False] * (len(again.stages) - 3)
    # only what is not stored counts (measured speeds differ from run to run: no comparison across the two plans)
    assert again.total_seconds == pytest.approx(sum(s.seconds for s in again.stages if not s.stored))
    assert plan.total_seconds == pytest.approx(sum(s.seconds for s in plan.stages) + sum(c.seconds for c in plan.caches))
    table = plan_table(again)
    assert "stored" in table
    write_json(again, tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["stages"][0]["stored"] is True
