"""Tests of mlfd.report: tables equal the parquet numbers, plots are real PNGs, search importances, errors."""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlfd.config import SpecError
from mlfd.search import JobSpec, SearchPlan
from mlfd.report import SearchInfo, add_report_parser, order_trials, top_trials_table, write_report
from mlfd.stages.results import aggregate_results

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["digits", "mnist"]
SEEDS = [0, 1]
MODELS = [("dataset_specific", "-"), ("multi_head", "-"), ("joint_head", "-"), ("joint_teacher", "L1"),
          ("joint_teacher", "L2"), ("student", "L1"), ("student", "L2"), ("student_own_teacher", "L1"),
          ("student_no_kd", "L1")]
TITLES = {"dataset_specific": "Dataset-specific models", "multi_head": "Multi-head model",
          "joint_head": "Joint-head model", "joint_teacher": "Joint teacher", "student": "Students",
          "student_own_teacher": "Students, own teacher only (control)",
          "student_no_kd": "Students, KD weight 0 (control)"}
ROLE_OF_TITLE = {v: k for k, v in TITLES.items()}


def make_results(seeds: list[int] = SEEDS) -> pd.DataFrame:
    rng = random.Random(0)
    rows = []
    for seed in seeds:
        for role, lv in MODELS:
            for d in DATASETS:
                for split in ("val", "test"):
                    acc1 = rng.uniform(40, 90)
                    rows.append({"dataset": d, "role": role, "levels": lv, "split": split, "acc1": acc1,
                                 "acc5": min(100.0, acc1 + rng.uniform(5, 10)), "epochs": 3, "seed": seed})
    return pd.DataFrame(rows)


def make_curves() -> pd.DataFrame:
    rng = random.Random(1)
    rows = []
    for _seed in SEEDS:
        for role, lv in [m for m in MODELS if m[0] in ("dataset_specific", "joint_teacher", "student")]:
            for d in DATASETS:
                for epoch in (1, 2, 3):
                    for metric in ("val/acc1", "val/acc5", "val/loss"):
                        rows.append({"dataset": d, "role": role, "levels": lv, "epoch": epoch, "metric": metric,
                                     "value": rng.uniform(30, 90)})
        for epoch in (1, 2, 3):
            rows.append({"dataset": "all", "role": "joint_teacher", "levels": "L1", "epoch": epoch,
                         "metric": "train/loss", "value": 1.0 / epoch})
    return pd.DataFrame(rows)


# Ray trial ids are random hex: their trailing digits (9, 8, 7, ...) run against the creation order (trial_index).
TRIAL_IDS = {"digits": ["a1b2c3d9", "0f9e8d78", "77aa3bc7", "5d4e3f26", "c0ffee15", "deadbe04", "b16b00b3"],
             "mnist": ["9c8b7a62", "1e2d3c41"]}


