"""Declarative search spaces: loading, validation, sampling, Optuna define-by-run, Ray searcher, apply_config."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from mlfd.config import PipelineSpec, from_dict, read_yaml
from mlfd.errors import SpecError
from mlfd.tune.spaces import (SearchSpace, apply_config, check_levels, load_space, make_searcher, representatives,
                              resolve_name)

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
PIPELINE = ROOT / "pipelines" / "offline_default.yaml"


@pytest.fixture(scope="module")
def pipeline() -> dict:
    return read_yaml(PIPELINE)


@pytest.fixture(scope="module")
def students() -> SearchSpace:
    return load_space(ROOT / "search_spaces" / "students.yaml")


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_space(tmp_path: Path, params: str, extra: str = "") -> Path:
    """Write a space file with the given (indented YAML) params block."""
    p = tmp_path / "space.yaml"
    p.write_text(f"description: test\n{extra}params:\n{textwrap.indent(textwrap.dedent(params), '  ')}")
    return p


# --------------------------------------------------------------------------------------------------------------------
# Shipped spaces
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_space_loads_and_samples_valid_pipelines(path: Path, pipeline: dict) -> None:
    space = load_space(path)
    assert space.description and space.params
    rng = random.Random(0)
    for _ in range(30):
        config = space.sample(rng)
        assert set(config) <= set(space.names())
        spec = from_dict(PipelineSpec, apply_config(pipeline, config), validate=False)
        if "fusion_level" in config:
            assert spec.fusion_levels == [config["fusion_level"]]
            assert all(lvl <= config["fusion_level"] for lvl in spec.student.betas)
        for name, value in config.items():
            if name == "fusion_level" or name.startswith("student.betas."):
                continue
            obj, parts = spec, name.split(".")
            if parts[0] == "datasets":  # datasets.<dataset name>.<field...>
                obj, parts = spec.dataset(parts[1]), parts[2:]
            for part in parts:
                obj = getattr(obj, part)
            assert obj == value, name


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_space_samples_pass_full_validation(path: Path, pipeline: dict) -> None:
    pytest.importorskip("mlfd.data")
    pytest.importorskip("mlfd.models")
    space = load_space(path)
    rng = random.Random(1)
    for _ in range(10):
        from_dict(PipelineSpec, apply_config(pipeline, space.sample(rng)), validate=True)


def test_teachers_space_domains() -> None:
    space = load_space(ROOT / "search_spaces" / "teachers.yaml")
    rng = random.Random(0)
    for _ in range(100):
        c = space.sample(rng)
        assert isinstance(c["teacher.epochs"], int) and c["teacher.epochs"] % 5 == 0
        assert c["teacher.augment.crop_padding"] in range(5)
        assert isinstance(c["teacher.augment.autoaugment"], bool)
        assert 1e-4 <= c["teacher.lr"] <= 1e-2


def test_conditional_betas_exist_iff_fusion_level(students: SearchSpace) -> None:
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        c = students.sample(rng)
        k = c["fusion_level"]
        seen.add(k)
        for lvl in range(1, 5):
            assert (f"student.betas.{lvl}" in c) == (lvl <= k), (k, sorted(c))
    assert seen == {1, 2, 3, 4}


def test_sample_is_deterministic_for_a_seed(students: SearchSpace) -> None:
    a = [students.sample(random.Random(7)) for _ in range(3)]
    b = [students.sample(random.Random(7)) for _ in range(3)]
    assert a == b


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "fusion_level", "joint.dropout", "student.recipe.lr", "teacher.weight_decay", "teacher.augment.autoaugment",
    "student.betas.1", "student.betas.4", "datasets.mnist.model.arch", "datasets.mnist.max_train",
    "datasets.digits.model.kwargs.drop_rate", "datasets.mnist.student_model.input_size", "baselines.recipe.lr",
    "datasets.0.model.input_size",
])
def test_valid_names(name: str) -> None:
    resolve_name(name)


def test_unknown_field_names_file_and_param(tmp_path: Path) -> None:
    path = write_space(tmp_path, "student.bogus: {type: float, low: 0.0, high: 1.0}\n")
    with pytest.raises(SpecError) as e:
        load_space(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg and "params.student.bogus" in msg and "'bogus'" in msg
    assert "alpha" in msg  # allowed fields of StudentSpec


def test_unknown_top_level_field_lists_allowed(tmp_path: Path) -> None:
    path = write_space(tmp_path, "foo.bar: {type: float, low: 0.0, high: 1.0}\n")
    with pytest.raises(SpecError, match=r"params\.foo\.bar: unknown field 'foo'.*allowed:.*fusion_level.*student"):
        load_space(path)


BAD = [
    # (params block, substring expected in the error)
    ("joint.dropout: {type: float, low: 0.5, high: 0.9, bogus: 1}", "params.joint.dropout.bogus: unknown key"),
    ("joint.dropout: {type: floaty, low: 0.5, high: 0.9}", "params.joint.dropout.type: unknown type"),
    ("joint.dropout: {low: 0.5, high: 0.9}", "params.joint.dropout.type: required"),
    ("joint.dropout: {type: float, low: 0.9, high: 0.5}", "params.joint.dropout.low: must be < high"),
    ("joint.dropout: {type: float, low: 0.5, high: 0.5}", "params.joint.dropout.low: must be < high"),
    ("joint.dropout: {type: float, low: a, high: 0.9}", "params.joint.dropout.low: expected a number"),
    ("joint.dropout: {type: float, high: 0.9}", "params.joint.dropout.low: required"),
    ("joint.dropout: {type: float, low: 0.0, high: 0.9, log: true}", "params.joint.dropout.log: a log scale"),
    ("joint.dropout: {type: float, low: 0.1, high: 0.9, log: yes please}", "params.joint.dropout.log: expected"),
    ("joint.dropout: {type: float, low: 0.1, high: 0.9, step: 0.0}", "params.joint.dropout.step: expected a pos"),
    ("joint.dropout: {type: float, low: 0.1, high: 0.9, step: 0.3}", "params.joint.dropout.step: high - low"),
    ("student.recipe.lr: {type: float, low: 0.001, high: 0.1, log: true, step: 0.001}",
     "params.student.recipe.lr.step: cannot be combined with log"),
    ("teacher.epochs: {type: int, low: 1.5, high: 9}", "params.teacher.epochs.low: expected an integer"),
    ("teacher.epochs: {type: float, low: 1.0, high: 9.0}", "params.teacher.epochs.type: teacher.epochs expects an"),
    ("teacher.epochs: {type: int, low: 1, high: 9, choices: [1]}", "params.teacher.epochs.choices: unknown key"),
    ("joint.width: {type: categorical, choices: []}", "params.joint.width.choices: required non-empty"),
    ("joint.width: {type: categorical}", "params.joint.width.choices: required non-empty"),
    ("joint.width: {type: categorical, choices: [[1, 2]]}", "params.joint.width.choices: choices must be scalars"),
    ("joint.width: {type: categorical, choices: [64, 64]}", "params.joint.width.choices: has duplicates"),
    ("joint.width: {type: categorical, choices: [64, wide]}", "params.joint.width.choices: joint.width expects"),
    ("teacher.optimizer: {type: categorical, choices: [adamw, lion]}", "params.teacher.optimizer.choices"),
    ("teacher.augment.flip: {type: categorical, choices: [0, 1]}", "params.teacher.augment.flip.choices"),
    ("joint.width: {type: fixed}", "params.joint.width.value: required"),
    ("joint.width: {type: fixed, value: 1.5}", "params.joint.width.value: joint.width expects an integer"),
    ("joint.width: 128", "params.joint.width: expected a mapping"),
    ("fusion_level: {type: categorical, choices: [1, 5]}", "params.fusion_level.choices: fusion levels must be in"),
    ("fusion_level: {type: int, low: 0, high: 4}", "params.fusion_level.low: fusion levels must be in"),
    ("fusion_level: {type: float, low: 1.0, high: 4.0}", "params.fusion_level.type"),
    ("fusion_levels: {type: categorical, choices: [1, 2]}", "params.fusion_levels: is a list field"),
    ("student.betas.5: {type: float, low: 0.0, high: 1.0}", "params.student.betas.5: unknown beta level"),
    ("student.betas: {type: float, low: 0.0, high: 1.0}", "params.student.betas: name one level"),
    ("student.recipe: {type: float, low: 0.0, high: 1.0}", "params.student.recipe: is a mapping"),
    ("student.alpha.x: {type: float, low: 0.0, high: 1.0}", "params.student.alpha.x: student.alpha is a scalar"),
    ("datasets.mnist: {type: float, low: 0.0, high: 1.0}", "params.datasets.mnist: name a field of one dataset"),
    ("datasets.mnist.name: {type: fixed, value: x}", "params.datasets.mnist.name: a dataset's name cannot"),
    ("datasets.mnist.bogus: {type: fixed, value: x}", "params.datasets.mnist.bogus: unknown field 'bogus'"),
    ("datasets.mnist.model.kwargs: {type: fixed, value: 1}", "params.datasets.mnist.model.kwargs: is a free-form"),
    ("student.alpha: {type: float, low: 0.0, high: 1.0, when: {fusion_level: {ge: 2}}}",
     "params.student.alpha.when.fusion_level: a condition may only refer to a param declared earlier"),
    ("fusion_level: {type: categorical, choices: [1, 2]}\n"
     "student.alpha: {type: float, low: 0.0, high: 1.0, when: {fusion_level: {gte: 2}}}",
     "params.student.alpha.when.fusion_level.gte: unknown op; allowed: eq, ne, lt, le, gt, ge, in"),
    ("fusion_level: {type: categorical, choices: [1, 2]}\n"
     "student.alpha: {type: float, low: 0.0, high: 1.0, when: {fusion_level: 2}}",
     "params.student.alpha.when.fusion_level: expected a mapping"),
    ("fusion_level: {type: categorical, choices: [1, 2]}\n"
     "student.alpha: {type: float, low: 0.0, high: 1.0, when: {fusion_level: {in: 2}}}",
     "params.student.alpha.when.fusion_level.in: expected a non-empty list"),
    ("teacher.optimizer: {type: categorical, choices: [adam, sgd]}\n"
     "teacher.lr: {type: float, low: 0.001, high: 0.1, when: {teacher.optimizer: {gt: 1}}}",
     "params.teacher.lr.when.teacher.optimizer.gt: teacher.optimizer is not numeric"),
    ("student.alpha: {type: float, low: 0.0, high: 1.0, when: {student.alpha: {ge: 0}}}",
     "params.student.alpha.when.student.alpha: a condition may only refer to a param declared earlier"),
]


@pytest.mark.parametrize("params,expected", BAD, ids=[e for _, e in BAD])
def test_bad_definitions(tmp_path: Path, params: str, expected: str) -> None:
    path = write_space(tmp_path, params + "\n")
    with pytest.raises(SpecError) as e:
        load_space(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg, msg


@pytest.mark.parametrize("text,expected", [
    ("description: x\nparams:\n  joint.dropout: {type: fixed, value: 0.5}\nsampler: tpe\n", "sampler: unknown top"),
    ("description: x\n", "params: required"),
    ("description: x\nparams: {}\n", "params: required"),
    ("description: [x]\nparams:\n  joint.dropout: {type: fixed, value: 0.5}\n", "description: expected a string"),
    ("params: [1, 2\n", "malformed YAML"),
])
def test_bad_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=expected):
        load_space(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_space(tmp_path / "nope.yaml")


def test_fixed_and_conditions_on_fixed(tmp_path: Path) -> None:
    path = write_space(tmp_path, """\
        student.targets: {type: fixed, value: online}
        teacher.optimizer: {type: categorical, choices: [adamw, sgd]}
        teacher.weight_decay: {type: fixed, value: 0.0005, when: {teacher.optimizer: {eq: sgd}}}
        teacher.lr:
          type: float
          low: 0.01
          high: 0.1
          when: {teacher.optimizer: {in: [sgd]}, student.targets: {ne: cache}}
        """)
    space = load_space(path)
    rng = random.Random(0)
    for _ in range(50):
        c = space.sample(rng)
        assert c["student.targets"] == "online"
        assert ("teacher.weight_decay" in c) == ("teacher.lr" in c) == (c["teacher.optimizer"] == "sgd")


# --------------------------------------------------------------------------------------------------------------------
# Optuna define-by-run and the Ray searcher
# --------------------------------------------------------------------------------------------------------------------


def _run_study(space: SearchSpace, seed: int, n: int) -> list[dict]:
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4), direction="maximize")
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.define_by_run(trial)
        assert isinstance(constants, dict)
        params = {**trial.params, **constants}
        out.append(params)
        study.tell(trial, params.get("student.alpha", 0.0) + params["fusion_level"] / 10)
    return out


def test_define_by_run_with_optuna(students: SearchSpace) -> None:
    configs = _run_study(students, seed=0, n=12)
    for c in configs:
        k = c["fusion_level"]
        assert k in (1, 2, 3, 4)
        assert {f"student.betas.{lvl}" for lvl in range(1, k + 1)} <= set(c)
        assert not any(f"student.betas.{lvl}" in c for lvl in range(k + 1, 5))
        assert 1.0 <= c["student.temperature"] <= 8.0
    assert configs == _run_study(students, seed=0, n=12)
    assert configs != _run_study(students, seed=1, n=12)


def test_define_by_run_returns_active_constants(tmp_path: Path) -> None:
    import optuna

    path = write_space(tmp_path, """\
        fusion_level: {type: categorical, choices: [1, 2]}
        student.targets: {type: fixed, value: online, when: {fusion_level: {eq: 2}}}
        joint.width: {type: fixed, value: 64}
        """)
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(8):
        trial = study.ask()
        constants = space.define_by_run(trial)
        expected = {"joint.width": 64, **({"student.targets": "online"} if trial.params["fusion_level"] == 2 else {})}
        assert constants == expected
        assert set(trial.params) == {"fusion_level"}
        study.tell(trial, 0.0)


def test_sample_with_trial(students: SearchSpace, pipeline: dict) -> None:
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3))
    trial = study.ask()
    c = students.sample(trial=trial)
    assert c == trial.params
    from_dict(PipelineSpec, apply_config(pipeline, c), validate=False)


def test_make_searcher_suggests(students: SearchSpace, pipeline: dict) -> None:
    pytest.importorskip("ray.tune.search.optuna")
    from ray.tune.search.optuna import OptunaSearch

    searcher = make_searcher(students, metric="val/acc1", mode="max", seed=0,
                             points_to_evaluate=[{"fusion_level": 3, "student.alpha": 0.25}])
    assert isinstance(searcher, OptunaSearch)
    searcher.set_search_properties("val/acc1", "max", config={})  # what Tune calls; a no-op when a space is set
    first = searcher.suggest("trial_1")
    assert first["fusion_level"] == 3 and first["student.alpha"] == 0.25
    assert set(first) == set(students.names()) - {"student.betas.4"}
    for i in range(2, 6):
        c = searcher.suggest(f"trial_{i}")
        k = c["fusion_level"]
        assert set(c) == {n for n in students.names() if not n.startswith("student.betas.")} | {
            f"student.betas.{lvl}" for lvl in range(1, k + 1)}
        from_dict(PipelineSpec, apply_config(pipeline, c), validate=False)
        searcher.on_trial_complete(f"trial_{i}", {"val/acc1": c["student.alpha"]})


def test_make_searcher_rejects_unknown_point(students: SearchSpace) -> None:
    pytest.importorskip("ray.tune.search.optuna")
    with pytest.raises(SpecError, match=r"points_to_evaluate\[0\]\.student\.gamma"):
        make_searcher(students, "val/acc1", "max", 0, points_to_evaluate=[{"student.gamma": 1.0}])
    with pytest.raises(SpecError, match="mode"):
        make_searcher(students, "val/acc1", "maximize", 0)


# --------------------------------------------------------------------------------------------------------------------
# apply_config
# --------------------------------------------------------------------------------------------------------------------


def test_apply_config_fusion_level_and_betas(pipeline: dict) -> None:
    base = {**pipeline, "fusion_levels": [1, 2, 3, 4]}
    base["student"] = {**pipeline["student"], "betas": {1: 0.1, "2": 0.2, 3: 0.3, 4: 0.4}}
    out = apply_config(base, {"fusion_level": 2, "student.betas.2": 0.9, "student.alpha": 0.5})
    assert out["fusion_levels"] == [2]
    assert out["student"]["betas"] == {1: 0.1, 2: 0.9}
    assert out["student"]["alpha"] == 0.5
    assert base["student"]["betas"] == {1: 0.1, "2": 0.2, 3: 0.3, 4: 0.4}  # input untouched
    assert base["fusion_levels"] == [1, 2, 3, 4]
    spec = from_dict(PipelineSpec, out, validate=False)
    assert spec.fusion_levels == [2] and spec.student.alpha == 0.5

    out = apply_config(base, {"fusion_level": 4})
    assert out["student"]["betas"] == base["student"]["betas"]


def test_apply_config_datasets_by_name(pipeline: dict) -> None:
    out = apply_config(pipeline, {"datasets.fashion.model.input_size": 48, "datasets.digits.max_train": 100,
                                  "teacher.augment.autoaugment": True})
    spec = from_dict(PipelineSpec, out, validate=False)
    assert spec.dataset("fashion").model.input_size == 48
    assert spec.dataset("digits").max_train == 100
    assert spec.dataset("mnist").model.input_size == 32
    assert spec.teacher.augment.autoaugment is True


def test_apply_config_errors(pipeline: dict, students: SearchSpace) -> None:
    with pytest.raises(SpecError, match="nosuch"):
        apply_config(pipeline, {"datasets.nosuch.max_train": 10})
    with pytest.raises(SpecError, match="student.gamma"):
        apply_config(pipeline, {"student.gamma": 1.0})
    students.check_pipeline(pipeline)


def test_check_pipeline_dataset_names(tmp_path: Path, pipeline: dict) -> None:
    path = write_space(tmp_path, "datasets.svhn.model.input_size: {type: categorical, choices: [32, 48]}\n")
    space = load_space(path)
    assert space.dataset_names() == {"svhn"}
    with pytest.raises(SpecError, match="unknown dataset 'svhn'"):
        space.check_pipeline(pipeline)


def _failing_region_share(searcher, name: str, n: int = 50, startup: int = 20) -> float:
    """Run ``n`` trials where ``name < 0.5`` fails and the rest finish with the same score: share of the trials
    after TPE's random start-up that were still proposed in the failing region."""
    searcher.set_search_properties("val/acc1", "max", config={})
    inside = 0
    for i in range(n):
        tid = f"t{i}"
        x = searcher.suggest(tid)[name]
        if x < 0.5:
            searcher.on_trial_complete(tid, error=True)
            inside += i >= startup
        else:
            searcher.on_trial_complete(tid, {"val/acc1": 50.0, "training_iteration": 1})
    return inside / (n - startup)


