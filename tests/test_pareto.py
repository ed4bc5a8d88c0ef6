"""Multi-objective searches: the Pareto front, constraints, ``--pick``, student costs and the searcher (fast), and the
``tune_jobs/students_pareto.yaml`` smoke search end to end (slow: Ray, MLflow, the CLI).

The front of the end-to-end test is computed again here, independently of :mod:`mlfd.stages.pareto`, by pairwise
comparison of the trials' values.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import DATASETS, ROOT, Search, read_search

from mlfd.config import SpecError
from mlfd.stages.pareto import (Objective, Pick, feasible_mask, front_order, non_dominated, objectives, parse_pick,
                                pareto_mask, pick_row, violations)

ACC, PARAMS = "val/acc1", "student/params"


def tiny(max_train: int) -> list[str]:
    """Pipeline overrides that make every dataset tiny (as test_tune.py's searches, which share the store)."""
    return [f"--set=pipeline.datasets.{d}.{k}={n}" for d in DATASETS
            for k, n in (("max_train", max_train), ("max_test", 100))]
OBJS = [Objective(ACC, "max"), Objective(PARAMS, "min")]


def dominates(a: tuple, b: tuple, modes: list[str]) -> bool:
    """a dominates b: no worse in every objective, better in one (written out, not vectorized)."""
    better = worse = False
    for x, y, m in zip(a, b, modes):
        if (x > y if m == "max" else x < y):
            better = True
        elif x != y:
            worse = True
    return better and not worse


def brute_front(points: list[tuple], modes: list[str]) -> list[bool]:
    return [not any(dominates(q, p, modes) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]


def trials(rows: list[tuple]) -> pd.DataFrame:
    """A trials.parquet-like study: (trial_id, status, acc, params) rows."""
    return pd.DataFrame([{"study": "digits", "trial_id": t, "status": s, f"best/{ACC}": a, f"best/{PARAMS}": p,
                          "trial_index": i + 1} for i, (t, s, a, p) in enumerate(rows)])


# --------------------------------------------------------------------------------------------------------------------
# The front
# --------------------------------------------------------------------------------------------------------------------


def test_non_dominated_golden() -> None:
    v = np.array([[90.0, 3e5], [80.0, 1e5], [85.0, 3e5], [90.0, 3e5], [70.0, 2e5], [np.nan, 1.0]])
    # 0 and 3 are equal (both kept), 2 is dominated by 0, 4 by 1; a NaN row is never on the front.
    assert non_dominated(v, ["max", "min"]).tolist() == [True, True, False, True, False, False]
    assert non_dominated(v[:5, :1], ["max"]).tolist() == [True, False, False, True, False]


@pytest.mark.parametrize("seed", range(5))
def test_non_dominated_matches_pairwise_comparison(seed: int) -> None:
    rng = np.random.default_rng(seed)
    modes = ["max", "min", "min"][: 2 + seed % 2]
    v = rng.integers(0, 6, size=(40, len(modes))).astype(float)  # small integers: many ties and equal rows
    assert non_dominated(v, modes).tolist() == brute_front([tuple(r) for r in v], modes)


def test_pareto_mask_pool_and_constraints() -> None:
    df = trials([("a", "TERMINATED", 90.0, 3e5), ("b", "TERMINATED", 80.0, 1e5), ("c", "STOPPED", 50.0, 5e4),
                 ("d", "ERROR", 99.0, 1e3), ("e", "TERMINATED", 85.0, 2e5)])
    # Stopped and failed trials are left out when some trial ran every epoch.
    assert pareto_mask(df, OBJS).tolist() == [True, True, False, False, True]
    cons = {PARAMS: {"le": 2e5}}
    assert feasible_mask(df, cons).tolist() == [False, True, True, True, True]
    assert pareto_mask(df, OBJS, cons).tolist() == [False, True, False, False, True]
    assert not pareto_mask(df, OBJS, {PARAMS: {"le": 1.0}}).any()  # nothing feasible: an empty front
    only_stopped = df[df["status"] != "TERMINATED"]
    assert pareto_mask(only_stopped, OBJS).tolist() == [True, False]  # none ran every epoch: the stopped one counts


def test_violations_are_relative_and_signed() -> None:
    cons = {PARAMS: {"le": 2e5}, ACC: {"ge": 80.0}}
    v = violations({PARAMS: 3e5, ACC: 60.0}, cons)
    assert v == {"student/params le 200000": 0.5, "val/acc1 ge 80": 0.25}
    assert violations({PARAMS: 1e5, ACC: 100.0}, cons) == {"student/params le 200000": -0.5,
                                                             "val/acc1 ge 80": -0.25}
    assert violations({ACC: float("nan")}, cons) == {"student/params le 200000": 1.0, "val/acc1 ge 80": 1.0}
    assert violations({"x": 0.5}, {"x": {"le": 0}}) == {"x le 0": 0.5}  # bound 0: scale 1


def test_objectives_lengths() -> None:
    assert objectives("val/acc1", "max") == [Objective(ACC, "max")]
    assert objectives([ACC, PARAMS], ["max", "min"]) == OBJS
    with pytest.raises(SpecError, match="2 metrics need 2 modes"):
        objectives([ACC, PARAMS], ["max"])


# --------------------------------------------------------------------------------------------------------------------
# --pick
# --------------------------------------------------------------------------------------------------------------------


def test_parse_pick() -> None:
    assert parse_pick("pareto:3") == Pick(pareto=3)
    assert parse_pick("student/params<=1e6") == Pick(conditions=((PARAMS, "<=", 1e6),))
    assert parse_pick(" student/params < 2e5 , val/acc1>=80") == Pick(conditions=((PARAMS, "<", 2e5),
                                                                                   (ACC, ">=", 80.0)))
    for bad in ("pareto:0", "pareto:x", "pareto:", "params=3", "student/params<=", "<=3", "acc1 <= nan", ""):
        with pytest.raises(SpecError, match=r"^--pick: "):
            parse_pick(bad)


def test_pick_row() -> None:
    df = trials([("a", "TERMINATED", 90.0, 3e5), ("b", "TERMINATED", 80.0, 1e5), ("c", "TERMINATED", 85.0, 2e5),
                 ("d", "TERMINATED", 70.0, 2.5e5)])
    df["is_pareto"] = pareto_mask(df, OBJS)
    assert front_order(df[df["is_pareto"]], OBJS)["trial_id"].tolist() == ["a", "c", "b"]
    assert [pick_row(df, Pick(pareto=k), OBJS)["trial_id"] for k in (1, 2, 3)] == ["a", "c", "b"]
    with pytest.raises(SpecError, match=r"pareto:4: the Pareto front of study 'digits' has 3 point"):
        pick_row(df, Pick(pareto=4), OBJS, study="digits")
    assert pick_row(df, parse_pick("student/params<=2.5e5"), OBJS)["trial_id"] == "c"
    assert pick_row(df, parse_pick("student/params<=2.5e5,val/acc1<85"), OBJS)["trial_id"] == "b"
    # A trial that breaks the job's constraints ranks after every feasible one.
    assert pick_row(df, parse_pick("student/params<=3e5"), OBJS, {ACC: {"le": 88.0}})["trial_id"] == "c"
    with pytest.raises(SpecError, match="no trial of the study meets student/params<1000"):
        pick_row(df, parse_pick("student/params<1e3"), OBJS)
    with pytest.raises(SpecError, match="student/latency_ms: not a metric of this search; allowed: student/params"):
        pick_row(df, parse_pick("student/latency_ms<3"), OBJS)


# --------------------------------------------------------------------------------------------------------------------
# Costs and the searcher
# --------------------------------------------------------------------------------------------------------------------


def test_student_cost_counts_the_deployed_model() -> None:
    import timm
    import torch

    from mlfd.config import ModelSpec
    from mlfd.stages.cost import STUDENT_LATENCY, STUDENT_PARAMS, student_cost

    for arch in ("test_efficientnet", "test_resnet"):
        ref = sum(p.numel() for p in timm.create_model(arch, num_classes=10).parameters())
        cost = student_cost(ModelSpec(arch=arch, input_size=32), 10, torch.device("cpu"))
        assert cost == {STUDENT_PARAMS: float(ref)}
    timed = student_cost(ModelSpec(arch="test_efficientnet", input_size=32), 10, torch.device("cpu"), 4)
    assert timed[STUDENT_LATENCY] > 0 and timed[STUDENT_PARAMS] == 101766.0  # timm's test_efficientnet, 10 classes


def test_multi_objective_searcher_sets_constraints_without_future_warnings() -> None:
    from mlfd.tune.searcher import FAILED_ATTR
    from mlfd.tune.spaces import load_space, make_searcher

    space = load_space(ROOT / "search_spaces" / "students_pareto.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # issue #13: Optuna's current constraint API only
        s = make_searcher(space, [ACC, PARAMS], ["max", "min"], seed=0, constraints={PARAMS: {"le": 2e5}})
        configs = [s.suggest(f"t{i}") for i in range(4)]
        s.on_trial_complete("t0", {ACC: 50.0, PARAMS: 1e5})
        s.on_trial_complete("t1", {ACC: 60.0, PARAMS: 3e5})
        s.on_trial_complete("t2", None, error=True)
        s.on_trial_complete("t3", {ACC: 55.0, PARAMS: 1.5e5})
    assert all("datasets.digits.student_model.arch" in c for c in configs)
    study = s._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.constraints for t in study.trials] == [{"student/params le 200000": -0.5},
                                                     {"student/params le 200000": 0.5}, {FAILED_ATTR: 1.0},
                                                     {"student/params le 200000": -0.25}]
    assert [t.number for t in study.best_trials] == [0, 3]  # Optuna agrees: t1 is infeasible, t2 failed


def test_single_objective_list_is_a_single_objective_study() -> None:
    from mlfd.tune.spaces import load_space, make_searcher

    s = make_searcher(load_space(ROOT / "search_spaces" / "students.yaml"), [ACC], ["max"], seed=0)
    s.suggest("t0")
    assert len(s._ot_study.directions) == 1 and s.metric == ACC


def test_the_independent_front_helper() -> None:
    pts = [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (1.0, 1.0)]
    assert brute_front(pts, ["max", "min"]) == [False, True, False, False]
    assert brute_front(pts[:1] + pts[3:], ["max", "min"]) == [True, True]  # equal points do not dominate


# --------------------------------------------------------------------------------------------------------------------
# Job validation: combinations that cannot work are refused with one line, before any compute
# --------------------------------------------------------------------------------------------------------------------

PARETO_JOB = ROOT / "tune_jobs" / "students_pareto.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["mode=[max]"], "students_pareto.yaml.mode: needs one mode per metric: 2 metrics ['val/acc1', 'student/params'], "
                     "1 modes ['max']"),
    (["mode=[max,mini]"], "students_pareto.yaml.mode[1]: must be max or min, got 'mini'"),
    (["metric=[val/acc1,val/acc1]"], "students_pareto.yaml.metric: names a metric twice: ['val/acc1', 'val/acc1']"),
    (["metric=[acc,student/params]"], "students_pareto.yaml.metric[0]: must be a reported metric such as val/acc1, "
                                      "val/acc5, val/loss, or a student cost (student/params, student/latency_ms); "
                                      "got 'acc'"),
    (["stage=teachers", "studies=null"], "students_pareto.yaml.metric[1]: student/params is reported by students "
                                         "trials only; this job's stage is teachers"),
    (["metric=[val/acc1,student/latency_ms]", "latency_batch_size=null"],
     "students_pareto.yaml.latency_batch_size: required when student/latency_ms is an objective or a constraint: "
     "the batch size latency is measured at"),
    (["constraints={student/params: {lt: 3}}"], "students_pareto.yaml.constraints.student/params.lt: unknown bound; "
                                                "allowed: le, ge"),
    (["constraints={student/params: {le: many}}"], "students_pareto.yaml.constraints.student/params.le: expected a "
                                                   "number, got 'many'"),
    (["metric=[student/params,val/acc1]", "mode=[min,max]", "scheduler.type=asha"],
     "students_pareto.yaml.scheduler.type: asha stops trials on the first objective, student/params, which training "
     "does not change; put a val/ metric first or set scheduler.type: none"),
])
def test_bad_objectives_are_refused_in_one_line(overrides: list[str], message: str) -> None:
    from mlfd.search import load_job

    with pytest.raises(SpecError) as e:
        load_job(PARETO_JOB, overrides=overrides)
    assert str(e.value).endswith(message) and "\n" not in str(e.value)


