"""Typed specs: exact YAML round trips, every shipped YAML file loads, --set overrides, smoke caps, error paths."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

from mlfd import config  # noqa: E402
from mlfd.config import (  # noqa: E402
    SMOKE_EPOCHS, SMOKE_LIMITS, BaselineSpec, DatasetSpec, JointSpec, ModelSpec, PipelineSpec, RecipeSpec, SpecError,
    StudentSpec, apply_overrides, dump_yaml, from_dict, load_pipeline, parse_override, read_yaml, save_pipeline,
    set_path, smoke_pipeline, spec_hash, to_dict)

PIPELINE = ROOT / "pipelines" / "offline_default.yaml"


def repo_yaml_files() -> list[Path]:
    """Every YAML file of the repository (git's view: tracked plus untracked-not-ignored), else the known dirs."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if line and (ROOT / line).is_file()]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        files = [p for d in ("pipelines", "tune_jobs", "search_spaces") for p in (ROOT / d).glob("*.y*ml")]
    return sorted(files)


YAML_FILES = repo_yaml_files()


def in_dir(name: str) -> list[Path]:
    return [p for p in YAML_FILES if p.parent == ROOT / name]


@pytest.fixture(scope="module")
def default() -> PipelineSpec:
    return load_pipeline(PIPELINE)


@pytest.fixture(scope="module")
def raw() -> dict:
    return read_yaml(PIPELINE)


def load_text(tmp_path: Path, text: str, overrides: list[str] | None = None, name: str = "p.yaml") -> PipelineSpec:
    f = tmp_path / name
    f.write_text(text)
    return load_pipeline(f, overrides)


def load_dict(tmp_path: Path, data: dict, overrides: list[str] | None = None) -> PipelineSpec:
    return load_text(tmp_path, yaml.safe_dump(data, sort_keys=False), overrides)


# --------------------------------------------------------------------------------------------------------------------
# YAML round trip
# --------------------------------------------------------------------------------------------------------------------


def test_default_pipeline_round_trips_exactly(tmp_path: Path, default: PipelineSpec) -> None:
    text = dump_yaml(default)
    again = load_text(tmp_path, text)
    assert to_dict(again) == to_dict(default)
    assert again == default  # dataclass equality, field by field
    assert dump_yaml(again) == text  # dump(load(dump(x))) == dump(x)
    assert spec_hash(again) == spec_hash(default)
    assert from_dict(PipelineSpec, to_dict(default)) == default


def test_default_pipeline_keeps_every_value_of_the_file(default: PipelineSpec, raw: dict) -> None:
    """Loading drops nothing: every value written in the file is in the canonical dump."""
    full = to_dict(default)

    def check(written: object, loaded: object, where: str) -> None:
        if isinstance(written, dict):
            for k, v in written.items():
                check(v, loaded[k], f"{where}.{k}")
        elif isinstance(written, list) and written and isinstance(written[0], dict):
            for i, (w, ld) in enumerate(zip(written, loaded, strict=True)):
                check(w, ld, f"{where}[{i}]")
        else:
            assert loaded == written and type(loaded) is type(written) or (
                isinstance(written, int) and isinstance(loaded, float) and loaded == written), where

    check(raw, full, "pipeline")
    assert [d.name for d in default.datasets] == ["mnist", "fashion", "digits"]


def test_round_trip_of_a_spec_with_every_optional_part(tmp_path: Path, default: PipelineSpec) -> None:
    spec = copy.deepcopy(default)
    spec.fusion_levels = [1, 2, 3]
    spec.student.betas = {1: 0.5, 3: 0.25}
    spec.baselines = BaselineSpec(multi_head=False, model=ModelSpec(arch="test_vit", kwargs={"drop_rate": 0.1}),
                                  recipe=RecipeSpec(lr=1e-5, epochs=3))
    spec.datasets[0].student_model = ModelSpec(arch="test_convnext", input_size=28)
    spec.datasets[0].classes = [1, 7]
    spec.datasets[1].classes = ["Trouser", "Bag"]
    spec.datasets[2].options = {"test_fraction": 0.25}
    spec.datasets[2].name = "1e3"  # a string that looks like a number must stay a string
    spec.only_students = ["1e3"]
    spec.teacher.warmup_epochs = 0.5
    spec.name = "yes"  # a YAML 1.1 boolean word
    text = dump_yaml(spec)
    again = load_text(tmp_path, text)
    assert again == spec
    assert dump_yaml(again) == text
    assert again.student.betas == {1: 0.5, 3: 0.25}
    assert again.datasets[2].name == "1e3" and again.name == "yes"
    assert again.baselines.recipe.lr == 1e-5


def test_save_pipeline_writes_a_loadable_file(tmp_path: Path, default: PipelineSpec) -> None:
    out = tmp_path / "nested" / "pipeline.yaml"
    save_pipeline(default, out)
    assert load_pipeline(out) == default
    assert out.read_text() == dump_yaml(default)


def test_dumped_yaml_is_plain_safe_yaml(default: PipelineSpec) -> None:
    """No Python tags: the dump is readable by yaml.safe_load and by any other YAML tool."""
    text = dump_yaml(default)
    assert "!!" not in text
    assert yaml.safe_load(text) == to_dict(default)


def test_scientific_notation_is_a_number(tmp_path: Path, raw: dict) -> None:
    """PyYAML alone reads `1e-3` as a string; users mean a float."""
    text = PIPELINE.read_text().replace("lr: 0.002", "lr: 2e-3", 1)
    assert "lr: 2e-3" in text
    spec = load_text(tmp_path, text)
    assert spec.teacher.lr == 2e-3 and isinstance(spec.teacher.lr, float)
    assert load_pipeline(PIPELINE, ["student.recipe.lr=5E-4"]).student.recipe.lr == 5e-4


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    text = PIPELINE.read_text().replace("  epochs: 10\n", "  epochs: 10\n  epochs: 3\n", 1)
    with pytest.raises(SpecError, match=r"p\.yaml: malformed YAML \(line 28, column 3\): duplicate key 'epochs'"):
        load_text(tmp_path, text)


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path, raw: dict) -> None:
    text = PIPELINE.read_text().replace("teacher:\n", "teacher: &recipe\n", 1)
    text = text.replace("baselines: {multi_head: true, joint_head: true}",
                        "baselines:\n  recipe:\n    <<: *recipe\n    epochs: 3\n")
    spec = load_text(tmp_path, text)
    assert spec.baselines.recipe.epochs == 3 and spec.baselines.recipe.lr == spec.teacher.lr


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\ndatasets: []\n")
    with pytest.raises(SpecError, match=r"evil\.yaml: malformed YAML"):
        load_pipeline(f)