def test_failed_trials_steer_the_searcher_away(tmp_path: Path) -> None:
    """A trial that fails (diverged, out of memory) is told to Optuna as the worst outcome: TPE stops proposing its
    region (seed 0: 30% of the proposals after trial 20, falling). Ray's own OptunaSearch tells it FAIL, which TPE
    ignores: it goes on proposing there (seed 0: 100%)."""
    pytest.importorskip("ray.tune.search.optuna")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from mlfd.tune.searcher import FAILED_ATTR

    space = load_space(write_space(tmp_path, "student.alpha: {type: float, low: 0.0, high: 1.0}\n"))
    ours = make_searcher(space, "val/acc1", "max", seed=0)
    share = _failing_region_share(ours, "student.alpha")
    plain = OptunaSearch(space=space.define_by_run, metric="val/acc1", mode="max",
                         sampler=optuna.samplers.TPESampler(seed=0))
    plain_share = _failing_region_share(plain, "student.alpha")
    assert share <= 0.4 and plain_share >= 0.6, (share, plain_share)
    failed = [t for t in ours._ot_study.trials if t.user_attrs.get(FAILED_ATTR)]
    assert failed and all(t.state == optuna.trial.TrialState.PRUNED for t in failed)


# --------------------------------------------------------------------------------------------------------------------
# Deterministic coverage of a space's branches (what `mlfd tune` validates before starting Ray)
# --------------------------------------------------------------------------------------------------------------------


