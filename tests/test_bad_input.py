"""Bad pipeline input through the real CLI: exit code 2, one line `mlfd: error: ...` naming the field or file, and
nothing computed (design.md section 7).

Cases mutate the offline default pipeline and write it to a temp file. Most run ``mlfd.cli.main`` in-process (fast);
the ``subprocess`` ones run ``python -m mlfd.cli`` to check the real exit code and stderr.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import ENV, ROOT

from mlfd import cli  # noqa: E402
from mlfd.config import read_yaml, set_path  # noqa: E402

PIPELINE = ROOT / "pipelines" / "offline_default.yaml"
BASE = read_yaml(PIPELINE)


@dataclass
class Case:
    """One bad input.

    ``pipeline`` is a function ``(data, dirs) -> data`` mutating a copy of the default pipeline dict, or a string
    (or bytes) written verbatim as the pipeline file, or None for a pipeline path that does not exist. ``expect``
    (each item, if a list) must appear in the error line.
    """

    id: str
    pipeline: Callable[[dict, dict], dict] | str | bytes | None
    expect: str | list[str]
    args: list[str] = field(default_factory=list)
    subprocess: bool = False
    xfail: str | None = None


def setp(key: str, value: Any) -> Callable[[dict, dict], dict]:
    """A mutation setting ``key`` (``--set`` syntax) to ``value``."""

    def mutate(data: dict, dirs: dict) -> dict:
        set_path(data, key, value)
        return data

    return mutate


def first_dataset(entry: Callable[[dict], dict]) -> Callable[[dict, dict], dict]:
    """A mutation replacing datasets[0] with ``entry(dirs)`` (index 0 so the bad one is read first: fast)."""

    def mutate(data: dict, dirs: dict) -> dict:
        data["datasets"][0] = {**entry(dirs), "model": {"arch": "test_resnet", "input_size": 32}}
        return data

    return mutate


def drop_key(key: str) -> Callable[[dict, dict], dict]:
    def mutate(data: dict, dirs: dict) -> dict:
        *parents, last = key.split(".")
        cur = data
        for p in parents:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        del cur[last]
        return data

    return mutate


CASES = [
    # ---- the file itself ----
    Case("malformed-yaml", "name: x\ndatasets: [\n  {name: a\n", ["p.yaml", "malformed YAML", "line"],
         subprocess=True),
    Case("tab-indent", "name: x\ndatasets:\n\t- a\n", ["p.yaml", "malformed YAML"]),
    Case("top-level-list", "- name: a\n- name: b\n", ["p.yaml", "expected a YAML mapping at top level, got list"],
         subprocess=True),
    Case("top-level-scalar", "just a string\n", "expected a YAML mapping at top level, got str"),
    Case("empty-file", "", "expected a YAML mapping at top level, got NoneType"),
    Case("binary-file", b"\xff\xfe\x00\x01name", ["p.yaml", "cannot read as UTF-8"]),
    Case("python-tag", "name: !!python/object/apply:os.system ['true']\n", ["p.yaml", "malformed YAML"]),
    Case("duplicate-key", "name: a\nname: b\n", ["p.yaml", "duplicate key 'name'"]),
    Case("missing-file", None, ["missing.yaml", "file not found"], subprocess=True),
    # ---- unknown keys at every level ----
    Case("unknown-top", setp("epochs", 3), ["pipeline.epochs", "unknown field", "allowed"]),
    Case("unknown-dataset-key", setp("datasets.1.colour", "red"), "pipeline.datasets[1].colour: unknown field"),
    Case("unknown-model-key", setp("datasets.mnist.model.depth", 18), "pipeline.datasets[0].model.depth: unknown"),
    Case("unknown-student-model-key", setp("datasets.mnist.student_model", {"arch": "test_vit", "width": 3}),
         "pipeline.datasets[0].student_model.width: unknown field"),
    Case("unknown-teacher-key", setp("teacher.momentum", 0.9), "pipeline.teacher.momentum: unknown field"),
    Case("unknown-augment-key", setp("teacher.augment.mixup", 0.2), "pipeline.teacher.augment.mixup: unknown"),
    Case("unknown-joint-key", setp("joint.fusion", "concat"), "pipeline.joint.fusion: unknown field"),
    Case("unknown-joint-recipe-key", setp("joint.recipe.betas", [0.9]), "pipeline.joint.recipe.betas: unknown"),
    Case("unknown-student-key", setp("student.gamma", 1.0), "pipeline.student.gamma: unknown field"),
    Case("unknown-student-augment-key", setp("student.recipe.augment.cutmix", True),
         "pipeline.student.recipe.augment.cutmix: unknown field"),
    Case("unknown-baselines-key", setp("baselines.shared", True), "pipeline.baselines.shared: unknown field"),
    Case("unknown-baselines-recipe-key", setp("baselines.recipe", {"lr": 0.1, "nesterov": True}),
         "pipeline.baselines.recipe.nesterov: unknown field"),
    Case("unknown-controls-key", setp("controls.random_teacher", True), "pipeline.controls.random_teacher: unknown"),
    Case("unknown-source-option", setp("datasets.mnist.options", {"test_fraction": 0.2, "colour": 1}),
         ["datasets.mnist.options.colour", "unknown option", "allowed"]),
    # ---- wrong types ----
    Case("string-lr", setp("teacher.lr", "fast"), "pipeline.teacher.lr: expected a number, got 'fast'"),
    Case("list-epochs", setp("student.recipe.epochs", [1, 2]), "pipeline.student.recipe.epochs: expected an integer"),
    Case("bool-batch-size", setp("joint.recipe.batch_size", True), "pipeline.joint.recipe.batch_size: expected an "
                                                                   "integer, got True"),
    Case("float-epochs", setp("teacher.epochs", 2.5), "pipeline.teacher.epochs: expected an integer, got 2.5"),
    Case("string-flip", setp("teacher.augment.flip", "sometimes"), "pipeline.teacher.augment.flip: expected true/f"),
    Case("datasets-mapping", setp("datasets", {"mnist": {"source": "mnist5k"}}), "pipeline.datasets: expected a list"),
    Case("dataset-string", setp("datasets.0", "mnist"), "pipeline.datasets[0]: expected a mapping, got 'mnist'"),
    Case("fusion-levels-string", setp("fusion_levels", "1,2"), "pipeline.fusion_levels: expected a list"),
    Case("bad-optimizer", setp("teacher.optimizer", "lion"), ["pipeline.teacher.optimizer", "allowed: adamw"]),
    Case("bad-variant", setp("joint.variant", "all"), ["pipeline.joint.variant", "allowed: union, per_target"]),
    Case("options-list", setp("datasets.digits.options", ["root"]), "pipeline.datasets[2].options: expected a mapp"),
    # ---- out-of-range values ----
    Case("negative-lr", setp("teacher.lr", -0.1), "pipeline.teacher.lr: must be > 0, got -0.1"),
    Case("zero-joint-lr", setp("joint.recipe.lr", 0), "pipeline.joint.recipe.lr: must be > 0"),
    Case("dropout-1", setp("joint.dropout", 1.0), "pipeline.joint.dropout: must be in [0, 1), got 1.0"),
    Case("dropout-negative", setp("joint.dropout", -0.1), "pipeline.joint.dropout: must be in [0, 1)"),
    Case("fusion-level-5", setp("fusion_levels", [1, 5]), ["pipeline.fusion_levels", "1..4", "got 5"]),
    Case("fusion-level-0", setp("fusion_levels", [0]), ["pipeline.fusion_levels", "1..4", "got 0"]),
    Case("fusion-level-bool", setp("fusion_levels", [True]), ["pipeline.fusion_levels", "got True"]),
    Case("fusion-levels-empty", setp("fusion_levels", []), "pipeline.fusion_levels: needs at least one level"),
    Case("beta-above-top-level", setp("student.betas", {1: 0.2, 3: 0.5}),
         ["pipeline.student.betas.3", "above the highest fusion level 2"]),
    Case("beta-level-9", setp("student.betas", {9: 0.5}), ["pipeline.student.betas.9", "1..4"]),
    Case("beta-negative", setp("student.betas", {1: -0.5}), "pipeline.student.betas.1: must be a number >= 0"),
    Case("temperature-0", setp("student.temperature", 0), "pipeline.student.temperature: must be > 0, got 0"),
    Case("temperature-negative", setp("student.temperature", -2.0), "pipeline.student.temperature: must be > 0"),
    Case("val-fraction-1.5", setp("datasets.fashion.val_fraction", 1.5),
         "pipeline.datasets[1].val_fraction: must be in (0, 1), got 1.5"),
    Case("epochs-0", setp("teacher.epochs", 0), "pipeline.teacher.epochs: must be >= 1, got 0"),
    Case("student-epochs-0", setp("student.recipe.epochs", 0), "pipeline.student.recipe.epochs: must be >= 1"),
    Case("max-train-0", setp("datasets.digits.max_train", 0), "pipeline.datasets[2].max_train: must be >= 1"),
    Case("input-size-4", setp("datasets.digits.model.input_size", 4), "pipeline.datasets[2].model.input_size"),
    Case("label-smoothing-1", setp("student.recipe.label_smoothing", 1), "pipeline.student.recipe.label_smoothing"),
    Case("crop-padding-negative", setp("student.recipe.augment.crop_padding", -1),
         "pipeline.student.recipe.augment.crop_padding: must be >= 0"),
    Case("test-fraction-1", setp("datasets.mnist.options", {"test_fraction": 1.0}),
         "datasets.mnist.options.test_fraction: must be a number in (0, 1)"),
    # ---- models and sources ----
    Case("unknown-timm-model", setp("datasets.fashion.model.arch", "resnet_9000"),
         ["pipeline.datasets[1].model.arch", "unknown timm model 'resnet_9000'"], subprocess=True),
    Case("unknown-student-arch", setp("datasets.digits.student_model", {"arch": "tset_resnet"}),
         ["pipeline.datasets[2].student_model.arch", "unknown timm model", "test_resnet"]),
    Case("unknown-baseline-arch", setp("baselines.model", {"arch": "vit_gigantic_9000"}),
         "pipeline.baselines.model.arch: unknown timm model"),
    Case("missing-checkpoint", setp("datasets.mnist.model.checkpoint", "/nonexistent/teacher.pt"),
         ["pipeline.datasets[0].model.checkpoint", "file not found", "/nonexistent/teacher.pt"]),
    Case("unknown-source", setp("datasets.digits.source", "imagenet"),
         ["pipeline.datasets[2].source", "unknown source 'imagenet'", "allowed", "folder"]),
    Case("unknown-torchvision-dataset", first_dataset(lambda d: {"name": "tv", "source": "torchvision",
                                                                 "options": {"name": "NoSuchSet", "download": False}}),
         ["datasets.tv.options.name", "unknown torchvision dataset 'NoSuchSet'"]),
    Case("unknown-class", setp("datasets.mnist.classes", [1, 42]), ["datasets.mnist.classes", "unknown class 42"]),
    # ---- missing or unreadable data ----
    Case("fashion-missing-root", first_dataset(lambda d: {"name": "fashion2", "source": "fashion_mnist",
                                                          "options": {"root": "/nonexistent"}}),
         ["datasets.fashion2.options.root", "directory not found: /nonexistent"]),
    Case("fashion-root-without-files", first_dataset(lambda d: {"name": "f", "source": "fashion_mnist",
                                                                "options": {"root": str(d["empty"])}}),
         ["datasets.f.options.root", "train-images-idx3-ubyte"]),
    Case("folder-missing-root", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                         "options": {"root": str(d["empty"] / "nope")}}),
         ["datasets.imgs.options.root", "directory not found", "nope"]),
    Case("folder-root-missing-option", first_dataset(lambda d: {"name": "imgs", "source": "folder"}),
         ["datasets.imgs.options.root", "required option"]),
    Case("folder-empty", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                  "options": {"root": str(d["empty"])}}),
         ["datasets.imgs.options.root", "no class folders"]),
    Case("folder-empty-class", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                        "options": {"root": str(d["empty_class"])}}),
         "empty_class/b: class folder has no images"),
    Case("folder-non-image-file", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                           "options": {"root": str(d["non_image"])}}),
         ["non_image/a/notes.txt: not a readable image"]),
    Case("folder-truncated-png", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                          "options": {"root": str(d["truncated"])}}),
         ["broken.png", "not a readable image"]),
    Case("folder-stream-not-bool", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                           "options": {"root": str(d["good"]), "stream": "yes"}}),
         ["datasets.imgs.options.stream", "expected true/false, got 'yes'"]),
    Case("folder-stream-workers-negative", first_dataset(lambda d: {"name": "imgs", "source": "folder", "options": {
        "root": str(d["good"]), "stream": True, "workers": -1}}),
         ["datasets.imgs.options.workers", "expected an integer >= 0, got -1"]),
    Case("folder-stream-non-image-file", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                                  "options": {"root": str(d["non_image"]),
                                                                              "stream": True}}),
         ["non_image/a/notes.txt: not a readable image"]),
    Case("folder-stream-truncated-png", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                                 "options": {"root": str(d["truncated"]),
                                                                             "stream": True, "workers": 2}}),
         ["broken.png", "not a readable image"]),
    Case("folder-bad-mode", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                     "options": {"root": str(d["good"]), "mode": "CMYK"}}),
         ["datasets.imgs.options.mode", "allowed: L, RGB"]),
    Case("folder-unknown-layout", first_dataset(lambda d: {"name": "imgs", "source": "folder",
                                                          "options": {"root": str(d["good"]), "layout": "voc"}}),
         ["datasets.imgs.options.layout", "got 'voc'; allowed: imagefolder, tinyimagenet"]),
    Case("tinyimagenet-missing-annotations", first_dataset(lambda d: {"name": "tiny", "source": "folder", "options": {
        "root": str(d["tiny_no_annotations"]), "layout": "tinyimagenet"}}),
         ["datasets.tiny.options.root", "tiny_no_annotations/val/val_annotations.txt not found",
          "layout 'tinyimagenet' expects"]),
    Case("tinyimagenet-val-unknown-wnid", first_dataset(lambda d: {"name": "tiny", "source": "folder", "options": {
        "root": str(d["tiny_unknown_wnid"]), "layout": "tinyimagenet", "stream": True}}),
         ["tiny_unknown_wnid/val/val_annotations.txt:2", "class 'n99999999' of val_1.JPEG is not a class folder"]),
    Case("tinyimagenet-as-imagefolder", first_dataset(lambda d: {"name": "tiny", "source": "folder",
                                                                 "options": {"root": str(d["tiny_unknown_wnid"])}}),
         ["tiny_unknown_wnid/val/images", "class 'images' is not in", "set layout: tinyimagenet"]),
    Case("parquet-missing-columns", first_dataset(lambda d: {"name": "tab", "source": "parquet",
                                                             "options": {"path": str(d["parquet"])}}),
         ["datasets.tab.options.image_column", "column 'image' not in", "table.parquet", "img"]),
    Case("parquet-missing-label-column", first_dataset(lambda d: {"name": "tab", "source": "parquet", "options": {
        "path": str(d["parquet"]), "image_column": "img", "label_column": "target"}}),
         ["datasets.tab.options.label_column", "column 'target' not in"]),
    Case("parquet-missing-file", first_dataset(lambda d: {"name": "tab", "source": "parquet",
                                                          "options": {"path": str(d["empty"] / "x.parquet")}}),
         ["datasets.tab.options.path", "not found", "x.parquet"]),
    Case("parquet-not-a-table", first_dataset(lambda d: {"name": "tab", "source": "parquet",
                                                         "options": {"path": str(d["not_parquet"])}}),
         ["fake.parquet", "cannot read as Parquet"]),
    # ---- structure ----
    Case("one-dataset", lambda data, d: {**data, "datasets": data["datasets"][:1]},
         ["pipeline.datasets", "needs at least 2 datasets, got 1"]),
    Case("no-datasets", setp("datasets", []), "pipeline.datasets: needs at least 2 datasets, got 0"),
    Case("missing-datasets", drop_key("datasets"), "pipeline.datasets: required field is missing"),
    Case("duplicate-names", setp("datasets.2.name", "mnist"), ["pipeline.datasets", "must be unique", "'mnist'"]),
    Case("missing-dataset-name", drop_key("datasets.1.name"), "pipeline.datasets[1].name: required field is missing"),
    Case("bad-dataset-name", setp("datasets.1.name", "my data"), "pipeline.datasets[1].name: must be a non-empty"),
    Case("missing-source", drop_key("datasets.2.source"), "pipeline.datasets[2].source: required field is missing"),
    Case("unknown-only-student", setp("only_students", ["cifar"]), ["pipeline.only_students", "unknown dataset"]),
    Case("newline-in-key", setp("bad\nkey", 1), "pipeline.bad key: unknown field"),
    # ---- --set ----
    Case("set-without-equals", lambda data, d: data, ["--set teacher.lr", "expected key=value"],
         args=["--set", "teacher.lr"], subprocess=True),
    Case("set-empty-key", lambda data, d: data, "--set =1: empty key", args=["--set", "=1"]),
    Case("set-unknown-list-item", lambda data, d: data, ["--set datasets.cifar.max_train", "no list item 'cifar'"],
         args=["--set", "datasets.cifar.max_train=10"]),
    Case("set-index-out-of-range", lambda data, d: data, "no list item '3' at datasets.3",
         args=["--set", "datasets.3.max_train=10"]),
    Case("set-into-scalar", lambda data, d: data, "--set teacher.lr.value: teacher.lr is not a mapping",
         args=["--set", "teacher.lr.value=1"]),
    Case("set-unknown-field", lambda data, d: data, "pipeline.student.recipe.nosuch: unknown field",
         args=["--set", "student.recipe.nosuch=1"]),
    Case("set-bad-value", lambda data, d: data, "pipeline.datasets[0].model.input_size: expected an integer",
         args=["--set", "datasets.mnist.model.input_size=big"]),
    Case("set-bad-arch", lambda data, d: data, ["pipeline.datasets[0].model.arch", "unknown timm model 'nope'"],
         args=["--set", "datasets.mnist.model.arch=nope"]),
]


def png(size: tuple[int, int] = (8, 8), value: int = 0) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny on-disk datasets, good and bad."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("data")
    out = {name: base / name for name in ("good", "empty", "empty_class", "non_image", "truncated")}
    for name in ("good", "empty_class", "non_image", "truncated"):
        for cls_name in ("a", "b"):
            (out[name] / cls_name).mkdir(parents=True)
            if not (name == "empty_class" and cls_name == "b"):
                for i in range(3):
                    (out[name] / cls_name / f"{i}.png").write_bytes(png(value=40 * i))
    out["empty"].mkdir()
    for name in ("tiny_no_annotations", "tiny_unknown_wnid"):  # TinyImageNet replicas, each malformed in one way
        out[name] = base / name
        for wnid in ("n01", "n02"):
            (out[name] / "train" / wnid / "images").mkdir(parents=True)
            (out[name] / "train" / wnid / "images" / f"{wnid}_0.JPEG").write_bytes(png(value=90))
        (out[name] / "val" / "images").mkdir(parents=True)
        for i in range(2):
            (out[name] / "val" / "images" / f"val_{i}.JPEG").write_bytes(png(value=10))
    (out["tiny_unknown_wnid"] / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn01\t0\t0\t7\t7\nval_1.JPEG\tn99999999\t0\t0\t7\t7\n")
    (out["non_image"] / "a" / "notes.txt").write_text("not an image\n")
    (out["truncated"] / "b" / "broken.png").write_bytes(png()[:30])
    out["parquet"] = base / "table.parquet"
    pq.write_table(pa.table({"img": [png(value=v) for v in (0, 100, 200, 50)], "y": [0, 1, 0, 1]}), out["parquet"])
    out["not_parquet"] = base / "fake.parquet"
    out["not_parquet"].write_text("this is not parquet\n")
    return out


def write_case(case: Case, tmp_path: Path, dirs: dict) -> Path:
    f = tmp_path / "p.yaml"
    if case.pipeline is None:
        return tmp_path / "missing.yaml"
    if isinstance(case.pipeline, bytes):
        f.write_bytes(case.pipeline)
        return f
    if isinstance(case.pipeline, str):
        f.write_text(case.pipeline)
        return f
    data = case.pipeline(copy.deepcopy(BASE), dirs)
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return f


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the pipeline runner: a bad input that got past the checks fails the test instead of training."""
    import mlfd.stages.pipeline

    calls: list = []

    def run_pipeline(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise AssertionError("bad input was not rejected: training started")

    monkeypatch.setattr(mlfd.stages.pipeline, "run_pipeline", run_pipeline)
    return calls


def check_error(case: Case, code: int, err: str, out_dir: Path) -> None:
    lines = err.strip("\n").splitlines()
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("mlfd: error: "), lines[0]
    for want in [case.expect] if isinstance(case.expect, str) else case.expect:
        assert want in lines[0], f"{want!r} not in {lines[0]!r}"
    assert not (out_dir / "results.parquet").exists()
    assert not (out_dir / "store").exists() or not any((out_dir / "store").iterdir())


def params() -> list:
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else []
        if c.subprocess:
            marks.append(pytest.mark.slow)  # a CLI subprocess
        out.append(pytest.param(c, id=("[sub] " if c.subprocess else "") + c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", params())
def test_bad_input(case: Case, tmp_path: Path, dirs: dict, no_training: list,
                   capsys: pytest.CaptureFixture) -> None:
    pipeline = write_case(case, tmp_path, dirs)
    out_dir = tmp_path / "out"
    argv = ["run", str(pipeline), "--out", str(out_dir), *case.args]
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "mlfd.cli", *argv], env=ENV, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        code, err = proc.returncode, proc.stderr
        assert proc.stdout == ""
    else:
        code = cli.main(argv)
        captured = capsys.readouterr()
        err = captured.err
        assert captured.out == ""
    check_error(case, code, err, out_dir)
    assert no_training == []
    assert not out_dir.exists()  # nothing at all was written


def test_good_folder_and_parquet_inputs_pass_the_checks(tmp_path: Path, dirs: dict, no_training: list) -> None:
    """The fixtures are bad only where meant: the good folder and a parquet with the right columns get to training."""
    data = copy.deepcopy(BASE)
    data["datasets"] = [
        {"name": "imgs", "source": "folder", "options": {"root": str(dirs["good"]), "mode": "L"}, "val_fraction": 0.2},
        {"name": "tab", "source": "parquet", "val_fraction": 0.3,
         "options": {"path": str(dirs["parquet"]), "image_column": "img", "label_column": "y", "test_fraction": 0.25}},
    ]
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["run", str(f), "--out", str(tmp_path / "out")])
    assert len(no_training) == 1


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_malformed_file_fails_before_torch_is_imported(command: str, tmp_path: Path) -> None:
    """A file that does not parse is refused before the heavy imports (torch, timm, Ray): in about a second."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [1\n")
    code = ("import sys; from mlfd.cli import main; rc = main([sys.argv[1], sys.argv[2], '--out', sys.argv[3]]); "
            "print(rc, sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, command, str(bad), str(tmp_path / "out")], env=ENV,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"mlfd: error: {bad}: malformed YAML") and proc.stderr.count("\n") == 1
