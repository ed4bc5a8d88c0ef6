"""``mlfd tune JOB --plan`` and the search's price (mlfd/tune/price.py): the scheduler arithmetic against hand-computed
values and against Ray's own ASHA bookkeeping, concurrency and list scheduling, bad input, and (slow) the estimate of
the smoke quickstart against its real wall time."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI_ENV, ROOT

from mlfd.search import SchedulerSpec
from mlfd.tune.price import (SearchPrice, asha_continue_probability, asha_rungs, asha_trial_epochs, concurrency,
                             expected_levels, expected_trial_epochs, hyperband_trial_epochs, makespan, read_price)

JOB = ROOT / "tune_jobs" / "quickstart.yaml"


# --------------------------------------------------------------------------------------------------------------------
# Scheduler arithmetic
# --------------------------------------------------------------------------------------------------------------------


def test_asha_rungs_are_rays_milestones_below_max_t() -> None:
    assert asha_rungs(1, 2, 3) == [1, 2]
    assert asha_rungs(4, 2, 15) == [4, 8]
    assert asha_rungs(1, 3, 9) == [1, 3]  # the rung at 9 = max_t stops nothing early
    assert asha_rungs(5, 2, 3) == []  # grace above max_t: Ray's grace becomes max_t (launch._scheduler)


def test_asha_continue_probability_by_hand() -> None:
    # m values recorded; cutoff = the (1 - 1/rf) quantile; the new value's rank is uniform over m + 1 places.
    assert asha_continue_probability(0, 2) == 1.0
    assert asha_continue_probability(1, 2) == pytest.approx(1 / 2)  # above the one value
    assert asha_continue_probability(2, 2) == pytest.approx(1 / 2)  # above the mean of two: (2 - 0.5) / 3
    assert asha_continue_probability(3, 3) == pytest.approx(5 / 12)  # (3 - 2/3 * 2) / 4
    assert asha_continue_probability(10_000, 4) == pytest.approx(1 / 4, abs=1e-3)


def test_asha_expected_epochs_by_hand() -> None:
    # 3 trials, grace 1, rf 2, max_t 3 (the smoke quickstart): rungs 1, 2.
    # trial 1 continues everywhere: 3. trial 2: 1 + 1/2 (passes rung 1 over one value) + 1/4 = 1.75.
    # trial 3: 1 + 1/2 (two values at rung 1) + 1/2 * 1/2 (rung 2 holds 1 or 2 values, p = 1/2 either way) = 1.75.
    assert asha_trial_epochs(3, 1, 2, 3) == pytest.approx([3.0, 1.75, 1.75])
    assert sum(expected_trial_epochs(SchedulerSpec("asha", 1, 2), 3, 3)) == pytest.approx(6.5)
    # 2 trials, grace 1, rf 2, max_t 4: rungs 1, 2; trial 2: 1 + 1/2 + 1/4 * 2 = 2.
    assert asha_trial_epochs(2, 1, 2, 4) == pytest.approx([4.0, 2.0])
    # Many trials: synchronous successive halving's n (1 + 1/2 + 2/4 + 4/8 + 8/16) = 3 epochs per trial.
    assert sum(asha_trial_epochs(2000, 1, 2, 16)) / 2000 == pytest.approx(3.0, abs=0.01)


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


@pytest.mark.parametrize("n, grace, rf, max_t", [(3, 1, 2, 3), (6, 1, 2, 8), (8, 2, 3, 9)])
def test_asha_expected_epochs_match_rays_bracket(n: int, grace: int, rf: int, max_t: int) -> None:
    """Ray's own ASHA bookkeeping (``_Bracket.on_result``) fed i.i.d. random metrics, trials in creation order:
    the mean trial-epochs over many repetitions is the formula's."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    rng = random.Random(0)
    reps, total = 4000, 0
    for _ in range(reps):
        bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
        for j in range(n):
            trial = _Trial(str(j))
            for t in range(1, max_t + 1):
                total += 1
                if t < max_t and bracket.on_result(trial, t, rng.random()) == TrialScheduler.STOP:
                    break
    assert total / reps == pytest.approx(sum(asha_trial_epochs(n, grace, rf, max_t)), rel=0.02)


