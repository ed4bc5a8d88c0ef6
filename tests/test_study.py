"""Persistent Optuna studies (mlfd/tune/study.py), ``mlfd tune --extend`` and ``--warm-start``.

Without Ray (fast): the searcher writes each told trial to the persistent study once, also across a save/restore of
the searcher as Ray does it on ``--resume``; earlier trials are fitted to a new space, the misfits named; a seeded
sampler proposes something else than a cold one with the same seed; misuse of the flags exits 2 before compute.

With Ray (slow, one module fixture): a smoke search, ``--extend 2`` of it, ``--resume`` of the finished search, and a
``--warm-start`` of a new search over a narrower space: trial counts, no trial twice (trials.parquet, the Optuna
study, MLflow), the extension and the warm start reaching the sampler (their first proposal is the one an in-process
sampler seeded with the earlier trials makes, and not the cold one), ``optuna-dashboard`` serving the studies, and
``mlfd report`` reading them.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, one_line_error, read_search

from mlfd.config import SpecError
from mlfd.tune.spaces import load_space, make_searcher
from mlfd.tune.study import (RAY_TRIAL_ATTR, SEEDED_ATTR, StudyRecord, load_study, read_study, redact_url,
                             seed_trials, study_names)

JOB = ROOT / "tune_jobs" / "quickstart.yaml"
SPACE = ROOT / "search_spaces" / "students.yaml"


def narrow_space(tmp_path: Path, high: float = 0.5) -> Path:
    """The students space with alpha in [0, high] instead of [0, 1]."""
    text = SPACE.read_text()
    old = "student.alpha: {type: float, low: 0.0, high: 1.0}"
    assert old in text
    p = tmp_path / f"space-alpha-{high}.yaml"
    p.write_text(text.replace(old, f"student.alpha: {{type: float, low: 0.0, high: {high}}}"))
    return p


def run_trials(searcher, ids: list[str], values: list[float | None]) -> list[dict]:
    """Ask the searcher for each trial, then tell it the value (None: the trial failed), as Ray Tune does."""
    configs = [searcher.suggest(t) for t in ids]
    for t, v in zip(ids, values):
        if v is None:
            searcher.on_trial_complete(t, error=True)
        else:
            searcher.on_trial_result(t, {"val/acc1": v, "training_iteration": 1})
            searcher.on_trial_complete(t, result={"val/acc1": v, "training_iteration": 1})
    return configs


# --------------------------------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------------------------------


def test_each_told_trial_is_recorded_once_across_save_and_restore(tmp_path: Path) -> None:
    """The searcher writes every trial it was told about, with its Ray trial id, state and value; restored from a
    save taken before a trial ended (what Tune.restore does after a killed driver), the trial ends again and is not
    recorded twice."""
    url, name = f"sqlite:///{tmp_path / 'optuna.db'}", "job-digits"
    space = load_space(SPACE)
    searcher = make_searcher(space, "val/acc1", "max", seed=0, study_name=name, record=StudyRecord(url, name))
    run_trials(searcher, ["t1", "t2"], [50.0, None])
    saved = pickle.dumps(searcher)  # Ray's searcher checkpoint: t3 asked, not told
    run_trials(searcher, ["t3"], [61.0])
    restored = pickle.loads(saved)  # the driver was killed; --resume restores the searcher and reruns t3
    restored.suggest("t3")
    restored.on_trial_complete("t3", result={"val/acc1": 61.0, "training_iteration": 1})
    assert restored.record() == 0
    st = load_study(url, name)
    got = [(t.user_attrs[RAY_TRIAL_ATTR], t.state.name, t.value, t.user_attrs.get("mlfd_failed")) for t in st.trials]
    assert got == [("t1", "COMPLETE", 50.0, None), ("t2", "PRUNED", None, True), ("t3", "COMPLETE", 61.0, None)]
    assert st.trials[1].system_attrs == {"constraints:mlfd_failed": 1.0}  # failed: infeasible, as the sampler saw it
    assert study_names(url) == [name]


def test_earlier_trials_that_do_not_fit_the_new_space_are_named_and_skipped(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    url, name = f"sqlite:///{tmp_path / 'optuna.db'}", "job-digits"
    space = load_space(SPACE)
    searcher = make_searcher(space, "val/acc1", "max", seed=3, study_name=name, record=StudyRecord(url, name))
    configs = run_trials(searcher, [f"t{i}" for i in range(6)], [40.0 + i for i in range(6)])
    searcher.suggest("t6")  # asked, never told: RUNNING trials are not in the persistent study at all
    narrow = load_space(narrow_space(tmp_path))
    with caplog.at_level(logging.INFO, logger="mlfd.tune.study"):
        seeds = seed_trials(url, name, narrow, source="earlier")
    misfits = [i for i, c in enumerate(configs) if c["student.alpha"] > 0.5]
    assert misfits and len(misfits) < 6, configs  # seed 3 draws both kinds
    assert [s.user_attrs[RAY_TRIAL_ATTR] for s in seeds] == [f"t{i}" for i in range(6) if i not in misfits]
    assert all(s.user_attrs[SEEDED_ATTR] == "earlier" for s in seeds)
    assert all(s.distributions["student.alpha"].high == 0.5 for s in seeds)  # re-expressed in the new space
    assert [r.getMessage() for r in caplog.records] == [
        f"mlfd tune: {name}: earlier trial {i} (t{i}) skipped: student.alpha={configs[i]['student.alpha']!r} is "
        "outside the new space's range [0.0, 0.5]" for i in misfits]
    # A space that samples a param the earlier trials lack, and one that no longer samples one they have.
    added = tmp_path / "added.yaml"
    added.write_text(SPACE.read_text() + "  joint.recipe.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlfd.tune.study"):
        assert seed_trials(url, name, load_space(added), source="x") == []
    assert caplog.records[0].getMessage() == (f"mlfd tune: {name}: earlier trial 0 (t0) skipped: has no value for "
                                              "joint.recipe.lr, which the new space samples")
    dropped = tmp_path / "dropped.yaml"
    dropped.write_text("\n".join(ln for ln in SPACE.read_text().splitlines() if "student.w_ce" not in ln) + "\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlfd.tune.study"):
        assert seed_trials(url, name, load_space(dropped), source="x") == []
    assert caplog.records[0].getMessage() == (f"mlfd tune: {name}: earlier trial 0 (t0) skipped: sampled "
                                              "student.w_ce, which the new space does not")


def test_seeded_sampler_proposes_from_the_earlier_trials(tmp_path: Path) -> None:
    """The seeds reach the sampler: its study holds them, and past ``startup_trials`` its first proposal is TPE's,
    not the random draw of a cold sampler with the same seed (which it reproduces exactly, given the same seeds)."""
    url, name = f"sqlite:///{tmp_path / 'optuna.db'}", "job-digits"
    space = load_space(SPACE)
    first = make_searcher(space, "val/acc1", "max", seed=5, study_name=name, record=StudyRecord(url, name))
    run_trials(first, [f"t{i}" for i in range(4)], [30.0, 70.0, 50.0, None])
    seeds = seed_trials(url, name, space, source="earlier")
    assert len(seeds) == 4

    def proposal(seeds: list) -> dict:
        s = make_searcher(space, "val/acc1", "max", seed=7, startup_trials=2, study_name=name, seeds=seeds)
        return s.suggest("new")

    warm, cold = proposal(seeds), proposal([])
    assert warm == proposal(seed_trials(url, name, space, source="earlier"))  # deterministic
    assert warm != cold
    s = make_searcher(space, "val/acc1", "max", seed=7, study_name=name, seeds=seeds, record=StudyRecord(url, name))
    from mlfd.tune._private import optuna_search_study

    assert [t.user_attrs[RAY_TRIAL_ATTR] for t in optuna_search_study(s).trials] == ["t0", "t1", "t2", "t3"]
    run_trials(s, ["u0"], [80.0])  # the seeded trials are not written back; the new one is
    assert [t.user_attrs[RAY_TRIAL_ATTR] for t in load_study(url, name).trials] == ["t0", "t1", "t2", "t3", "u0"]


def test_read_study_counts_and_importances(tmp_path: Path) -> None:
    url, name = f"sqlite:///{tmp_path / 'optuna.db'}", "job-digits"
    space = load_space(SPACE)
    s = make_searcher(space, "val/acc1", "max", seed=1, study_name=name, record=StudyRecord(url, name))
    run_trials(s, [f"t{i}" for i in range(6)], [10.0, 20.0, None, 40.0, 35.0, 15.0])
    view = read_study(url, name)
    assert view.counts == {"COMPLETE": 5, "PRUNED": 1}
    assert [r["trial_id"] for r in view.trials] == [f"t{i}" for i in range(6)]
    assert view.importances is not None and abs(sum(view.importances.values()) - 1.0) < 1e-9
    done = [t for t in load_study(url, name).trials if t.state.name == "COMPLETE"]
    assert set(view.importances) == set.intersection(*(set(t.params) for t in done))  # conditional ones left out
    assert view.note.startswith("from 5 completed trials, ")
    assert read_study(url, "nope") is None
    assert redact_url("postgresql://mlfd:secret@db:5432/optuna") == "postgresql://mlfd:***@db:5432/optuna"


def test_job_optuna_storage_must_be_a_url(tmp_path: Path) -> None:
    from mlfd.search import load_job

    with pytest.raises(SpecError, match=r"optuna_storage: must be a database URL"):
        load_job(JOB, overrides=["optuna_storage=/tmp/optuna.db"])
    with pytest.raises(SpecError, match=r"startup_trials: must be >= 1"):
        load_job(JOB, overrides=["startup_trials=0"])


# In-process (``mlfd.cli.main``): misuse of --extend / --warm-start exits 2 with one line, before compute.


def test_extend_and_warm_start_misuse_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlfd.cli import main
    from mlfd.tune.launch import open_output, prepare

    base = ["tune", str(JOB), "--smoke", "--set=studies=[digits]"]
    out = tmp_path / "out"
    cases = [
        (["--extend", "2", "--resume"], ("--extend", "not with --resume")),
        (["--extend", "0"], ("--extend", "must be >= 1")),
        (["--extend", "2"], ("--extend", "holds no search")),
        (["--extend", "2", "--warm-start", str(tmp_path)], ("--warm-start", "not with --extend")),
        (["--warm-start", str(tmp_path / "missing")], ("--warm-start", "holds no search")),
        (["--warm-start", str(out)], ("--warm-start", "is the --out of this search")),
        (["--warm-start", str(tmp_path), "--resume"], ("--warm-start", "not with --resume")),
    ]
    for extra, words in cases:
        capsys.readouterr()
        rc = main([*base, "--out", str(out), *extra])
        one_line_error(rc, capsys.readouterr().err, *words)
    assert not out.exists()
    # A search that has not finished: search.json written, no trials yet; then one study short of its trials.
    plan = prepare(str(JOB), out, True, ["studies=[digits]"])
    open_output(out, plan, resume=False)
    before = (out / "search.json").read_text()
    rc = main([*base, "--out", str(out), "--extend", "2"])
    one_line_error(rc, capsys.readouterr().err, "--extend", "has not finished (no trials.parquet)", "--resume")
    pd.DataFrame({"study": ["digits"], "trial_id": ["a"]}).to_parquet(out / "trials.parquet")
    rc = main([*base, "--out", str(out), "--extend", "2"])
    one_line_error(rc, capsys.readouterr().err, "--extend", "has not finished (digits 1/3 trials)")
    rc = main([*base, "--out", str(out), "--set=num_samples=4", "--extend", "2"])
    one_line_error(rc, capsys.readouterr().err, "--extend", "holds a different search")
    # A search made before mlfd kept its studies (no optuna.db) cannot seed another.
    rc = main([*base, "--out", str(tmp_path / "new"), "--warm-start", str(out)])
    one_line_error(rc, capsys.readouterr().err, "--warm-start", "has no Optuna studies")
    assert (out / "search.json").read_text() == before and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------------------------------
# With Ray: search, --extend, --resume, --warm-start
# --------------------------------------------------------------------------------------------------------------------

SAMPLES, EXTEND, WARM_SAMPLES = 3, 2, 2
STUDY = "quickstart-digits"
# No reference point and their own seed: no trial replays a student another test left in the shared store.
# startup_trials 2: the extension and the warm start (3+ earlier trials) get TPE proposals from their first trial.
ARGS = ["--smoke", "--set=studies=[digits]", f"--set=num_samples={SAMPLES}", "--set=points_to_evaluate=[]",
        "--set=scheduler.grace_period=1", "--set=seed=40", "--set=startup_trials=2",
        *[f"--set=pipeline.datasets.{d}.{k}=100" for d in ("mnist", "fashion", "digits")
          for k in ("max_train", "max_test")]]


def study_ids(out: Path) -> list[str]:
    st = load_study(f"sqlite:///{out / 'optuna.db'}", STUDY)
    return [t.user_attrs[RAY_TRIAL_ATTR] for t in st.trials]


def mlflow_trial_runs(out: Path) -> tuple[list[str], set[str], set[str]]:
    """Ray trial ids of the MLflow child runs, their parent run ids, the statuses of every run."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("quickstart").experiment_id], max_results=200)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return (sorted(r.data.tags["mlfd.trial_id"] for r in children), {r.data.tags["mlflow.parentRunId"]
                                                                      for r in children},
            {r.info.status for r in runs})