# --------------------------------------------------------------------------------------------------------------------
# Every YAML file of the repository loads with its loader
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_loads(path: Path) -> None:
    kind = path.parent.relative_to(ROOT).parts[0] if path.parent != ROOT else ""
    if kind == "pipelines":
        spec = load_pipeline(path)
        assert len(spec.datasets) >= 2
        text = dump_yaml(spec)
        assert dump_yaml(from_dict(PipelineSpec, yaml.safe_load(text))) == text
        smoke = smoke_pipeline(spec)
        smoke.validate()
    elif kind == "tune_jobs":
        from mlfd.search import load_job, resolve
        from mlfd.tune.spaces import load_space

        for smoke in (False, True):
            job, base = load_job(path, smoke=smoke)
            assert base == path.resolve().parent
            # What the job points at loads too, with the job's pipeline overrides applied.
            pipe = load_pipeline(resolve(base, job.pipeline), job.set)
            assert load_space(resolve(base, job.space)).params
            if job.studies:
                assert set(job.studies) <= {d.name for d in pipe.datasets}
        if read_yaml(path).get("smoke"):
            normal, _ = load_job(path)
            small, _ = load_job(path, smoke=True)
            assert small != normal
    elif kind == "search_spaces":
        from mlfd.tune.spaces import load_space

        space = load_space(path)
        assert space.params
    elif kind == "deploy":  # Kubernetes manifests hold several documents; test_cluster.py checks their commands
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs)
    else:  # a YAML file in a place no loader owns: it must at least be safe, valid YAML
        read_yaml(path)


def test_quickstart_smoke_is_small(tmp_path: Path) -> None:
    """--smoke runs the pipeline's smoke variant (as `mlfd run --smoke`) with the job's smoke block on top."""
    from mlfd.config import SMOKE_EPOCHS, SMOKE_LIMITS, PipelineSpec, from_dict
    from mlfd.search import load_job
    from mlfd.tune.launch import prepare

    job, _ = load_job(ROOT / "tune_jobs" / "quickstart.yaml", smoke=True)
    normal, _ = load_job(ROOT / "tune_jobs" / "quickstart.yaml")
    assert job.num_samples < normal.num_samples
    plan = prepare(str(ROOT / "tune_jobs" / "quickstart.yaml"), tmp_path, True, None)
    pipe = from_dict(PipelineSpec, plan.pipeline)
    assert pipe.teacher.epochs <= SMOKE_EPOCHS and pipe.student.recipe.epochs <= SMOKE_EPOCHS
    assert all(d.max_train is not None and d.max_train <= SMOKE_LIMITS["max_train"] for d in pipe.datasets)


# --------------------------------------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------------------------------------


def test_set_nested_keys(default: PipelineSpec) -> None:
    spec = load_pipeline(PIPELINE, ["student.recipe.lr=0.01", "joint.dropout=0.5", "teacher.augment.flip=true",
                                    "student.betas.2=0.7", "baselines.recipe.epochs=4"])
    assert spec.student.recipe.lr == 0.01 and spec.joint.dropout == 0.5 and spec.teacher.augment.flip is True
    assert spec.student.betas == {2: 0.7}
    assert spec.baselines.recipe == RecipeSpec(epochs=4)  # created from defaults
    assert spec.teacher.lr == default.teacher.lr  # nothing else moved
    assert spec.joint.recipe == default.joint.recipe


