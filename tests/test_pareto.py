"""Multi-objective searches: the Pareto front, constraints, ``--pick``, student costs and the searcher (fast), and the
``tune_jobs/students_pareto.yaml`` smoke search end to end (slow: Ray, MLflow, the CLI).

The front of the end-to-end test is computed again here, independently of :mod:`mlfd.stages.pareto`, by pairwise
comparison of the trials' values.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from mlfd.config import SpecError
from mlfd.stages.pareto import (Objective, Pick, feasible_mask, front_order, non_dominated, objectives, parse_pick,
                                pareto_mask, pick_row, violations)

ACC, PARAMS = "val/acc1", "student/params"
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

    from conftest import ROOT

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

    from conftest import ROOT

    s = make_searcher(load_space(ROOT / "search_spaces" / "students.yaml"), [ACC], ["max"], seed=0)
    s.suggest("t0")
    assert len(s._ot_study.directions) == 1 and s.metric == ACC


def test_the_independent_front_helper() -> None:
    pts = [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (1.0, 1.0)]
    assert brute_front(pts, ["max", "min"]) == [False, True, False, False]
    assert brute_front(pts[:1] + pts[3:], ["max", "min"]) == [True, True]  # equal points do not dominate