def test_hyperband_and_fifo_by_hand() -> None:
    # eta 2, max_t 4: S = round(log2 4) + 1 = 3 brackets per band.
    # s=0: n0 = 3 trials x 4 epochs = 12. s=1: n0 = ceil(3/2 * 2) = 3 at r0 = 2 (6), halving keeps ceil(3/2) = 2
    # to 4 epochs (+4): 10. s=2: n0 = ceil(3/3 * 4) = 4 at r0 = 1; 3 trials (3), keep min(3, 2) to 2 (+2), keep 1 to
    # 4 (+2): 7. In all 29.
    per = hyperband_trial_epochs(9, 2, 4)
    assert per == pytest.approx([4, 4, 4, 10 / 3, 10 / 3, 10 / 3, 7 / 3, 7 / 3, 7 / 3])
    assert sum(expected_trial_epochs(SchedulerSpec("hyperband", 1, 2), 9, 4)) == pytest.approx(29)
    assert expected_trial_epochs(SchedulerSpec("none"), 6, 15) == [15.0] * 6


def test_concurrency_and_list_scheduling() -> None:
    assert concurrency(2, cpus=2, gpus=0, trial_cpu=1, trial_gpu=0, num_samples=3) == 2
    assert concurrency(2, cpus=2, gpus=0, trial_cpu=1, trial_gpu=0, num_samples=1) == 1
    assert concurrency(8, cpus=16, gpus=1, trial_cpu=1, trial_gpu=0.25, num_samples=10) == 4  # the GPU limits
    assert concurrency(None, cpus=6, gpus=0, trial_cpu=2, trial_gpu=0, num_samples=10) == 3  # the CPUs limit
    assert concurrency(4, cpus=1, gpus=0, trial_cpu=2, trial_gpu=0, num_samples=10) == 1  # at least one
    assert makespan([3, 3, 3], 2) == 6
    assert makespan([5, 1, 1, 1], 2) == 5
    assert makespan([], 2) == 0
    assert expected_levels([1, 2, 3, 4], [2], 0) == 1
    assert expected_levels([1, 2, 3, 4], [2], 1) == pytest.approx(1.75)  # one draw: a new level 3 times in 4


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--json", "x.json"], "--json: writes the estimate of --plan; add --plan"),
    (["--plan", "--resume"], "--plan: prices a new local search; drop --resume"),
    (["--plan", "--set=scheduler.reduction_factor=1"], "scheduler.reduction_factor: must be >= 2, got 1"),
])
def test_bad_plan_input_is_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture,
                                           tmp_path: Path) -> None:
    from mlfd.cli import main

    assert main(["tune", str(JOB), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_price_json_round_trip(tmp_path: Path) -> None:
    """What OUT/price.json holds reads back as the same estimate; an unreadable file reads as none."""
    from mlfd.tune.price import StagePrice, StudyPrice, write_price

    p = SearchPrice("job.yaml", "students", "cpu", 1, "FIFO", 2.0, 0.0, 1.0, 0.0, "CPU-hours", {"a": 1},
                    {"driver_start": 1.0, "pricing": 2.0, "ray_start": 12.0, "teachers": 3.0, "worker_start": 4.0,
                     "study_overhead": 4.0},
                    [StagePrice("teacher a", "search", False, 0.5, 3, 1.5)],
                    [StudyPrice("a", [StagePrice("trial (students a)", "trial", False, 0.2, 3, 0.6)], 2, 6.0, 0.2, 2,
                                [5.0, 5.0], 9.0, 0.003)], 30.0, 0.004, 7.0)
    write_price(p, tmp_path / "price.json", {"total_s": 31.0})
    back, measured = read_price(tmp_path)
    assert back == p and measured == {"total_s": 31.0}
    (tmp_path / "price.json").write_text("{not json")
    assert read_price(tmp_path) == (None, None)


# --------------------------------------------------------------------------------------------------------------------
# The smoke quickstart: --plan, then the real search against its estimate
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_prints_the_price_without_ray(tmp_path: Path) -> None:
    """`mlfd tune --plan`: the stages to build, per-epoch seconds, trial-epochs (ASHA: 6.5 of FIFO's 9 per study),
    concurrency and totals; no trial, nothing written to --out."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mlfd.cli", "tune", str(JOB), "--smoke", "--plan", "--out", str(out),
                           "--json", str(tmp_path / "price.json")], capture_output=True, text=True, env=CLI_ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for stage in ("teacher mnist", "mnist: caches L2", "mnist: joint teacher L2", "digits: trial (students digits)"):
        assert re.search(rf"^{re.escape(stage)}\s+\w+\s+build", text, re.M), text
    for study in ("mnist", "fashion", "digits"):
        assert re.search(rf"^{study}\s+3\s+6\.50\s+2\s", text, re.M), text
    assert "expected wall time " in text and "CPU-hours" in text
    assert not out.exists()  # nothing claimed: no search.json, no Ray storage, no store
    price, _ = read_price(tmp_path)
    assert price is not None and [s.study for s in price.studies] == ["mnist", "fashion", "digits"]
    assert price.threads == 1 and price.overheads["pricing"] == 0.0


@pytest.mark.slow
def test_smoke_quickstart_lands_within_2x_of_its_estimate(mlfd_cli, tmp_path: Path) -> None:
    """The real smoke quickstart (real Ray, real trials): its wall time is within a factor of 2 of the estimate it
    saved at launch, and `mlfd report` shows both."""
    out = tmp_path / "out"
    t0 = time.monotonic()
    run = mlfd_cli("tune", str(JOB), "--smoke", "--price", "--out", str(out), timeout=1200)
    wall = time.monotonic() - t0
    assert run.proc.returncode == 0, run.output[-5000:]
    price, measured = read_price(out)
    assert price is not None and measured is not None, run.output[-3000:]
    assert measured["total_s"] == pytest.approx(wall, abs=10.0)  # the process's age at the end: the command's wall
    ratio = wall / price.wall_s
    print(f"smoke quickstart: estimate {price.wall_s:.0f} s, real {wall:.0f} s, ratio {ratio:.2f}")
    assert 0.5 <= ratio <= 2.0, (price.wall_s, wall, json.dumps(measured))
    assert set(measured["studies"]) == {"mnist", "fashion", "digits"}
    report = mlfd_cli("report", str(out), timeout=300)
    assert report.proc.returncode == 0, report.output[-3000:]
    md = (out / "report.md").read_text()
    assert "## Price: estimate vs measured" in md
    total = next(ln for ln in md.splitlines() if ln.startswith("| **total**"))
    assert f"| {measured['total_s'] / price.wall_s:.2f} |" in total, total


def test_report_puts_the_estimate_beside_the_measured_times(tmp_path: Path) -> None:
    """The report's price section: one row per part and study, measured / estimate ratios, the trial-epochs that ran;
    nothing without OUT/price.json."""
    import pandas as pd

    from mlfd.report.price import price_section
    from mlfd.tune.price import StudyPrice, write_price

    assert price_section(tmp_path) == []
    over = {"driver_start": 10.0, "pricing": 20.0, "ray_start": 11.0, "teachers": 30.0, "worker_start": 5.0,
            "study_overhead": 5.0}
    studies = [StudyPrice(s, [], 3, 6.5, 0.5, 2, [10.0, 10.0, 5.0], 40.0, 0.01) for s in ("a", "b")]
    price = SearchPrice("q.yaml", "students", "cpu", 1, "ASHA", 2.0, 0.0, 1.0, 0.0, "CPU-hours", {}, over, [],
                        studies, 151.0, 0.02, 25.0)
    measured = {"ray_start_s": 9.0, "ray_stop_s": 2.0, "teachers_s": 45.0, "total_s": 302.0,
                "studies": {"a": {"wall_s": 60.0, "fit_s": 55.0}, "b": {"wall_s": 80.0, "fit_s": 76.0}}}
    write_price(price, tmp_path / "price.json", measured)
    trials = pd.DataFrame({"study": ["a", "a", "a", "b", "b", "b"], "epochs": [3, 2, 1, 3, 3, 1]})
    md = "\n".join(price_section(tmp_path, trials))
    assert "| driver start, pricing and the rest | 0:00:30 | 0:01:46 | 3.53 |" in md  # 302 - 9 - 2 - 45 - 140 = 106
    assert "| Ray start and stop | 0:00:11 | 0:00:11 | 1.00 |" in md
    assert "| teacher prebuild | 0:00:30 | 0:00:45 | 1.50 |" in md
    assert "| study a (3 trials, 2 at once; trial-epochs 6.5 expected, 6 ran) | 0:00:40 | 0:01:00 | 1.50 |" in md
    assert "| study b (3 trials, 2 at once; trial-epochs 6.5 expected, 7 ran) | 0:00:40 | 0:01:20 | 2.00 |" in md
    assert "| **total** (the `mlfd tune` command) | 0:02:31 | 0:05:02 | 2.00 |" in md


def test_price_at_launch_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--price`` is the default; ``--no-price`` or MLFD_TUNE_PRICE=0 (what the test suite sets) turn it off."""
    from mlfd.cli import PRICE_ENV, build_parser

    monkeypatch.delenv(PRICE_ENV, raising=False)
    assert build_parser().parse_args(["tune", str(JOB)]).price is True
    assert build_parser().parse_args(["tune", str(JOB), "--no-price"]).price is False
    monkeypatch.setenv(PRICE_ENV, "0")
    assert build_parser().parse_args(["tune", str(JOB)]).price is False
    assert build_parser().parse_args(["tune", str(JOB), "--price"]).price is True