def test_set_list_items_by_name_and_index(default: PipelineSpec) -> None:
    spec = load_pipeline(PIPELINE, ["datasets.mnist.model.arch=test_vit", "datasets.1.max_train=123",
                                    "datasets.-1.val_fraction=0.25", "datasets.digits.model.input_size=48"])
    assert spec.datasets[0].model.arch == "test_vit"
    assert spec.datasets[1].max_train == 123
    assert spec.datasets[2].val_fraction == 0.25 and spec.datasets[2].model.input_size == 48
    assert [d.model.arch for d in spec.datasets[1:]] == [d.model.arch for d in default.datasets[1:]]


def test_set_whole_items_and_lists() -> None:
    spec = load_pipeline(PIPELINE, ["fusion_levels=[1, 2, 3]", "datasets.fashion.classes=[0, 1, 2]",
                                    "datasets.digits.student_model={arch: test_resnet, input_size: 16}",
                                    "datasets.2={name: d2, source: sklearn_digits}"])
    assert spec.fusion_levels == [1, 2, 3]
    assert spec.datasets[1].classes == [0, 1, 2]
    assert spec.datasets[2] == DatasetSpec(name="d2", source="sklearn_digits")


@pytest.mark.parametrize("item, key, value", [
    ("teacher.epochs=3", "teacher.epochs", 3),
    ("teacher.lr=0.5", "teacher.lr", 0.5),
    ("teacher.lr=1e-4", "teacher.lr", 1e-4),
    ("teacher.compile=yes", "teacher.compile", True),
    ("teacher.compile=false", "teacher.compile", False),
    ("datasets.0.max_train=null", "datasets.0.max_train", None),
    ("datasets.0.max_train=~", "datasets.0.max_train", None),
    ("name=my run", "name", "my run"),
    ("name='42'", "name", "42"),
    ("name=a=b", "name", "a=b"),
    ("name=", "name", ""),
    ("name=[unclosed", "name", "[unclosed"),  # not YAML: kept as the raw string
    (" teacher.epochs = 5", "teacher.epochs", 5),
    ("datasets.0.options={root: /x, mode: L}", "datasets.0.options", {"root": "/x", "mode": "L"}),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_set_values_are_yaml_typed(item: str, key: str, value: object) -> None:
    k, v = parse_override(item)
    assert k == key
    assert v == value and type(v) is type(value)


def test_set_does_not_mutate_its_input(raw: dict) -> None:
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, ["teacher.lr=0.5", "datasets.mnist.max_train=5"])
    assert raw == before
    assert out["teacher"]["lr"] == 0.5 and out["datasets"][0]["max_train"] == 5


def test_later_set_wins() -> None:
    assert load_pipeline(PIPELINE, ["teacher.epochs=3", "teacher.epochs=4"]).teacher.epochs == 4


@pytest.mark.parametrize("item, match", [
    ("teacher.lr", r"--set teacher\.lr: expected key=value"),
    ("=3", r"--set =3: empty key"),
    ("datasets.nosuch.max_train=1", r"--set datasets\.nosuch\.max_train: no list item 'nosuch' at datasets\.nosuch"),
    ("datasets.7.max_train=1", r"no list item '7' at datasets\.7"),
    ("datasets.-4.max_train=1", r"no list item '-4'"),
    ("teacher.lr.x=1", r"--set teacher\.lr\.x: teacher\.lr is not a mapping"),
    ("teacher.nosuch=1", r"pipeline\.teacher\.nosuch: unknown field; allowed: \[.*'lr'"),
    ("datasets.mnist.model.nosuch=1", r"pipeline\.datasets\[0\]\.model\.nosuch: unknown field"),
    ("nosuch.deep.key=1", r"pipeline\.nosuch: unknown field"),
    ("teacher.lr=fast", r"pipeline\.teacher\.lr: expected a number, got 'fast'"),
    ("teacher.epochs=2.5", r"pipeline\.teacher\.epochs: expected an integer, got 2\.5"),
], ids=lambda v: v if "\\" not in v else None)
def test_bad_set(item: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        load_pipeline(PIPELINE, [item])


def test_set_path_on_plain_dicts() -> None:
    data: dict = {"a": [{"name": "x", "v": 1}, {"name": "y", "v": 2}]}
    set_path(data, "a.y.v", 3)
    set_path(data, "a.0.w.z", 4)
    set_path(data, "b.c", 5)
    assert data == {"a": [{"name": "x", "v": 1, "w": {"z": 4}}, {"name": "y", "v": 3}], "b": {"c": 5}}


# --------------------------------------------------------------------------------------------------------------------
# smoke_pipeline
# --------------------------------------------------------------------------------------------------------------------


def test_smoke_caps_subsets_and_epochs(default: PipelineSpec) -> None:
    joint_cap = getattr(config, "SMOKE_JOINT_EPOCHS", SMOKE_EPOCHS)  # the joint teacher may get its own cap
    spec = copy.deepcopy(default)
    spec.datasets[2].max_train = 100  # below the cap: kept
    spec.teacher.epochs = 1  # below the cap: kept
    spec.baselines.recipe = RecipeSpec(epochs=50)
    spec.joint.recipe.epochs = 50
    before = copy.deepcopy(spec)
    smoke = smoke_pipeline(spec)
    assert spec == before  # the input is not modified
    for d, orig in zip(smoke.datasets, spec.datasets, strict=True):
        for k, cap in SMOKE_LIMITS.items():
            v = getattr(d, k)
            assert v is not None and v <= cap
            assert v == min(getattr(orig, k) or cap, cap)
    assert smoke.datasets[2].max_train == 100
    assert smoke.datasets[0].max_train == SMOKE_LIMITS["max_train"]  # 2000 capped
    assert smoke.datasets[0].max_test == SMOKE_LIMITS["max_test"]  # None capped
    assert smoke.teacher.epochs == 1
    assert smoke.student.recipe.epochs == SMOKE_EPOCHS and smoke.baselines.recipe.epochs == SMOKE_EPOCHS
    assert smoke.joint.recipe.epochs == joint_cap
    for r, orig in ((smoke.teacher, spec.teacher), (smoke.joint.recipe, spec.joint.recipe),
                    (smoke.student.recipe, spec.student.recipe), (smoke.baselines.recipe, spec.baselines.recipe)):
        assert r.epochs <= orig.epochs and r.batch_size <= orig.batch_size
        assert (r.lr, r.optimizer, r.seed, r.augment) == (orig.lr, orig.optimizer, orig.seed, orig.augment)
    # Same structure: only sizes, batches and epochs change.
    assert [d.name for d in smoke.datasets] == [d.name for d in spec.datasets]
    assert smoke.fusion_levels == spec.fusion_levels and smoke.student.alpha == spec.student.alpha
    assert [d.model for d in smoke.datasets] == [d.model for d in spec.datasets]
    assert smoke.joint.dropout == spec.joint.dropout and smoke.controls == spec.controls
    smoke.validate()
    assert smoke_pipeline(smoke) == smoke  # idempotent


def test_smoke_without_baseline_recipe(default: PipelineSpec) -> None:
    smoke = smoke_pipeline(default)
    assert smoke.baselines.recipe is None
    assert smoke.teacher.epochs == min(default.teacher.epochs, SMOKE_EPOCHS)
    assert all(d.max_train <= SMOKE_LIMITS["max_train"] for d in smoke.datasets)


# --------------------------------------------------------------------------------------------------------------------
# Validation messages name the field path
# --------------------------------------------------------------------------------------------------------------------


def _mutate(data: dict, key: str, value: object) -> dict:
    out = copy.deepcopy(data)
    set_path(out, key, value)
    return out


@pytest.mark.parametrize("key, value, match", [
    ("teacher.lr", 0, r"^pipeline\.teacher\.lr: must be > 0, got 0"),
    ("teacher.weight_decay", -1, r"^pipeline\.teacher\.weight_decay: must be >= 0"),
    ("teacher.label_smoothing", 1.0, r"^pipeline\.teacher\.label_smoothing: must be in \[0, 1\)"),
    ("teacher.grad_accum", 0, r"^pipeline\.teacher\.grad_accum: must be >= 1"),
    ("teacher.augment.crop_padding", -2, r"^pipeline\.teacher\.augment\.crop_padding: must be >= 0"),
    ("teacher.optimizer", "lion", r"^pipeline\.teacher\.optimizer: got 'lion'; allowed: adamw, adam, sgd"),
    ("teacher.amp", True, r"^pipeline\.teacher\.amp: got True; allowed: auto, bf16, fp16, off"),
    ("joint.recipe.batch_size", 0, r"^pipeline\.joint\.recipe\.batch_size: must be >= 1"),
    ("joint.variant", "both", r"^pipeline\.joint\.variant: got 'both'; allowed: union, per_target"),
    ("joint.width", 0, r"^pipeline\.joint\.width: must be >= 1"),
    ("student.alpha", -0.1, r"^pipeline\.student\.alpha: must be >= 0"),
    ("student.targets", "live", r"^pipeline\.student\.targets: got 'live'"),
    ("student.betas", {"x": 1}, r"^pipeline\.student\.betas: key 'x' is not a level; allowed: 1\.\.4"),
    ("student.betas", {1: -1}, r"^pipeline\.student\.betas\.1: must be a number >= 0"),
    ("student.betas", {1: "big"}, r"^pipeline\.student\.betas\.1: must be a number >= 0, got 'big'"),
    ("student.recipe.augment.flip", "no way", r"^pipeline\.student\.recipe\.augment\.flip: expected true/false"),
    ("baselines.model", {"arch": "test_resnet", "input_size": 4}, r"^pipeline\.baselines\.model\.input_size: must"),
    ("baselines.recipe", {"epochs": 0}, r"^pipeline\.baselines\.recipe\.epochs: must be >= 1"),
    ("controls.no_kd", 1, r"^pipeline\.controls\.no_kd: expected true/false, got 1"),
    ("datasets.1.name", "bad name!", r"^pipeline\.datasets\[1\]\.name: must be a non-empty name"),
    ("datasets.1.max_val", 0, r"^pipeline\.datasets\[1\]\.max_val: must be >= 1 or null"),
    ("datasets.1.classes", [3], r"^pipeline\.datasets\[1\]\.classes: needs at least 2 classes"),
    ("datasets.1.classes", [3, "3"], r"^pipeline\.datasets\[1\]\.classes: has duplicates"),
    ("datasets.2.student_model", {"arch": "nope_net"}, r"^pipeline\.datasets\[2\]\.student_model\.arch: unknown timm"),
    ("datasets.2.model.checkpoint", "/nonexistent/t.pt", r"^pipeline\.datasets\[2\]\.model\.checkpoint: file not"),
    ("datasets.2.model.kwargs", [1], r"^pipeline\.datasets\[2\]\.model\.kwargs: expected a mapping"),
    ("datasets.0.options", None, r"^pipeline\.datasets\[0\]\.options: expected a mapping, got None"),
    ("datasets.0.max_train", "10", r"^pipeline\.datasets\[0\]\.max_train: expected an integer or null, got '10'"),
    ("fusion_levels", [], r"^pipeline\.fusion_levels: needs at least one level"),
    ("fusion_levels", [1, 1], r"^pipeline\.fusion_levels: has duplicates"),
    ("fusion_levels", [True], r"^pipeline\.fusion_levels: levels must be integers in 1\.\.4, got True"),
    ("fusion_levels", [2.0], r"^pipeline\.fusion_levels: levels must be integers"),
    ("only_students", ["nope"], r"^pipeline\.only_students: unknown dataset 'nope'; allowed: \['mnist'"),
    ("device", "tpu", r"^pipeline\.device: got 'tpu'; allowed: auto, cpu, cuda"),
    ("teacher", None, r"^pipeline\.teacher: expected a mapping, got None"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("^") else None)
def test_validation_names_the_field_path(raw: dict, key: str, value: object, match: str) -> None:
    with pytest.raises(SpecError, match=match) as info:
        from_dict(PipelineSpec, _mutate(raw, key, value))
    assert "\n" not in str(info.value)


def test_missing_required_fields(raw: dict) -> None:
    data = copy.deepcopy(raw)
    del data["datasets"]
    with pytest.raises(SpecError, match=r"^pipeline\.datasets: required field is missing"):
        from_dict(PipelineSpec, data)
    data = copy.deepcopy(raw)
    del data["datasets"][1]["source"]
    with pytest.raises(SpecError, match=r"^pipeline\.datasets\[1\]\.source: required field is missing"):
        from_dict(PipelineSpec, data)


def test_spec_error_is_one_line() -> None:
    """A key with a newline (from a hand-written YAML or --set) must not break the one-line message."""
    data = {"datasets": [], "bad\nkey": 1}
    with pytest.raises(SpecError) as info:
        from_dict(PipelineSpec, data)
    assert "\n" not in str(info.value) and "bad key" in str(info.value)


def test_sub_specs_validate_on_their_own() -> None:
    with pytest.raises(SpecError, match=r"^joint\.dropout: must be in \[0, 1\)"):
        from_dict(JointSpec, {"dropout": 0.95 + 0.05}, path="joint")
    with pytest.raises(SpecError, match=r"^s\.temperature: must be > 0"):
        from_dict(StudentSpec, {"temperature": 0}, path="s")
    assert from_dict(StudentSpec, {"betas": {"2": 1}}, path="s").betas == {2: 1.0}


def test_read_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope\.yaml: file not found"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: malformed YAML \(line \d+, column \d+\)"):
        read_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: expected a YAML mapping at top level, got list"):
        read_yaml(bad)
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SpecError, match=r"bad\.yaml: cannot read"):
        read_yaml(bad)


# --------------------------------------------------------------------------------------------------------------------
# Per-dataset recipes: datasets[i].teacher / datasets[i].student merged over the global blocks
# --------------------------------------------------------------------------------------------------------------------


def test_per_dataset_overrides_merge_field_by_field(default: PipelineSpec) -> None:
    spec = load_pipeline(PIPELINE, ["datasets.mnist.teacher={lr: 1.0e-4, batch_size: 768, augment: {flip: true}}",
                                    "datasets.fashion.student={alpha: 0.4, temperature: 5, betas: {2: 0.4}, w_ce: 0.2,"
                                    " recipe: {epochs: 7, optimizer: adam, schedule: constant}}"])
    t = spec.teacher_for("mnist")
    assert (t.lr, t.batch_size, t.augment.flip) == (1e-4, 768, True)
    # everything not written comes from the global block, nested augment included
    assert t.augment.crop_padding == default.teacher.augment.crop_padding == 2
    assert (t.optimizer, t.weight_decay, t.epochs, t.schedule) == (default.teacher.optimizer,
                                                                  default.teacher.weight_decay, 10, "cosine")
    assert spec.teacher == default.teacher  # the global block itself is untouched
    assert spec.teacher_for("fashion") == spec.teacher_for("digits") == default.teacher
    s = spec.student_for("fashion")
    assert (s.alpha, s.temperature, s.betas, s.w_ce) == (0.4, 5.0, {2: 0.4}, 0.2)
    assert (s.recipe.epochs, s.recipe.optimizer, s.recipe.schedule) == (7, "adam", "constant")
    assert s.recipe.lr == default.student.recipe.lr and s.recipe.batch_size == 128
    assert s.beta_default == default.student.beta_default and s.targets == "cache"
    assert spec.student_for("mnist") == spec.student_for("digits") == default.student


def test_per_dataset_overrides_round_trip(tmp_path: Path, default: PipelineSpec) -> None:
    spec = copy.deepcopy(default)
    spec.datasets[0].teacher = {"lr": 1e-4, "augment": {"autoaugment": True}}
    spec.datasets[2].student = {"betas": {1: 0.5}, "recipe": {"batch_size": 96}}
    text = dump_yaml(spec)
    again = load_text(tmp_path, text)
    assert again == spec and dump_yaml(again) == text
    assert again.teacher_for("mnist").augment.autoaugment is True
    assert again.student_for("digits").recipe.batch_size == 96
    assert yaml.safe_load(text)["datasets"][0]["teacher"] == {"lr": 1e-4, "augment": {"autoaugment": True}}


def test_set_reaches_per_dataset_overrides() -> None:
    spec = load_pipeline(PIPELINE, ["datasets.digits.teacher.lr=0.01", "datasets.digits.teacher.augment.flip=true",
                                    "datasets.mnist.student.recipe.batch_size=64",
                                    "datasets.mnist.student.betas.2=0.5"])
    assert spec.datasets[2].teacher == {"lr": 0.01, "augment": {"flip": True}}
    assert spec.teacher_for("digits").lr == 0.01 and spec.teacher_for("digits").augment.flip is True
    assert spec.teacher_for("mnist").lr == 0.002
    assert spec.student_for("mnist").recipe.batch_size == 64 and spec.student_for("mnist").betas == {2: 0.5}


@pytest.mark.parametrize("item, match", [
    ("datasets.mnist.teacher.lrr=1", r"^pipeline\.datasets\[0\]\.teacher\.lrr: unknown field; allowed: \[.*'lr'"),
    ("datasets.fashion.teacher.lr=-1", r"^pipeline\.datasets\[1\]\.teacher\.lr: must be > 0, got -1"),
    ("datasets.fashion.teacher.augment.flp=1", r"^pipeline\.datasets\[1\]\.teacher\.augment\.flp: unknown field"),
    ("datasets.digits.teacher.optimizer=lion", r"^pipeline\.datasets\[2\]\.teacher\.optimizer: got 'lion'"),
    ("datasets.digits.teacher=5", r"^pipeline\.datasets\[2\]\.teacher: expected a mapping, got 5"),
    ("datasets.digits.teacher.epochs=0", r"^pipeline\.datasets\[2\]\.teacher\.epochs: must be >= 1, got 0 \(0 keeps"),
    ("teacher.epochs=0", r"^pipeline\.teacher\.epochs: must be >= 1, got 0 \(0 keeps a given teacher as it is; "
                         r"dataset 'mnist' has no"),
    ("datasets.mnist.student.gamma=1", r"^pipeline\.datasets\[0\]\.student\.gamma: unknown field; allowed"),
    ("datasets.mnist.student.temperature=0", r"^pipeline\.datasets\[0\]\.student\.temperature: must be > 0"),
    ("datasets.mnist.student.recipe.epochs=0", r"^pipeline\.datasets\[0\]\.student\.recipe\.epochs: must be >= 1"),
    ("datasets.mnist.student.betas.3=0.2", r"^pipeline\.datasets\[0\]\.student\.betas\.3: beta for level 3 above"),
    ("datasets.mnist.student.betas.x=0.2", r"^pipeline\.datasets\[0\]\.student\.betas: key 'x' is not a level"),
    ("datasets.mnist.student_model={arch: test_resnet, checkpoint: " + str(PIPELINE) + "}",
     r"^pipeline\.datasets\[0\]\.student_model\.checkpoint: a student starts fresh"),
], ids=lambda v: v.split("=")[0] if "\\" not in v else None)
def test_bad_per_dataset_override_names_the_field(item: str, match: str) -> None:
    with pytest.raises(SpecError, match=match) as info:
        load_pipeline(PIPELINE, [item])
    assert "\n" not in str(info.value)


def test_teacher_epochs_zero_takes_a_given_teacher_as_is(tmp_path: Path) -> None:
    """epochs 0 is allowed only where the model is checkpointed or pretrained; the baselines then need a recipe."""
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"")  # validation checks only that the file exists
    sets = [f"datasets.mnist.model.checkpoint={ckpt}", "datasets.mnist.teacher.epochs=0"]
    spec = load_pipeline(PIPELINE, [*sets, "baselines.multi_head=false", "baselines.joint_head=false"])
    assert spec.teacher_for("mnist").epochs == 0 and spec.teacher_for("fashion").epochs == 10
    # mnist's column is the first (only) to use test_resnet: its teacher recipe (0 epochs) would train the baselines
    with pytest.raises(SpecError, match=r"^pipeline\.baselines\.recipe: needed: .* dataset 'mnist', which has epoch"):
        load_pipeline(PIPELINE, sets)
    assert load_pipeline(PIPELINE, [*sets, "baselines.recipe={epochs: 2}"]).baselines.recipe.epochs == 2
    # the global block may say 0 when every dataset's teacher is given
    given = [f"datasets.{n}.model.checkpoint={ckpt}" for n in ("mnist", "fashion", "digits")]
    spec = load_pipeline(PIPELINE, [*given, "teacher.epochs=0", "baselines.recipe={epochs: 2}"])
    assert [spec.teacher_for(n).epochs for n in ("mnist", "fashion", "digits")] == [0, 0, 0]


def test_smoke_caps_per_dataset_overrides(default: PipelineSpec) -> None:
    spec = copy.deepcopy(default)
    spec.datasets[0].teacher = {"epochs": 200, "batch_size": 768, "lr": 1e-4}
    spec.datasets[1].student = {"recipe": {"epochs": 1, "batch_size": 240}, "alpha": 0.4}
    smoke = smoke_pipeline(spec)
    assert smoke.datasets[0].teacher == {"epochs": SMOKE_EPOCHS, "batch_size": config.SMOKE_BATCH, "lr": 1e-4}
    assert smoke.datasets[1].student == {"recipe": {"epochs": 1, "batch_size": config.SMOKE_BATCH}, "alpha": 0.4}
    assert spec.datasets[0].teacher["epochs"] == 200  # the input is not modified
    assert smoke.teacher_for("mnist").epochs == SMOKE_EPOCHS and smoke.student_for("fashion").alpha == 0.4
    assert smoke_pipeline(smoke) == smoke


def test_baseline_groups_follow_the_student_architectures(default: PipelineSpec) -> None:
    groups = default.baseline_groups()
    assert [(m.arch, names) for m, names in groups] == [("test_resnet", ["mnist"]), ("test_efficientnet", ["fashion"]),
                                                        ("test_convnext", ["digits"])]
    spec = load_pipeline(PIPELINE, ["datasets.digits.model.arch=test_resnet",
                                    "datasets.fashion.student_model={arch: test_resnet, kwargs: {output_stride: 8}}"])
    assert [(m.arch, names) for m, names in spec.baseline_groups()] == [("test_resnet", ["mnist", "fashion", "digits"])]
    # the whole model spec decides: another input size is another baseline
    spec = load_pipeline(PIPELINE, ["datasets.digits.model={arch: test_resnet, input_size: 48}"])
    assert [names for _, names in spec.baseline_groups()] == [["mnist"], ["fashion"], ["digits"]]
    # baselines.model: one backbone for every column
    spec = load_pipeline(PIPELINE, ["baselines.model={arch: test_vit}"])
    assert [(m.arch, names) for m, names in spec.baseline_groups()] == [("test_vit", ["mnist", "fashion", "digits"])]
    with pytest.raises(SpecError, match=r"^pipeline\.baselines\.multi_head_batching: got 'mixed'; allowed: alt"):
        load_pipeline(PIPELINE, ["baselines.multi_head_batching=mixed"])


def test_the_student_model_never_carries_the_teachers_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"")
    spec = load_pipeline(PIPELINE, [f"datasets.mnist.model.checkpoint={ckpt}", "datasets.mnist.model.pretrained=true"])
    d = spec.datasets[0]
    assert d.model.checkpoint == str(ckpt)
    assert d.student_net == ModelSpec(arch="test_resnet", input_size=32, pretrained=True, checkpoint=None,
                                   kwargs={"output_stride": 8})
    assert spec.baseline_groups()[0][0].checkpoint is None