def test_refused_job_exits_2_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlfd.cli import main

    out = tmp_path / "out"
    assert main(["tune", str(PARETO_JOB), "--smoke", "--out", str(out), "--set", "mode=[max]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlfd: error: ") and "needs one mode per metric" in err[0], err
    assert not out.exists()
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_asha_on_a_val_metric_first_is_allowed() -> None:
    from mlfd.search import load_job

    job, _ = load_job(PARETO_JOB, overrides=["scheduler.type=asha"])
    assert (job.objective, job.objective_mode, job.multi_objective) == ("val/acc1", "max", True)
    assert job.cost_metrics == ["student/params", "student/latency_ms"]


# --------------------------------------------------------------------------------------------------------------------
# The students_pareto smoke search, end to end
# --------------------------------------------------------------------------------------------------------------------

ARCH = "config/datasets.digits.student_model.arch"
TIMM_PARAMS = {"test_efficientnet": 101766, "test_convnext": 207778, "test_resnet": 373658}
"""timm's parameter counts of the space's students with 10 classes (digits), the same as timm.create_model gives."""


@pytest.fixture(scope="module")
def pareto_search(mlfd_cli, offline_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Search:
    out = tmp_path_factory.mktemp("pareto") / "out"
    args = ["tune", str(PARETO_JOB), "--smoke", "--out", str(out), f"--set=store={offline_store}", *tiny(100)]
    run = mlfd_cli(*args, timeout=900)
    assert run.proc.returncode == 0, run.output[-5000:]
    assert not run.cleanup(grace=30), "processes still alive after the search ended"
    s = read_search(out, args)
    s.output = run.output
    return s


@pytest.mark.slow
def test_pareto_columns_and_an_independent_front(pareto_search: Search) -> None:
    df = pareto_search.trials
    assert len(df) == 4 and set(df["study"]) == {"digits"} and (df["status"] == "TERMINATED").all(), df
    for col in ("is_pareto", "feasible", "best/val/acc1", "best/student/params", "best/student/latency_ms"):
        assert col in df.columns, col
    assert df["best/student/params"].tolist() == [float(TIMM_PARAMS[a]) for a in df[ARCH]]
    assert (df["best/student/latency_ms"] > 0).all()
    # The fusion-level condition holds with the architecture choice: beta_2 exists exactly when the level is 2.
    assert (df["config/student.betas.2"].notna() == (df["config/fusion_level"].astype(int) == 2)).all(), df
    assert df["feasible"].tolist() == [TIMM_PARAMS[a] <= 3.0e5 for a in df[ARCH]]
    feasible = df[df["feasible"]]
    points = list(zip(feasible["best/val/acc1"], feasible["best/student/params"]))
    expected = dict(zip(feasible["trial_id"], brute_front(points, ["max", "min"])))
    assert df["is_pareto"].tolist() == [expected.get(t, False) for t in df["trial_id"]]
    assert df["is_pareto"].any()


@pytest.mark.slow
def test_trial_runs_carry_the_pareto_tag_and_costs(pareto_search: Search) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{pareto_search.out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("students-pareto")
    runs = {r.data.tags["mlfd.trial_id"]: r for r in c.search_runs([exp.experiment_id], max_results=100)
            if "mlfd.trial_id" in r.data.tags}
    df = pareto_search.trials
    assert set(runs) == set(df["trial_id"])
    for _, row in df.iterrows():
        r = runs[row["trial_id"]]
        assert r.data.tags["mlfd.pareto"] == ("true" if row["is_pareto"] else "false")
        assert r.data.metrics["student/params"] == row["best/student/params"]


@pytest.mark.slow
def test_report_draws_the_front(pareto_search: Search, tmp_path: Path) -> None:
    from mlfd.report import write_report

    files = write_report(pareto_search.out, tmp_path)
    png = files["search/digits/pareto"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["report"].read_text()
    df = pareto_search.trials
    front = front_order(df[df["is_pareto"]], OBJS)
    section = md[md.index("### Pareto front"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [line.split("|")[2].strip() for line in rows] == front["trial_id"].tolist()


@pytest.mark.slow
def test_export_picks_a_point_of_the_front_or_a_condition(pareto_search: Search, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from mlfd.cli import main
    from mlfd.config import load_pipeline

    df = pareto_search.trials
    front = front_order(df[df["is_pareto"]], OBJS)
    out = str(pareto_search.out)
    for k in range(1, len(front) + 1):
        dest = tmp_path / f"pareto{k}.yaml"
        assert main(["export", out, "--study", "digits", "--pick", f"pareto:{k}", "--out", str(dest)]) == 0
        row = front.iloc[k - 1]
        assert dest.read_text().startswith(f"# Trial {row['trial_id']} (--pick pareto:{k}) of study 'digits'")
        assert load_pipeline(dest).dataset("digits").student_net.arch == row[ARCH]
    smallest = df["best/student/params"].min()
    dest = tmp_path / "small.yaml"
    assert main(["export", out, "--study", "digits", "--pick", f"student/params<={smallest:g}", "--out",
                 str(dest)]) == 0
    small = df[df["best/student/params"] == smallest]
    best_small = small.loc[small["best/val/acc1"].idxmax()]
    assert dest.read_text().startswith(f"# Trial {best_small['trial_id']} (--pick student/params<={smallest:g})")
    capsys.readouterr()
    assert main(["export", out, "--study", "digits", "--pick", f"pareto:{len(front) + 1}", "--out",
                 str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlfd: error: --pick pareto:{len(front) + 1}: the Pareto front of study 'digits' has {len(front)} "
                   f"point(s)"], err
    assert not (tmp_path / "x.yaml").exists()


def test_report_of_a_search_without_the_columns_computes_the_front(tmp_path: Path) -> None:
    """A trials.parquet without is_pareto/feasible (written by hand, or by an older mlfd): the report computes them
    from search.json's objectives and constraints."""
    from mlfd.report import write_report
    from mlfd.search import SearchPlan, load_job

    df = trials([("a", "TERMINATED", 90.0, 3e5), ("b", "TERMINATED", 80.0, 1e5), ("c", "TERMINATED", 85.0, 2e5),
                 ("d", "TERMINATED", 70.0, 2.5e5), ("e", "TERMINATED", 95.0, 4e5)])
    df.to_parquet(tmp_path / "trials.parquet")
    job, _ = load_job(PARETO_JOB, overrides=["constraints={student/params: {le: 3.5e+5}}"])
    SearchPlan(job=job, pipeline={}, studies=["digits"], job_file=str(PARETO_JOB), pipeline_file="", space_file="",
               storage_path=str(tmp_path / "ray"), store=str(tmp_path / "store"),
               tracking_uri="sqlite:///unused.db").save(tmp_path)
    files = write_report(tmp_path)
    md = files["report"].read_text()
    section = md[md.index("### Pareto front"):]
    assert "constraints: student/params le 350000" in section
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ")][1:]  # after the header
    assert [(k.strip(), t.strip()) for k, t in rows] == [("1", "a"), ("2", "c"), ("3", "b")]  # e is infeasible
    assert files["search/digits/pareto"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_asha_stops_trials_on_the_first_objective(mlfd_cli, offline_store: Path, tmp_path: Path) -> None:
    """The same job with ASHA (grace period 1): Ray's scheduler takes the first objective while Optuna's
    multi-objective searcher gets both; the front is drawn from the trials that ran every epoch."""
    out = tmp_path / "asha"
    args = ["tune", str(PARETO_JOB), "--smoke", "--out", str(out), f"--set=store={offline_store}", *tiny(100),
            "--set=scheduler.type=asha", "--set=scheduler.grace_period=1", "--set=seed=5"]
    run = mlfd_cli(*args, timeout=900)
    assert run.proc.returncode == 0, run.output[-5000:]
    assert not run.cleanup(grace=30), "processes still alive after the search ended"
    assert "mlfd tune: asha stops trials on the first objective (max val/acc1) only" in run.output
    df = read_search(out, args).trials
    assert len(df) == 4 and set(df["status"]) <= {"TERMINATED", "STOPPED"}, df
    assert (df["epochs"] == 3).tolist() == (df["status"] == "TERMINATED").tolist()
    assert (df["status"] == "TERMINATED").any() and df["is_pareto"].any()
    full = df[(df["status"] == "TERMINATED") & df["feasible"]]
    expected = dict(zip(full["trial_id"], brute_front(list(zip(full["best/val/acc1"], full["best/student/params"])),
                                                      ["max", "min"])))
    assert df["is_pareto"].tolist() == [expected.get(t, False) for t in df["trial_id"]]