BRANCHY = """\
    joint.width: {type: categorical, choices: [16, 32, 64]}
    teacher.epochs: {type: int, low: 1, high: 9}
    joint.dropout: {type: float, low: 0.0, high: 0.9}
    student.recipe.lr: {type: float, low: 0.001, high: 0.1, log: true}
    student.alpha: {type: float, low: 0.0, high: 1.0, step: 0.25}
    student.w_ce: {type: float, low: 0.1, high: 1.0, when: {joint.width: {ne: 32}, teacher.epochs: {eq: 4}}}
    student.temperature: {type: float, low: 1.0, high: 4.0, when: {joint.dropout: {gt: 0.2, lt: 0.3}}}
    student.beta_default: {type: fixed, value: 0.5, when: {student.alpha: {in: [0.3, 0.75]}}}
    joint.adaptor_width: {type: int, low: 8, high: 16, when: {student.temperature: {ge: 3.0}}}
"""


def test_representatives_of_each_kind(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, BRANCHY))
    p = {q.name: q for q in space.params}
    assert representatives(p["joint.width"], []) == [16, 32, 64]
    assert representatives(p["student.beta_default"], []) == [0.5]
    assert representatives(p["student.recipe.lr"], []) == [0.001, 0.1]  # no threshold: the bounds only
    # int: the bounds and the grid values around the threshold 4 (below it, on it, above it)
    assert representatives(p["teacher.epochs"], [4]) == [1, 3, 4, 5, 6, 9]
    # continuous: the bounds, the thresholds and a value strictly between each two
    assert representatives(p["joint.dropout"], [0.2, 0.3]) == pytest.approx([0.0, 0.1, 0.2, 0.25, 0.3, 0.6, 0.9])
    # stepped float, thresholds off the grid (0.3) and on it (0.75): the grid neighbours
    assert representatives(p["student.alpha"], [0.3, 0.75]) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_cover_reaches_every_branch_a_sample_can(tmp_path: Path) -> None:
    """Every set of active params that 20,000 seeded random samples reach is reached by cover(), which also takes
    both bounds of every range and every choice; cover() is the same on every call."""
    space = load_space(write_space(tmp_path, BRANCHY))
    configs = space.cover()
    assert configs == space.cover()
    covered = {frozenset(c) for c in configs}
    rng = random.Random(0)
    sampled = {frozenset(space.sample(rng)) for _ in range(20_000)}
    assert sampled <= covered, sorted(map(sorted, sampled - covered))
    # Branches one random sample usually misses: w_ce needs teacher.epochs == 4 (1 in 9) and width != 32; the
    # temperature's window is 1/9 of the dropout range; beta_default needs alpha == 0.75 (1 in 5).
    conditional = {"student.w_ce", "student.temperature", "student.beta_default", "joint.adaptor_width"}
    assert conditional <= set().union(*covered)
    assert any("student.w_ce" not in c for c in configs) and any("student.temperature" not in c for c in configs)
    for q in space.params:
        seen = {c[q.name] for c in configs if q.name in c}
        if q.kind in ("float", "int"):
            assert {q.low, q.high} <= seen, q.name
        elif q.kind == "categorical":
            assert seen == set(q.choices), q.name