# Table 1 of the paper, per architecture: lr, batch size, stochastic depth, dropout, weight decay, T, alpha, beta_c.
TABLE_1 = {
    "resnet18": (1e-4, 768, None, None, 0.001, 2.0, 0.6, (0.2, 0.2)),
    "efficientnet_b0": (1e-4, 240, 0.2, 0.2, 0.001, 2.0, 0.6, (0.2, 0.2)),
    "seresnext26d_32x4d": (1e-4, 192, None, None, 0.001, 2.0, 0.6, (0.2, 0.2)),
    "convnextv2_tiny": (1e-5, 96, 0.6, None, 0.5, 5.0, 0.6, (0.2, 0.2)),
    "swinv2_tiny_window8_256": (4e-4, 176, 0.6, None, 0.5, 2.0, 0.6, (0.2, 0.2)),
    "fastvit_sa24": (1e-4, 102, 0.3, 0.2, 0.5, 2.0, 0.4, (0.4, 0.2)),
}


@pytest.mark.parametrize("name, archs, size, optimizer", [
    ("paper_t1.yaml", ["resnet18", "efficientnet_b0", "seresnext26d_32x4d"], 224, "adam"),
    ("paper_t2.yaml", ["convnextv2_tiny", "swinv2_tiny_window8_256", "fastvit_sa24"], 256, "adamw"),
])
def test_paper_pipelines_carry_table_1(name: str, archs: list, size: int, optimizer: str) -> None:
    """The paper's T1 / T2 files load and validate (no data is read) and give each architecture Table 1's values."""
    spec = load_pipeline(ROOT / "pipelines" / name)
    assert [d.name for d in spec.datasets] == ["cifar100", "tinyimagenet", "sketch"]
    assert [d.source for d in spec.datasets] == ["torchvision", "folder", "folder"]
    assert spec.datasets[0].options["name"] == "CIFAR100" and spec.datasets[1].options["layout"] == "tinyimagenet"
    assert spec.fusion_levels == [1, 2] and spec.joint.variant == "union"
    assert [d.model.arch for d in spec.datasets] == archs
    for d in spec.datasets:
        lr, batch, drop_path, drop, wd, temperature, alpha, betas = TABLE_1[d.model.arch]
        assert d.model.input_size == size and d.student_model is None and not d.model.pretrained
        assert (d.model.kwargs.get("drop_path_rate"), d.model.kwargs.get("drop_rate")) == (drop_path, drop)
        for recipe in (spec.teacher_for(d.name), spec.student_for(d.name).recipe):
            assert (recipe.lr, recipe.batch_size, recipe.weight_decay) == (lr, batch, wd), d.name
            assert (recipe.optimizer, recipe.schedule, recipe.epochs) == (optimizer, "constant", 200)
            assert recipe.augment.autoaugment and not recipe.augment.flip and recipe.augment.crop_padding == 0
        s = spec.student_for(d.name)
        assert (s.temperature, s.alpha, (s.beta(1), s.beta(2)), s.w_ce) == (temperature, alpha, betas, 1.0)
    assert [m.arch for m, _ in spec.baseline_groups()] == archs  # each column's baselines: its own architecture
    assert spec.baselines.multi_head_batching == "alternate" and spec.baselines.recipe is None