def make_trials() -> pd.DataFrame:
    rng = random.Random(2)
    rows = []
    for study, n in (("digits", 7), ("mnist", 2)):
        for i in range(n):
            level = [1, 2][i % 2]
            status = "ERROR" if (study == "digits" and i == 3) else ("STOPPED" if i == 5 else "TERMINATED")
            value = float("nan") if status == "ERROR" else 50 + 10 * level + rng.uniform(0, 5)
            rows.append({"study": study, "trial_id": TRIAL_IDS[study][i], "trial_index": i + 1, "status": status,
                         "epochs": 3,
                         "final/val/acc1": value - 1, "best/val/acc1": value,
                         "error": "RuntimeError: nan loss" if status == "ERROR" else "", "path": f"/tmp/t{i}",
                         "config/fusion_level": level, "config/student.alpha": rng.uniform(0, 1),
                         "config/student.betas.2": rng.uniform(0, 1) if level >= 2 else float("nan"),
                         "config/joint.dropout": rng.uniform(0.5, 0.95),
                         "config/student.temperature": rng.uniform(1.0, 8.0)})
    # Shuffle the file order: the history must sort by trial_index.
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def write_run(d: Path, results: pd.DataFrame | None = None, curves: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (results if results is not None else make_results()).to_parquet(d / "results.parquet", index=False)
    if curves:
        make_curves().to_parquet(d / "curves.parquet", index=False)
    return d


def write_search(d: Path, space_file: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    make_trials().to_parquet(d / "trials.parquet", index=False)
    space = space_file if space_file is not None else str(ROOT / "search_spaces" / "students.yaml")
    pipeline = str(ROOT / "pipelines" / "offline_default.yaml")
    SearchPlan(job=JobSpec(pipeline=pipeline, space=space, metric="val/acc1", mode="max"), pipeline={},
               studies=["mnist"], job_file=str(ROOT / "tune_jobs" / "quickstart.yaml"), pipeline_file=pipeline,
               space_file=space, storage_path=str(d / "ray"), store=str(d / "store"),
               tracking_uri=f"sqlite:///{d / 'mlflow.db'}").save(d)
    return d


def section(md: str, heading: str) -> list[str]:
    """Lines of the first Markdown section whose heading line starts with ``heading`` (up to the next heading)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    out = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        out.append(line)
    return out


def parse_table(lines: list[str]) -> list[dict[str, str]]:
    """The first Markdown table in ``lines`` as a list of {header: cell}."""
    rows = [line for line in lines if line.startswith("|")]
    split = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    header, body = split[0], split[2:]
    return [dict(zip(header, r)) for r in body]


def parse_cell(cell: str) -> tuple[float, float | None, int]:
    """``mean ± std (n=k)`` -> (mean, std, k); a one-seed ``mean`` -> (mean, None, 1)."""
    m = re.fullmatch(r"(-?[0-9.]+) ± ([0-9.]+) \(n=([0-9]+)\)", cell)
    if m:
        return float(m[1]), float(m[2]), int(m[3])
    return float(cell), None, 1


def expected(df: pd.DataFrame, d: str, role: str, lv: str, split: str, k: str) -> tuple[float, float, int]:
    m = df[(df["dataset"] == d) & (df["role"] == role) & (df["levels"] == lv) & (df["split"] == split)]
    vals = m.groupby("seed")[k].mean().to_numpy()
    return float(vals.mean()), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], str]:
    d = tmp_path_factory.mktemp("run")
    write_run(d)
    write_search(d)
    out = d / "report"
    files = write_report(d, out)
    return d, files, (out / "report.md").read_text()


def test_files_are_written_and_pngs_are_images(report: tuple[Path, dict[str, Path], str]) -> None:
    d, files, _ = report
    expected_names = {"report", "ablation", "curves/digits", "curves/mnist", "curves/joint_teachers",
                      "search/digits/history", "search/digits/importances", "search/mnist/history"}
    assert expected_names <= set(files)
    assert "search/mnist/importances" not in files  # 2 trials: skipped
    for name, path in files.items():
        assert path.is_file() and path.stat().st_size > 0 and path.parent == d / "report", name
        if path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    md = files["report"].read_text()
    for path in files.values():
        if path.suffix == ".png":
            assert f"]({path.name})" in md  # linked relative to report.md


def test_results_table_is_mean_and_std_over_seeds(report: tuple[Path, dict[str, Path], str]) -> None:
    d, _, md = report
    df = pd.read_parquet(d / "results.parquet")
    rows = parse_table(section(md, "## Results"))
    assert [(ROLE_OF_TITLE[r["Model"]], r["Levels"]) for r in rows] == MODELS
    checked = 0
    for r in rows:
        role, lv = ROLE_OF_TITLE[r["Model"]], r["Levels"]
        for dset in DATASETS:
            for split in ("val", "test"):
                for k in (1, 5):
                    mean, std, cell_n = parse_cell(r[f"{dset} {split} acc@{k}"])
                    e_mean, e_std, n = expected(df, dset, role, lv, split, f"acc{k}")
                    assert n == cell_n == 2
                    assert mean == pytest.approx(round(e_mean, 2), abs=1e-9)
                    assert std == pytest.approx(round(e_std, 2), abs=1e-9)
                    checked += 1
    assert checked == len(MODELS) * len(DATASETS) * 4


def test_aggregate_ignores_duplicate_rows_of_one_seed() -> None:
    df = pd.DataFrame([
        {"dataset": "a", "role": "student", "levels": "L1", "split": "val", "acc1": 10.0, "acc5": 20.0, "seed": 0},
        {"dataset": "a", "role": "student", "levels": "L1", "split": "val", "acc1": 20.0, "acc5": 30.0, "seed": 0},
        {"dataset": "a", "role": "student", "levels": "L1", "split": "val", "acc1": 45.0, "acc5": 55.0, "seed": 1},
    ])
    agg = aggregate_results(df).iloc[0]
    assert agg["n_seeds"] == 2
    assert agg["acc1_mean"] == pytest.approx(30.0)  # seed 0 -> 15, seed 1 -> 45
    assert agg["acc1_std"] == pytest.approx(np.std([15.0, 45.0], ddof=1))


def test_single_seed_table_is_the_pipeline_table(tmp_path: Path) -> None:
    df = make_results(seeds=[3])
    write_run(tmp_path, df, curves=False)
    md = write_report(tmp_path)["report"].read_text()
    assert "±" not in "\n".join(section(md, "## Results"))
    rows = parse_table(section(md, "## Results"))
    for r in rows:
        for dset in DATASETS:
            e_mean, _, _ = expected(df, dset, ROLE_OF_TITLE[r["Model"]], r["Levels"], "test", "acc1")
            assert float(r[f"{dset} test acc@1"]) == pytest.approx(round(e_mean, 2), abs=1e-9)


def test_delta_table_is_student_minus_dataset_specific(report: tuple[Path, dict[str, Path], str]) -> None:
    d, _, md = report
    df = pd.read_parquet(d / "results.parquet")
    rows = parse_table(section(md, "### Students vs dataset-specific"))
    per = [r for r in rows if r["Dataset"] in DATASETS]
    assert len(per) == len(DATASETS) * 2 * 2  # datasets x levels x splits
    deltas: dict[tuple[str, str], list[float]] = {}
    for r in per:
        st, _, _ = expected(df, r["Dataset"], "student", r["Levels"], r["Split"], "acc1")
        ds, _, _ = expected(df, r["Dataset"], "dataset_specific", "-", r["Split"], "acc1")
        assert parse_cell(r["Student acc@1"])[0] == pytest.approx(round(st, 2), abs=1e-9)
        assert parse_cell(r["Dataset-specific acc@1"])[0] == pytest.approx(round(ds, 2), abs=1e-9)
        assert float(r["Δ acc@1"]) == pytest.approx(round(st - ds, 2), abs=1e-9)
        deltas.setdefault((r["Levels"], r["Split"]), []).append(st - ds)
    means = [r for r in rows if r["Dataset"].startswith("mean")]
    assert len(means) == 4
    for r in means:
        assert float(r["Δ acc@1"]) == pytest.approx(round(float(np.mean(deltas[(r["Levels"], r["Split"])])), 2))


def test_ablation_table_per_level(report: tuple[Path, dict[str, Path], str]) -> None:
    d, _, md = report
    df = pd.read_parquet(d / "results.parquet")
    rows = parse_table(section(md, "## Fusion-level ablation"))
    keys = [(ROLE_OF_TITLE[r["Model"]], r["Levels"]) for r in rows]
    assert keys == [("dataset_specific", "-"), ("joint_teacher", "L1"), ("joint_teacher", "L2"), ("student", "L1"),
                    ("student", "L2")]
    for r, (role, lv) in zip(rows, keys):
        for dset in DATASETS:
            for split in ("val", "test"):
                e_mean, e_std, n = expected(df, dset, role, lv, split, "acc1")
                assert parse_cell(r[f"{dset} {split} acc@1"]) == (pytest.approx(round(e_mean, 2)),
                                                                   pytest.approx(round(e_std, 2)), n)


def test_search_sections(report: tuple[Path, dict[str, Path], str]) -> None:
    d, _, md = report
    trials = pd.read_parquet(d / "trials.parquet")
    digits = trials[trials["study"] == "digits"]
    imp = parse_table(_after(md, "## Search: study digits", "### Parameter importances"))
    names = {r["Param"] for r in imp}
    # betas.2 is conditional (absent when fusion_level = 1): not in every trial, so not assessed.
    assert names == {"fusion_level", "student.alpha", "joint.dropout", "student.temperature"}
    assert sum(float(r["Importance"]) for r in imp) == pytest.approx(1.0, abs=0.01)
    assert imp[0]["Param"] == "fusion_level"  # the fixture's value is 50 + 10 * level + noise
    top = parse_table(_after(md, "## Search: study digits", "### Top"))
    ok = digits[digits["status"] != "ERROR"].sort_values("best/val/acc1", ascending=False)
    assert len(top) == len(digits)
    assert [r["trial_id"] for r in top[:len(ok)]] == ok["trial_id"].tolist()
    assert float(top[0]["best/val/acc1"]) == pytest.approx(float(f"{ok['best/val/acc1'].iloc[0]:.4g}"))
    assert top[-1]["status"] == "ERROR" and top[-1]["best/val/acc1"] == ""
    assert "failed trial 5d4e3f26: RuntimeError: nan loss" in md
    mnist = "\n".join(_after(md, "## Search: study mnist", "### Parameter importances"))
    assert "skipped: 2 completed trial(s)" in mnist


def test_trials_are_ordered_by_their_creation_index_not_their_id() -> None:
    """The history plot and the "#" column follow trial_index (Ray's creation counter, in trials.parquet), whatever
    the file order and the digits the random hex ids end with; a table without the column keeps its file order."""
    digits = make_trials().query("study == 'digits'")
    assert digits["trial_id"].tolist() != TRIAL_IDS["digits"]  # shuffled in the file
    assert order_trials(digits)["trial_id"].tolist() == TRIAL_IDS["digits"]
    info = SearchInfo(metric="val/acc1", mode="max", value_column="best/val/acc1", space_file=None)
    top = parse_table(top_trials_table(digits, info).splitlines())
    assert {r["trial_id"]: int(r["#"]) for r in top} == {t: i + 1 for i, t in enumerate(TRIAL_IDS["digits"])}
    old = digits.drop(columns="trial_index")
    assert order_trials(old)["trial_id"].tolist() == old["trial_id"].tolist()
    partly = digits.assign(trial_index=[None if t == "c0ffee15" else i for t, i in zip(digits["trial_id"],
                                                                                         digits["trial_index"])])
    assert order_trials(partly)["trial_id"].tolist() == [t for t in TRIAL_IDS["digits"] if t != "c0ffee15"] + \
        ["c0ffee15"]


def _after(md: str, study_heading: str, sub_heading: str) -> list[str]:
    """Lines of ``sub_heading``'s section inside the study section ``study_heading``."""
    lines = md.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(study_heading)))
    sub = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(sub_heading))
    out = []
    for line in lines[sub + 1:]:
        if line.startswith("#"):
            break
        out.append(line)
    return out