def test_cover_of_the_students_space(students: SearchSpace) -> None:
    configs = students.cover()
    assert sorted({c["fusion_level"] for c in configs}) == [1, 2, 3, 4]
    for lvl in range(1, 5):
        assert {c[f"student.betas.{lvl}"] for c in configs if f"student.betas.{lvl}" in c} == {0.0, 1.0}
        assert all((f"student.betas.{lvl}" in c) == (lvl <= c["fusion_level"]) for c in configs)
    assert {c["student.recipe.lr"] for c in configs} == {1e-4, 1e-2}


def test_cover_refuses_too_many_branch_combinations(tmp_path: Path) -> None:
    """Three drivers of 20 values each make 8,000 combinations, over the limit of 4,096, at the third."""
    twenty = list(range(1, 21))
    params = (f"datasets.mnist.max_train: {{type: categorical, choices: {twenty}}}\n"
              f"datasets.mnist.max_val: {{type: categorical, choices: {twenty}}}\n"
              f"datasets.mnist.max_test: {{type: categorical, choices: {twenty}}}\n"
              "student.alpha: {type: float, low: 0.0, high: 1.0, when: {datasets.mnist.max_train: {eq: 1}, "
              "datasets.mnist.max_val: {eq: 1}, datasets.mnist.max_test: {eq: 1}}}\n")
    space = load_space(write_space(tmp_path, params))
    assert len(space.cover(limit=8000)) == 8000 + 1  # and alpha's high bound once more
    with pytest.raises(SpecError, match=r"more than 4096 branch combinations to check \(at datasets.mnist.max_test\)"):
        space.cover()