def test_seeds_field_and_the_seeds_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from mlfd.cli import EXIT_BAD_INPUT, main

    assert load_pipeline(PIPELINE).seeds == [0]
    assert load_pipeline(PIPELINE, ["seeds=[0,1]"]).seeds == [0, 1]
    assert load_pipeline(PIPELINE, ["seeds=[2, 0, 1]"]).seeds == [2, 0, 1]
    assert config.parse_seeds("0,1,2") == [0, 1, 2] and config.parse_seeds(" 3 ") == [3]
    for bad, msg in (("seeds=[]", "pipeline.seeds: needs at least one seed"),
                     ("seeds=[0,0]", "pipeline.seeds: has duplicates"),
                     ("seeds=[0,-1]", "pipeline.seeds: seeds must be integers >= 0, got -1"),
                     ("seeds=[0,x]", "pipeline.seeds: seeds must be integers >= 0, got 'x'"),
                     ("seeds=3", "pipeline.seeds: expected a list, got 3")):
        with pytest.raises(SpecError, match=msg.replace("[", r"\[")):
            load_pipeline(PIPELINE, [bad])
    for bad in ("0,x", "", "0,,1", "-1", "1.5"):
        with pytest.raises(SpecError, match=r"^--seeds .*: expected a comma-separated list of integers >= 0"):
            config.parse_seeds(bad)
        capsys.readouterr()
        assert main(["run", str(PIPELINE), "--seeds", bad, "--no-tracking", "--out", "/nonexistent/never"]) \
            == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"mlfd: error: --seeds {bad}: expected") and err.count("\n") == 1
    assert main(["run", str(PIPELINE), "--seeds", "1,1", "--no-tracking", "--out", "/nonexistent/never"]) \
        == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "mlfd: error: pipeline.seeds: has duplicates: [1, 1]\n"