def first_proposal(out: Path, round_: int, seeds: list) -> dict:
    """What the sampler of round ``round_`` of the search in ``out`` proposes first, given ``seeds``."""
    from mlfd.search import SearchPlan
    from mlfd.tune.launch import searcher_options

    plan = SearchPlan.load(out)
    job = plan.job
    space = load_space(plan.space_file)
    opts = {**searcher_options(plan, "digits", 0, round_, space), "seeds": seeds, "record": None}
    return make_searcher(space, job.metric, job.mode, **opts).suggest("first")


def config_of(row: pd.Series) -> dict:
    from mlfd.tune.trials import trial_config

    return trial_config(row)


@pytest.fixture(scope="module")
def searches(mlfd_cli, offline_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smoke search (3 trials), its --extend 2, a --resume of the finished search, and a --warm-start from it."""
    root = tmp_path_factory.mktemp("study")
    out, warm = root / "out", root / "warm"
    store = [f"--set=store={offline_store}"]
    got: dict = {}
    first = mlfd_cli("tune", JOB, "--out", out, *ARGS, *store, timeout=900)
    assert first.proc.returncode == 0, first.output[-5000:]
    got["first"] = (read_search(out, []), study_ids(out), mlflow_trial_runs(out))
    ext = mlfd_cli("tune", JOB, "--out", out, *ARGS, *store, "--extend", EXTEND, timeout=900)
    assert ext.proc.returncode == 0, ext.output[-5000:]
    got["extend"] = (read_search(out, []), ext.output)
    again = mlfd_cli("tune", JOB, "--out", out, *ARGS, *store, "--resume", timeout=900)
    assert again.proc.returncode == 0, again.output[-5000:]
    got["resume"] = read_search(out, [])
    space = narrow_space(root)
    w = mlfd_cli("tune", JOB, "--out", warm, *ARGS, *store, f"--set=num_samples={WARM_SAMPLES}", f"--set=space={space}",
                 "--warm-start", out, timeout=900)
    assert w.proc.returncode == 0, w.output[-5000:]
    got["warm"] = (read_search(warm, []), w.output)
    for r in (first, ext, again, w):
        assert not r.cleanup(grace=30)
    got["out"], got["warm_out"] = out, warm
    return got


@pytest.mark.slow
def test_extend_adds_trials_to_the_same_study_runs_and_table(searches: dict) -> None:
    out = searches["out"]
    first, first_ids, (first_runs, first_parents, _) = searches["first"]
    s, output = searches["extend"]
    df = s.trials
    assert len(first.trials) == SAMPLES and sorted(first_ids) == sorted(first.trials["trial_id"])
    assert len(df) == SAMPLES + EXTEND and df["trial_id"].is_unique
    assert sorted(df["trial_index"]) == list(range(1, SAMPLES + EXTEND + 1))
    old = df[df["trial_id"].isin(first.trials["trial_id"])]
    pd.testing.assert_frame_equal(  # the first round's rows are kept as they were
        old.sort_values("trial_id").reset_index(drop=True)[first.trials.columns],
        first.trials.sort_values("trial_id").reset_index(drop=True))
    assert sorted(study_ids(out)) == sorted(df["trial_id"])  # the same Optuna study, every trial once
    runs, parents, statuses = mlflow_trial_runs(out)
    assert runs == sorted(df["trial_id"]) and parents == first_parents and statuses == {"FINISHED"}
    assert f"mlfd tune: study digits (1/1), extension 1, {EXTEND} trials" in output
    from mlfd.tune.trials import best_row

    best = best_row(df, "val/acc1", "max")
    assert f"Best trial {best['trial_id']} of study 'digits'" in (out / "best" / "digits.yaml").read_text()
    # The extension's sampler started from every earlier trial: its first trial is what a sampler seeded with them
    # proposes first, not what a cold one (same seed) does.
    seeds = seed_trials(f"sqlite:///{out / 'optuna.db'}", STUDY, load_space(s.plan.space_file), "test")
    seeds = [t for t in seeds if t.user_attrs[RAY_TRIAL_ATTR] in set(first.trials["trial_id"])]
    assert len(seeds) == SAMPLES
    ext_first = config_of(df[df["trial_index"] == SAMPLES + 1].iloc[0])
    assert ext_first == first_proposal(out, 1, seeds)
    assert ext_first != first_proposal(out, 1, [])


@pytest.mark.slow
def test_resume_of_a_finished_search_records_nothing_twice(searches: dict) -> None:
    out = searches["out"]
    s = searches["resume"]
    ext, _ = searches["extend"]
    same = [df.drop(columns="path").sort_values("trial_id").reset_index(drop=True) for df in (s.trials, ext.trials)]
    pd.testing.assert_frame_equal(*same)  # the same rows (in the order Ray returns them)
    assert sorted(study_ids(out)) == sorted(s.trials["trial_id"])
    runs, _, statuses = mlflow_trial_runs(out)
    assert runs == sorted(s.trials["trial_id"]) and statuses == {"FINISHED"}


@pytest.mark.slow
def test_warm_start_seeds_a_new_search_with_the_trials_that_fit(searches: dict) -> None:
    out, warm = searches["out"], searches["warm_out"]
    s, output = searches["warm"]
    earlier = load_study(f"sqlite:///{out / 'optuna.db'}", STUDY).trials
    misfit = [t for t in earlier if t.params["student.alpha"] > 0.5]
    fit = [t for t in earlier if t.params["student.alpha"] <= 0.5]
    skipped = [ln for ln in output.splitlines() if " skipped: " in ln]
    assert skipped == [f"mlfd tune: {STUDY}: earlier trial {t.number} ({t.user_attrs[RAY_TRIAL_ATTR]}) skipped: "
                       f"student.alpha={t.params['student.alpha']!r} is outside the new space's range [0.0, 0.5]"
                       for t in misfit]
    assert f"mlfd tune: study digits starts from {len(fit)} trial(s) of {out} ({STUDY})" in output
    assert len(fit) >= 2, "the test needs earlier trials that fit to say anything"
    assert len(s.trials) == WARM_SAMPLES and sorted(study_ids(warm)) == sorted(s.trials["trial_id"])  # no seeds
    assert s.plan.warm_start == str(out)
    seeds = seed_trials(f"sqlite:///{out / 'optuna.db'}", STUDY, load_space(s.plan.space_file), "test")
    assert [t.user_attrs[RAY_TRIAL_ATTR] for t in seeds] == [t.user_attrs[RAY_TRIAL_ATTR] for t in fit]
    warm_first = config_of(s.trials[s.trials["trial_index"] == 1].iloc[0])
    assert warm_first == first_proposal(warm, 0, seeds)
    assert warm_first != first_proposal(warm, 0, [])


@pytest.mark.slow
def test_report_reads_the_persistent_study(searches: dict, tmp_path: Path) -> None:
    from mlfd.report import write_report

    out = searches["out"]
    files = write_report(out, tmp_path)
    md = files["report"].read_text()
    n = SAMPLES + EXTEND
    assert (f"Optuna study `{STUDY}` in `sqlite:///{out / 'optuna.db'}`: {n} trials ({n} COMPLETE); "
            f"`optuna-dashboard sqlite:///{out / 'optuna.db'}` shows it.") in md, md


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_optuna_dashboard_serves_every_study(searches: dict, tmp_path: Path) -> None:
    """The real optuna-dashboard on the search's optuna.db: its JSON API lists the study with its trials, their
    params and values."""
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    out, s = searches["out"], searches["resume"]
    port = free_port()
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([exe, f"sqlite:///{out / 'optuna.db'}", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
                    studies = json.loads(r.read())["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer in 120 s"
                time.sleep(0.5)
        assert [x["study_name"] for x in studies] == [STUDY] and studies[0]["directions"] == ["maximize"]
        with urllib.request.urlopen(f"{base}/api/studies/{studies[0]['study_id']}", timeout=30) as r:
            detail = json.loads(r.read())
        trials = detail["trials"]
        assert len(trials) == len(s.trials) == SAMPLES + EXTEND
        by_id = {a["value"]: t for t in trials for a in t["user_attrs"] if a["key"] == RAY_TRIAL_ATTR}
        assert sorted(by_id) == sorted(s.trials["trial_id"])
        for _, row in s.trials.iterrows():  # the value the sampler was told: the metric of the trial's last epoch
            t = by_id[row["trial_id"]]
            assert t["state"] == "Complete" and t["values"] == [row["final/val/acc1"]], (t, row.to_dict())
            assert {p["name"]: json.loads(p["param_external_value"]) if p["name"] == "fusion_level"
                    else float(p["param_external_value"]) for p in t["params"]} == config_of(row)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
