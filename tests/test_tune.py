"""``mlfd tune`` end to end: the real CLI on a real local Ray cluster (2 CPUs) with real Optuna, torch and timm.

* every job in ``tune_jobs/`` validates (everything short of starting Ray);
* the quickstart smoke search (two studies, tiny data) writes one row per trial, ASHA stops trials early, conditional
  betas follow the sampled fusion level, and each study's best trial is exported;
* a search whose driver is interrupted (SIGINT) or killed (SIGKILL) at four points continues with ``--resume`` each
  time: every trial exactly once, and a trial that had finished is not run again;
* misuse of ``--out`` / ``--resume`` exits 2 with a one-line error;
* ``mlfd export`` then ``mlfd run`` (fresh store) retrains the best trial's student bit for bit.

One finished smoke search is shared by the tests that only read it (module fixture ``search``).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import CLI_ENV, DATASETS, ROOT, CliRun, Search, experiment_dir, read_search, result_lines, snapshot_status

from mlfd.config import PipelineSpec, SpecError, from_dict, load_pipeline
from mlfd.search import load_job
from mlfd.tune.launch import best_row, prepare, trial_rows
from mlfd.tune.spaces import load_space

JOB = ROOT / "tune_jobs" / "quickstart.yaml"
JOBS = sorted((ROOT / "tune_jobs").glob("*.yaml"))
EPOCHS = 3  # the smoke variant's student epochs: ASHA (grace 1, factor 2) has rungs at epochs 1 and 2
METRIC = "best/val/acc1"


def tiny(max_train: int) -> list[str]:
    """Pipeline overrides that make every dataset tiny (the smoke variant caps them at 300/100/200)."""
    return [f"--set=pipeline.datasets.{d}.{k}={n}" for d in DATASETS
            for k, n in (("max_train", max_train), ("max_test", 100))]


SMOKE_STUDIES = ["digits", "mnist"]
SMOKE_SAMPLES = 4
SMOKE_ARGS = ["--smoke", f"--set=studies=[{','.join(SMOKE_STUDIES)}]", f"--set=num_samples={SMOKE_SAMPLES}",
              "--set=scheduler.grace_period=1", f"--set=pipeline.student.recipe.epochs={EPOCHS}", *tiny(100)]
RESUME_SAMPLES = 3
# No points_to_evaluate and other seeds than the smoke search: every trial samples a new config, so none can replay a
# student that an earlier search left in the shared store.
RESUME_ARGS = ["--smoke", "--set=studies=[digits]", f"--set=num_samples={RESUME_SAMPLES}",
               "--set=points_to_evaluate=[]", "--set=max_concurrent_trials=2", "--set=scheduler.grace_period=1",
               *tiny(100)]


def present(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def same_epoch(a: dict, b: dict) -> bool:
    """Two reports of one epoch carry the same numbers (wall times aside)."""
    keys = {k for k in (*a, *b) if k.startswith(("val/", "train/loss"))}
    return bool(keys) and all(a.get(k) == b.get(k) for k in keys)


def check_trials(s: Search, studies: list[str], samples: int, rerun: set[str] = frozenset()) -> None:
    """What every finished search must satisfy: one row per trial, results consistent with Ray's own records.

    ``rerun``: trials that were running when the driver was interrupted. Ray may have logged an epoch of theirs after
    the state it resumes from was saved; that epoch is trained again from the checkpoint, so it is reported twice,
    with the same numbers.
    """
    df = s.trials
    assert sorted(df["study"].value_counts().items()) == sorted((st, samples) for st in studies), df[["study"]]
    assert df["trial_id"].is_unique, df["trial_id"].tolist()
    assert (df["error"] == "").all(), df.loc[df["error"] != "", ["trial_id", "error"]]
    assert set(df["status"]) <= {"TERMINATED", "STOPPED"}, df["status"].tolist()
    for study in studies:
        # A trial directory outside the table can only be a trial Ray had started but not yet recorded when the
        # driver was killed (resampled on resume): it must never have reported, or its epochs would be logged twice.
        exp = experiment_dir(s.out, study)
        listed = set(df.loc[df["study"] == study, "trial_id"])
        for d in exp.glob("run_stage_*"):
            tid = d.name.split("_")[2]
            assert tid in listed or not result_lines(exp, tid), f"unlisted trial {tid} reported results"
    for _, r in df.iterrows():
        exp = experiment_dir(s.out, r["study"])
        lines = [json.loads(x) for x in result_lines(exp, r["trial_id"])]
        iters = [x["training_iteration"] for x in lines]
        first = {}
        for x in lines:
            first.setdefault(x["training_iteration"], x)
        if r["trial_id"] in rerun:
            assert iters == sorted(iters) and sorted(first) == list(range(1, r["epochs"] + 1)), iters
            assert all(same_epoch(x, first[x["training_iteration"]]) for x in lines), \
                f"trial {r['trial_id']}: an epoch trained again from its checkpoint gave other numbers"
        else:
            assert iters == list(range(1, r["epochs"] + 1)), f"trial {r['trial_id']}: reported iterations {iters}"
        assert r[METRIC] == max(x["val/acc1"] for x in lines)
        assert (r["epochs"] == EPOCHS) == (r["status"] == "TERMINATED"), r


# --------------------------------------------------------------------------------------------------------------------
# Job files
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("job", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_validates(job: Path, smoke: bool, tmp_path: Path) -> None:
    """load_job + prepare: the job, its pipeline, its space applied to the pipeline, its datasets; no Ray."""
    spec, base = load_job(job, smoke=smoke)
    plan = prepare(str(job), tmp_path / "out", smoke, None)
    assert plan.studies, job
    assert plan.storage_path == (spec.storage_path or str(tmp_path / "out" / "ray"))
    from_dict(PipelineSpec, plan.pipeline, path=str(job))
    space = load_space(plan.space_file)
    assert space.names()
    if smoke:
        p = from_dict(PipelineSpec, plan.pipeline, path="smoke")
        assert all(d.max_train <= 300 for d in p.datasets), "the smoke variant must use small data"
        assert spec.num_samples <= 4, "a smoke search must finish on a CPU in minutes"


@pytest.mark.parametrize("override, field", [("num_sample=4", "num_sample"),
                                             ("pipeline.student.recipe.epoch=3", "epoch"),
                                             ("resources.gpu=0.25", "resources.gpu")])
def test_bad_overrides_are_rejected_before_ray(override: str, field: str, tmp_path: Path) -> None:
    if field == "resources.gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("GPU trials are allowed on this machine")
    with pytest.raises(SpecError, match=field):
        prepare(str(JOB), tmp_path / "out", True, [override])
    assert not (tmp_path / "out").exists()


def test_a_space_without_fusion_level_on_several_levels_is_refused(tmp_path: Path) -> None:
    """A students job whose space does not search fusion_level, on a pipeline with fusion_levels [1, 2], would train
    every trial at L1 only: refused before Ray (and before the datasets are read), naming both fixes."""
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  student.alpha: {type: float, low: 0.0, high: 1.0}\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: levels\npipeline: {ROOT / 'pipelines' / 'offline_default.yaml'}\nspace: {space}\n"
                   "stage: students\nnum_samples: 2\n")
    with pytest.raises(SpecError) as e:
        prepare(str(job), tmp_path / "out", True, None)
    assert str(e.value) == (
        f"{space}: params.fusion_level: a students trial trains one fusion level, but the pipeline has fusion_levels "
        "[1, 2] and the space does not search it; add `fusion_level: {type: categorical, choices: [1, 2]}` to the "
        "space, or set the pipeline's fusion_levels to one level")
    assert not (tmp_path / "out").exists()


def test_every_branch_of_the_space_is_validated(tmp_path: Path) -> None:
    """A value only one branch takes (w_ce -1 at fusion level 2) and a bound a random draw never hits (dropout 1.0)
    are both found before Ray, on every run."""
    job = tmp_path / "job.yaml"
    job.write_text(f"name: branches\npipeline: {ROOT / 'pipelines' / 'offline_default.yaml'}\n"
                   f"space: {tmp_path / 'space.yaml'}\nstage: students\nnum_samples: 2\n")
    for param, field in (("student.w_ce: {type: fixed, value: -1.0, when: {fusion_level: {eq: 2}}}", "student.w_ce"),
                         ("joint.dropout: {type: float, low: 0.5, high: 1.0}", "joint.dropout")):
        (tmp_path / "space.yaml").write_text(
            f"params:\n  fusion_level: {{type: categorical, choices: [1, 2]}}\n  {param}\n")
        with pytest.raises(SpecError, match=rf"space.yaml applied to .*offline_default.yaml\.{field}: must be"):
            prepare(str(job), tmp_path / "out", True, None)


def test_trial_rows_record_the_creation_index(tmp_path: Path) -> None:
    """trials.parquet's trial_index is Ray's trial counter: from the experiment tag of a trial that reported, from
    its directory name (Ray's own layout) for one that failed before reporting; never from the random hex id."""
    from ray.tune import Result

    job, _ = load_job(JOB, smoke=True)
    done = Result(metrics={"trial_id": "0a1b2c39", "experiment_tag": "12_fusion_level=2,student.alpha=0.6",
                           "training_iteration": 3, "val/acc1": 50.0}, checkpoint=None, error=None,
                  path=str(tmp_path / "run_stage_0a1b2c39_12_fusion_level=2,student.alpha=0.6_2026-12-01_10-00-00"))
    failed = Result(metrics={}, checkpoint=None, error=RuntimeError("boom"),
                    path=str(tmp_path / "run_stage_77e3a8f1_4_fusion_level=1,student.alpha=0.1_2026-12-01_10-00-01"))
    rows = trial_rows([done, failed], "digits", job, max_epochs=3)
    assert [(r["trial_id"], r["trial_index"], r["status"]) for r in rows] == [
        ("0a1b2c39", 12, "TERMINATED"), ("run_stage_77e3a8f1_4_fusion_level=1,student.alpha=0.1_2026-12-01_10-00-01",
                                         4, "ERROR")]


def test_live_view_lines_and_log_levels(capsys: pytest.CaptureFixture) -> None:
    """The live view's lines off a terminal (a log file, CI): one per ended trial, each followed by the study's
    progress line; a failed trial's reason is the last line of Ray's error trace. -q silences them; warnings stay."""
    from types import SimpleNamespace as Trial

    from mlfd.cli import configure_logging
    from mlfd.tune.progress import LiveView

    trace = ("Failure # 1 (occurred at 2026-12-01_10-00-00)\nray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n"
             "  File \"mlfd/engine.py\", line 9, in fit\nmlfd.engine.DivergedError: student digits: loss became nan "
             "at epoch 2, step 3\n")
    done = Trial(trial_id="0a1b2c39", experiment_tag="1_fusion_level=2", status="TERMINATED",
                 last_result={"training_iteration": 3, "val/acc1": 50.0}, metric_analysis={"val/acc1": {"max": 52.5}})
    stopped = Trial(trial_id="77e3a8f1", experiment_tag="2_fusion_level=1", status="TERMINATED",
                    last_result={"training_iteration": 1, "val/acc1": 60.0}, metric_analysis={})
    failed = Trial(trial_id="5c5c5c5c", experiment_tag="3_fusion_level=1", status="ERROR", last_result={},
                   metric_analysis={}, get_error=lambda: trace, error_file=None)
    running = Trial(trial_id="9d9d9d9d", experiment_tag="4_fusion_level=2", status="RUNNING", last_result={},
                    metric_analysis={})
    restore = configure_logging()
    view = LiveView("digits", "val/acc1", "max", max_epochs=3)
    view.setup(total_num_samples=4)
    view.start -= 65  # the search started 65 s ago
    trials = [done, running]
    view.on_trial_complete(0, trials, done)
    trials.append(stopped)
    view.on_trial_complete(0, trials, stopped)
    trials.append(failed)
    view.on_trial_error(0, trials, failed)
    running.status = "TERMINATED"
    view.on_experiment_end(trials)
    assert capsys.readouterr().err.splitlines()[:7] == [
        "  digits trial #1 (0a1b2c39) finished 3/3 epochs, val/acc1 52.50 (best epoch)",
        "  digits [#####---------------] 1/4 done, 1 running, best val/acc1 52.50 (#1), 1m05s, ETA ~3m15s",
        "  digits trial #2 (77e3a8f1) stopped early at epoch 1/3 (scheduler), val/acc1 60.00 (best epoch)",
        "  digits [##########----------] 2/4 done, 1 running, best val/acc1 60.00 (#2), 1m05s, ETA ~1m05s",
        "  digits trial #3 (5c5c5c5c) FAILED: DivergedError: student digits: loss became nan at epoch 2, step 3",
        "  digits [###############-----] 3/4 done, 1 running, best val/acc1 60.00 (#2), 1m05s, ETA ~22s",
        "  digits [####################] 4/4 done, 0 running, best val/acc1 60.00 (#2), 1m05s"]
    restore()
    restore = configure_logging(quiet=True)
    view.setup(total_num_samples=4)
    view.on_trial_complete(0, trials, done)
    logging.getLogger("mlfd.tracking").warning("MLflow unreachable")
    assert capsys.readouterr().err == "mlfd: warning: MLflow unreachable\n"
    restore()


def test_live_view_redraws_in_place_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the progress line is drawn over itself (carriage return, clear line); a trial's line replaces
    it and the progress line comes back under it; the study's end leaves the last one on screen."""
    import io
    from types import SimpleNamespace as Trial

    from mlfd.cli import configure_logging
    from mlfd.tune.progress import LiveView

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    done = Trial(trial_id="0a1b2c39", experiment_tag="1_x=1", status="TERMINATED",
                 last_result={"training_iteration": 3, "val/acc1": 50.0}, metric_analysis={"val/acc1": {"max": 52.5}})
    running = Trial(trial_id="9d9d9d9d", experiment_tag="2_x=2", status="RUNNING", last_result={}, metric_analysis={})
    restore = configure_logging()
    view = LiveView("digits", "val/acc1", "max", max_epochs=3)
    view.setup(total_num_samples=2)
    view.start -= 5
    view.on_step_end(0, [done, running])
    view.on_trial_complete(0, [done, running], done)
    running.status = "TERMINATED"
    view.on_experiment_end([done, running])
    restore()
    clear, bar = "\r\x1b[2K", "  digits [##########----------] 1/2 done, 1 running, best val/acc1 52.50 (#1), 5s, ETA "
    assert sys.stderr.getvalue() == (
        f"{clear}{bar}?{clear}  digits trial #1 (0a1b2c39) finished 3/3 epochs, val/acc1 52.50 (best epoch)\n"
        f"{clear}{bar}~5s{clear}  digits [####################] 2/2 done, 0 running, best val/acc1 52.50 (#1), 5s\n")


# --------------------------------------------------------------------------------------------------------------------
# The quickstart smoke search
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def search(mlfd_cli, offline_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Search:
    out = tmp_path_factory.mktemp("search") / "out"
    args = ["tune", str(JOB), "--out", str(out), *SMOKE_ARGS, f"--set=store={offline_store}"]
    run = mlfd_cli(*args, timeout=900)
    assert run.proc.returncode == 0, run.output[-5000:]
    left = run.cleanup(grace=30)
    assert not left, f"processes still alive after the search ended: {left}"
    s = read_search(out, args)
    s.output = run.output
    return s


@pytest.mark.slow
def test_smoke_search_one_row_per_trial_and_asha_stops_some(search: Search) -> None:
    check_trials(search, SMOKE_STUDIES, SMOKE_SAMPLES)
    df = search.trials
    assert (df["status"] == "STOPPED").any(), f"ASHA stopped no trial:\n{df[['study', 'status', 'epochs', METRIC]]}"
    assert (df["status"] == "TERMINATED").any()
    for study in SMOKE_STUDIES:  # Ray's creation order: the quickstart's reference point is trial 1 of each study
        s = df[df["study"] == study].sort_values("trial_index")
        assert s["trial_index"].tolist() == list(range(1, SMOKE_SAMPLES + 1)), s[["trial_id", "trial_index"]]
        assert (s["config/fusion_level"].iloc[0], s["config/student.alpha"].iloc[0]) == (2, 0.6)


@pytest.mark.slow
def test_console_is_compact_and_warning_free(search: Search) -> None:
    """What `mlfd tune` prints: a line per stage, one line per trial, a progress line per study, the final table and
    the next commands; no Ray tables or banners (they are in OUT/logs/ray.log) and no Python warnings."""
    out, lines = search.out, search.output.splitlines()
    assert len(lines) <= 60, f"{len(lines)} lines:\n{search.output}"
    warned = [ln for ln in lines if re.search(r"\w*Warning\b", ln)]
    assert not warned, "\n".join(warned)
    for noise in ("Trial status", "View detailed results", "TensorBoard", "Token authentication", "(raylet)",
                  "snapshotting", "A new study created"):
        assert noise not in search.output, f"{noise!r} on screen:\n{search.output}"
    assert "INFO ray.tune" in (out / "logs" / "ray.log").read_text()  # e.g. "Wrote the latest version of all ..."
    for study in SMOKE_STUDIES:
        assert sum(ln.startswith(f"mlfd tune: study {study} ") for ln in lines) == 1, search.output
        bars = [ln for ln in lines if ln.startswith(f"  {study} [")]
        assert bars and f"{SMOKE_SAMPLES}/{SMOKE_SAMPLES} done, 0 running, best val/acc1 " in bars[-1], bars
        # Best so far: over every epoch of every trial, stopped early or not (the exported best prefers full runs).
        df = search.trials[search.trials["study"] == study]
        top = df[df[METRIC] == df[METRIC].max()]
        m = re.search(r"best val/acc1 ([\d.]+) \(#(\d+)\)", bars[-1])
        assert m and m.group(1) == f"{top[METRIC].iloc[0]:.2f}" and int(m.group(2)) in set(top["trial_index"]), bars
    for _, r in search.trials.iterrows():  # one line per trial, saying how it ended
        mine = [ln for ln in lines if f" trial #{r['trial_index']} ({r['trial_id']}) " in ln]
        how = "finished" if r["status"] == "TERMINATED" else f"stopped early at epoch {r['epochs']}/"
        assert len(mine) == 1 and mine[0].startswith(f"  {r['study']} trial ") and how in mine[0], (mine, r.to_dict())
        assert f"val/acc1 {r[METRIC]:.2f} (best epoch)" in mine[0], mine
    tail = [ln.split("  # ")[0].strip() for ln in lines[-len(SMOKE_STUDIES) - 3:]]  # the last lines: what next
    assert tail == ["next:", f"mlfd report {out}",
                    *[f"mlfd export {out} --study {s} --out best-{s}.yaml" for s in SMOKE_STUDIES],
                    f"mlfd ui --out {out}"], lines[-8:]


@pytest.mark.slow
def test_conditional_betas_follow_the_fusion_level(search: Search) -> None:
    df = search.trials
    levels = df["config/fusion_level"].astype(int)
    assert (levels == 1).any() and (levels >= 2).any(), levels.tolist()  # the seeded TPE startup draws both
    for _, r in df.iterrows():
        k = int(r["config/fusion_level"])
        for c in range(1, 5):
            col = f"config/student.betas.{c}"
            assert present(r.get(col)) == (c <= k), f"trial {r['trial_id']} level {k}: {col} = {r.get(col)}"


@pytest.mark.slow
def test_best_trial_of_each_study_is_exported(search: Search) -> None:
    for study in SMOKE_STUDIES:
        path = search.out / "best" / f"{study}.yaml"
        assert path.is_file(), path
        best = best_row(search.trials[search.trials["study"] == study], "val/acc1", "max")
        assert best["status"] == "TERMINATED"
        assert f"Best trial {best['trial_id']} of study '{study}'" in path.read_text().splitlines()[0]
        spec = load_pipeline(path)
        assert spec.only_students == [study]
        assert spec.fusion_levels == [int(best["config/fusion_level"])]
        assert spec.student.temperature == best["config/student.temperature"]
        assert spec.student.alpha == best["config/student.alpha"]
        assert spec.joint.dropout == best["config/joint.dropout"]
        assert spec.student.recipe.lr == best["config/student.recipe.lr"]
        assert {int(k): v for k, v in spec.student.betas.items()} == {
            c: best[f"config/student.betas.{c}"] for c in range(1, spec.fusion_levels[0] + 1)}


@pytest.mark.slow
def test_trials_that_ran_every_epoch_leave_their_student_in_the_store(search: Search) -> None:
    """ASHA stops a trial when it reports its last epoch; the student must be saved before that report."""
    from mlfd.stages.common import Context, read_metrics
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore
    from mlfd.tune.trainable import trial_spec

    store = ArtifactStore(search.plan.store)
    for _, r in search.trials.iterrows():
        config = json.loads((Path(r["path"]) / "params.json").read_text())
        ctx = Context(spec=trial_spec(config, {"pipeline": search.plan.pipeline}), store=store, progress=False)
        art = StageTrial(ctx, "students", r["study"]).artifact()
        if r["status"] == "TERMINATED":
            assert art is not None, f"trial {r['trial_id']} finished but its student is not in the store"
            m = read_metrics(art)
            assert m["val"]["acc1"] == r[METRIC] and len(m["history"]) == EPOCHS
        else:
            assert art is None, f"trial {r['trial_id']} was stopped after {r['epochs']} epochs but left a student"


# --------------------------------------------------------------------------------------------------------------------
# --out / --resume misuse
# --------------------------------------------------------------------------------------------------------------------


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlfd.cli", *map(str, args)], cwd=cwd, env=CLI_ENV,
                          capture_output=True, text=True, timeout=300)


def one_line_error(rc: int, stderr: str, *words: str) -> None:
    assert rc == 2, (rc, stderr[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("mlfd: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]


# In-process (``mlfd.cli.main``, whose return value is the exit status): these checks come before Ray starts.


def test_resume_without_a_search_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlfd.cli import main

    out = tmp_path / "empty"
    rc = main(["tune", str(JOB), "--out", str(out), "--resume", *RESUME_ARGS])
    one_line_error(rc, capsys.readouterr().err, "--resume", "holds no search")
    assert not out.exists(), sorted(out.iterdir())  # nothing written, not even the tracking database


@pytest.mark.slow
def test_out_of_a_finished_search_is_protected(search: Search, capsys: pytest.CaptureFixture) -> None:
    """Another job (or other settings) with --resume, and the same job without --resume: exit 2, nothing touched."""
    from mlfd.cli import main

    before = {p.relative_to(search.out): p.stat().st_mtime_ns for p in search.out.rglob("*") if p.is_file()}
    other = ROOT / "tune_jobs" / "joint_teacher.yaml"
    out = ["--out", str(search.out)]
    for argv, words in [(["tune", str(other), *out, "--resume", "--smoke"], ("--resume", "different search")),
                        ([*search.args, "--resume", "--set=num_samples=5"], ("--resume", "different search")),
                        (search.args, ("--out", "already holds a search", "--resume"))]:
        capsys.readouterr()
        rc = main(argv)
        one_line_error(rc, capsys.readouterr().err, *words)
    after = {p.relative_to(search.out): p.stat().st_mtime_ns for p in search.out.rglob("*") if p.is_file()}
    assert after == before


# --------------------------------------------------------------------------------------------------------------------
# Resume after the driver is interrupted or killed
# --------------------------------------------------------------------------------------------------------------------


def wait_for(run: CliRun, ready, what: str, timeout: float = 600):
    """Poll ``ready()`` until it returns something truthy while the driver runs."""
    deadline = time.monotonic() + timeout
    while True:
        rc = run.poll()
        assert rc is None, f"the search ended (exit {rc}) before {what}:\n{run.output[-4000:]}"
        assert time.monotonic() < deadline, f"{what}: not in time:\n{run.output[-4000:]}"
        got = ready()
        if got:
            return got
        time.sleep(0.25)


def stop_driver(run: CliRun, sig: signal.Signals) -> None:
    """Send ``sig`` to the driver; check it exits as it should and leaves no Ray process behind."""
    run.record()
    run.proc.send_signal(sig)
    rc = run.wait(180)
    if sig == signal.SIGINT:
        assert rc == 130, (rc, run.output[-4000:])
        assert "--resume" in run.output.splitlines()[-1], run.output[-2000:]
        left = run.cleanup(grace=30)
        assert not left, f"processes still alive after an interrupted search: {left}"
    else:
        assert rc == -signal.SIGKILL
        # The cluster's core processes die with the driver that started them. (Ray 2.60's DashboardAgent and
        # RuntimeEnvAgent log "Raylet is dead! Exiting" but hang; cleanup() kills them by pid.)
        agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        left = run.leftovers(grace=30, ignore=agents)
        core = {p: c for p, c in left.items() if not any(a in c for a in agents)}
        run.cleanup()
        assert not core, f"Ray processes outlived their SIGKILLed driver: {core}"


def interrupt_when(mlfd_cli, args: list, sig: signal.Signals, ready, what: str, env: dict | None = None):
    """Start (or --resume) a search and stop its driver with ``sig`` once ``ready(experiment dir)`` returns trial ids.
    Returns those trial ids, what Tuner.restore will start from (trial id -> status) and each trial's reported epochs
    then."""
    exp = experiment_dir(Path(args[args.index("--out") + 1]), "digits")
    run: CliRun = mlfd_cli.start(*args, env=env)
    found = wait_for(run, lambda: ready(exp), what)
    stop_driver(run, sig)
    saved = snapshot_status(exp)
    return found, saved, {t: result_lines(exp, t) for t in saved}


def finished_trials(exp: Path) -> list[str]:
    """Trials that Ray's state snapshot (what Tuner.restore starts from) records as finished."""
    return [t for t, status in snapshot_status(exp).items() if status == "TERMINATED"]


def check_resumed(out: Path, args: list, saved: dict, lines_before: dict, running_before: frozenset = frozenset()
                  ) -> Search:
    """After the final --resume: every trial once, none lost, finished trials untouched, unfinished continued.

    ``running_before``: trials in flight at an earlier interruption of the same search (they may have repeated an
    epoch from their checkpoint then, as the ones unfinished in ``saved`` may have now)."""
    s = read_search(out, [str(a) for a in args])
    check_trials(s, ["digits"], RESUME_SAMPLES,
                 rerun={t for t, status in saved.items() if status != "TERMINATED"} | set(running_before))
    epochs = dict(zip(s.trials["trial_id"], s.trials["epochs"]))
    assert set(saved) <= set(epochs), "a trial of the interrupted search is missing after --resume"
    exp = experiment_dir(out, "digits")
    for t, status in saved.items():
        now = result_lines(exp, t)
        if status == "TERMINATED":  # finished before the interruption: not run again, results untouched
            assert now == lines_before[t], f"finished trial {t} was run again after --resume"
        else:  # continued (or at least completed): not taken as finished at the epoch it was interrupted
            assert len(now) > len(lines_before[t]) or epochs[t] == EPOCHS, \
                f"trial {t} ({status} when interrupted, {len(lines_before[t])} epochs) was not continued"
    assert (out / "best" / "digits.yaml").is_file()
    # Ray wrote its state through mlfd's whole-file-or-nothing filesystem (mlfd/tune/atomic_fs.py)
    assert b"AtomicLocalHandler" in (exp / "tuner.pkl").read_bytes()
    assert not [p for p in exp.rglob("*") if ".mlfd-tmp-" in p.name]  # swept on --resume, none left by the end
    # MLflow: one run per trial (none twice after the resumes), one parent, nothing left RUNNING.
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("quickstart").experiment_id], max_results=200)
    trial_runs = sorted(r.data.tags["mlfd.trial_id"] for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert trial_runs == sorted(s.trials["trial_id"]), trial_runs
    assert len(runs) == len(trial_runs) + 1 and {r.info.status for r in runs} == {"FINISHED"}, \
        [(r.info.run_name, r.info.status) for r in runs]
    return s


@pytest.mark.slow
def test_driver_interrupted_at_four_points_then_resumed(mlfd_cli, tmp_path: Path) -> None:
    """The driver of one search stopped at four points, each followed by --resume: SIGKILL while the teacher tasks
    train (fresh store); Ctrl-C (SIGINT) once a student trial has finished; SIGKILL in the middle of a trial of the
    resumed study (it has reported an epoch since the resume); SIGKILL between writing trials.parquet and the best
    YAML (``MLFD_PAUSE_AT``, mlfd/tune/launch.py). The last --resume completes: no trial lost, none twice."""
    from mlfd.store import ArtifactStore
    from mlfd.tune.launch import PAUSE_ENV

    out, store = tmp_path / "out", tmp_path / "store"
    # One trial at a time, none stopped early: step 3 kills the driver while a trial is between its epochs, so the
    # search cannot have reached its results (Ray's state snapshot, which the test reads, can lag behind the search).
    args = ["tune", JOB, "--out", out, *RESUME_ARGS, "--set=max_concurrent_trials=1", "--set=scheduler.type=none",
            "--set=seed=20", f"--set=store={store}"]

    # 1. While the teachers train: no half-written teacher is ever trusted; the resume builds what is missing.
    first = mlfd_cli.start(*args, env={PAUSE_ENV: "teachers"})
    wait_for(first, lambda: "paused at teachers" in first.output, "the teacher tasks started")
    stop_driver(first, signal.SIGKILL)
    assert not experiment_dir(out, "digits").exists()  # no trial had started
    arts = ArtifactStore(store)
    for p in (store / "teacher").iterdir() if (store / "teacher").is_dir() else ():
        if not p.name.startswith("."):
            assert arts.get("teacher", p.name) is not None, f"incomplete teacher artifact left at {p}"

    # 2. Ctrl-C during the student study, once a trial has finished: exit 130 naming --resume, no Ray process left.
    finished, saved, lines_before = interrupt_when(mlfd_cli, [*args, "--resume"], signal.SIGINT, finished_trials,
                                                   "a trial finished")
    done = frozenset(t for t, status in saved.items() if status == "TERMINATED")
    in_flight = frozenset(saved) - done  # stopped mid-trial by the Ctrl-C: resumed from a checkpoint
    assert set(finished) <= done  # what the snapshot said had finished is what --resume starts from
    assert not (out / "trials.parquet").exists()
    teachers = {p.name for p in (store / "teacher").iterdir() if not p.name.startswith(".")}
    assert len(teachers) == len(DATASETS)

    # 3. SIGKILL in the middle of a trial of the resumed study: it has reported an epoch since, and not finished.
    _, saved, lines_now = interrupt_when(
        mlfd_cli, [*args, "--resume"], signal.SIGKILL, what="a resumed trial reported an epoch",
        ready=lambda exp: [t for t, st in snapshot_status(exp).items() if t not in done and st != "TERMINATED"
                           and len(lines_before.get(t, [])) < len(result_lines(exp, t)) < EPOCHS])
    assert {t: lines_now[t] for t in done} == {t: lines_before[t] for t in done}  # not run again after the Ctrl-C
    assert not (out / "trials.parquet").exists()

    # 4. While writing the results: trials.parquet is written, best/ is not.
    fourth = mlfd_cli.start(*args, "--resume", env={PAUSE_ENV: "results"})
    wait_for(fourth, lambda: "paused at results" in fourth.output, "the results were being written")
    assert "teachers for" not in fourth.output  # all teachers were in the store: no teacher task on --resume
    table = pd.read_parquet(out / "trials.parquet")
    stop_driver(fourth, signal.SIGKILL)
    assert not (out / "best" / "digits.yaml").exists()

    last = mlfd_cli(*args, "--resume", timeout=600)
    assert last.proc.returncode == 0, last.output[-5000:]
    assert not last.cleanup(grace=30)
    s = check_resumed(out, args, saved, lines_now, running_before=in_flight)
    same = [s.trials, table]
    same = [df.drop(columns="path").sort_values("trial_id").reset_index(drop=True) for df in same]
    pd.testing.assert_frame_equal(*same)  # the last --resume re-ran nothing and wrote the same table


# --------------------------------------------------------------------------------------------------------------------
# export -> run
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_then_run_retrains_the_best_student_bit_for_bit(search: Search, mlfd_cli, tmp_path: Path) -> None:
    """``mlfd run best.yaml`` in a FRESH store retrains teachers, T* and the student: the same numbers and weights.

    Reusing the search's store would only read the trial's student back. Exact equality needs the same torch thread
    count as the trial (CPU kernels split their reductions by thread count): a trial runs with ``resources.cpu`` (1)
    threads, and the exported file says to rerun with OMP_NUM_THREADS=1.
    """
    from mlfd.store import ArtifactStore

    study = "digits"
    best = best_row(search.trials[search.trials["study"] == study], "val/acc1", "max")
    exported = tmp_path / "best.yaml"
    proc = cli("export", search.out, "--study", study, "--out", exported, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    threads = re.search(r"^# .*OMP_NUM_THREADS=(\d+) mlfd run", exported.read_text(), re.M)  # as the header says
    assert threads and threads[1] == "1", exported.read_text()[:1000]
    run_out = tmp_path / "run2"
    run = CliRun(["run", str(exported), "--out", str(run_out), "--quiet", "--no-tracking"], tmp_path,
                 env={**CLI_ENV, "OMP_NUM_THREADS": threads[1]}).start()
    try:
        assert run.wait(400) == 0, run.output[-5000:]
    finally:
        run.cleanup()
    res = pd.read_parquet(run_out / "results.parquet")
    student = res[(res["role"] == "student") & (res["split"] == "val") & (res["dataset"] == study)]
    assert len(student) == 1, res

    # Every artifact the run built has the same key as one the search built: compare their weights and numbers.
    fresh, old = ArtifactStore(run_out / "store"), ArtifactStore(search.plan.store)
    differ = []
    for kind in ("teacher", "joint", "student"):
        keys = sorted(p.name for p in (run_out / "store" / kind).iterdir() if not p.name.startswith("."))
        assert keys, kind
        for key in keys:
            a, b = fresh.get(kind, key), old.get(kind, key)
            assert b is not None, f"{kind} {key} of the exported pipeline was never built by the search"
            if a.file("model.pt").read_bytes() != b.file("model.pt").read_bytes():
                differ.append(kind)
    # Each stage seeds torch right before building its model, so nothing that ran earlier in the process (teacher
    # training in `mlfd run`, other trials in a Ray worker) changes the initial weights.
    assert not differ, f"retrained weights differ from the search's: {differ}"
    assert student["acc1"].item() == best[METRIC], (student["acc1"].item(), best[METRIC])