def test_for_seed_shifts_every_recipe_seed_and_nothing_else(default: PipelineSpec) -> None:
    data = to_dict(default)
    data["baselines"]["recipe"] = to_dict(RecipeSpec(seed=4))
    data["datasets"][0]["teacher"] = {"seed": 7, "lr": 0.01}
    data["datasets"][1]["student"] = {"recipe": {"seed": 5}, "alpha": 0.3}
    spec = from_dict(PipelineSpec, data)
    assert to_dict(spec.for_seed(0)) == to_dict(spec)
    s = spec.for_seed(10)
    assert to_dict(spec) == data  # not modified
    a, b = to_dict(spec), to_dict(s)
    shifted = [("teacher", "seed"), ("joint", "recipe", "seed"), ("student", "recipe", "seed"),
               ("baselines", "recipe", "seed"), ("datasets", 0, "teacher", "seed"),
               ("datasets", 1, "student", "recipe", "seed")]
    for path in shifted:
        x, y = a, b
        for p in path[:-1]:
            x, y = x[p], y[p]
        assert y[path[-1]] == x[path[-1]] + 10
        x[path[-1]] = y[path[-1]]
    a["seeds"] = [10]
    assert a == b  # the seeds and nothing else
    assert s.teacher_for(default.datasets[0].name).seed == 17 and s.teacher_for(default.datasets[0].name).lr == 0.01