@pytest.mark.parametrize("levels, params, refused", [
    ([1, 2], "student.alpha: {type: float, low: 0.0, high: 1.0}", "does not search it"),
    ([2], "student.alpha: {type: float, low: 0.0, high: 1.0}", None),
    ([1, 2], "fusion_level: {type: categorical, choices: [1, 2]}", None),
    ([1, 2], "student.alpha: {type: categorical, choices: [0.0, 0.5]}\n"
             "fusion_level: {type: categorical, choices: [1, 2], when: {student.alpha: {gt: 0.1}}}",
     "leaves it unset in some branch"),
])
def test_check_levels(tmp_path: Path, levels: list, params: str, refused: str | None) -> None:
    space = load_space(write_space(tmp_path, params))
    for stage in ("students", "joint"):
        if refused is None:
            check_levels(space, space.cover(), levels, stage)
        else:
            with pytest.raises(SpecError, match=rf"params.fusion_level: a {stage} trial trains one fusion level, but "
                                                rf"the pipeline has fusion_levels \[1, 2\] and the space {refused}; "
                                                r"add `fusion_level: \{type: categorical, choices: \[1, 2\]\}`"):
                check_levels(space, space.cover(), levels, stage)
    check_levels(space, space.cover(), levels, "teachers")  # a teacher trial trains no fusion level