def test_search_without_space_file_infers_distributions(tmp_path: Path) -> None:
    write_search(tmp_path, space_file=str(tmp_path / "gone.yaml"))
    files = write_report(tmp_path)
    assert set(files) >= {"report", "search/digits/history", "search/digits/importances"}
    assert not any(k.startswith(("curves", "ablation")) for k in files)
    md = files["report"].read_text()
    assert "gone.yaml not found" in md
    assert len(parse_table(_after(md, "## Search: study digits", "### Parameter importances"))) == 4


def test_importances_skipped_with_one_varying_param(tmp_path: Path) -> None:
    t = make_trials()
    for c in ("config/student.alpha", "config/joint.dropout", "config/student.temperature"):
        t[c] = 0.5
    tmp_path.joinpath("search").mkdir()
    t.to_parquet(tmp_path / "search" / "trials.parquet", index=False)
    files = write_report(tmp_path / "search")
    assert "search/digits/importances" not in files
    md = files["report"].read_text()
    assert "skipped: 1 param(s) vary" in "\n".join(_after(md, "## Search: study digits", "### Parameter"))


def test_missing_or_empty_dir_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"no-such-dir: no such directory; expected .*results\.parquet"):
        write_report(tmp_path / "no-such-dir")
    with pytest.raises(SpecError, match=r"nothing to report; expected results\.parquet.*trials\.parquet"):
        write_report(tmp_path)
    (tmp_path / "results.parquet").write_bytes(b"not parquet")
    with pytest.raises(SpecError, match=r"results\.parquet: not a readable parquet file"):
        write_report(tmp_path)
    pd.DataFrame({"dataset": ["a"]}).to_parquet(tmp_path / "results.parquet")
    with pytest.raises(SpecError, match=r"results\.parquet: missing columns \['role'"):
        write_report(tmp_path)


def test_cli_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="mlfd")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    write_run(tmp_path / "run", curves=False)
    args = parser.parse_args(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "ablation_levels.png").is_file()
    assert "report:" in capsys.readouterr().out
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    with pytest.raises(SpecError):
        args.func(args)
