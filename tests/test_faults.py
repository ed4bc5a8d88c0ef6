"""Faults inside a real search (local Ray cluster, Optuna, MLflow on SQLite): a trial whose loss diverges, a trial
that runs out of memory, and a trial whose worker process is SIGKILLed mid-trial, all in one search."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATASETS, read_search, result_lines

pytestmark = pytest.mark.slow  # every test reads one real search (Ray, MLflow, a CLI subprocess)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
OOM_WIDTH = 2**36  # T*'s first NN block: a 432 TiB weight, refused by the allocator at once whatever the kernel's
# overcommit policy (it is over the 128 TiB address space of a process), so nothing is ever touched
POINTS = [  # trial order = this order (points_to_evaluate); max_concurrent_trials 2
    {"student.recipe.lr": 1.0e6, "joint.width": 128, "student.alpha": 0.5},  # diverges: loss NaN/inf
    {"student.recipe.lr": 0.002, "joint.width": OOM_WIDTH, "student.alpha": 0.5},  # out of memory building T*
    {"student.recipe.lr": 0.002, "joint.width": 128, "student.alpha": 0.5},  # its worker is killed mid-trial
    {"student.recipe.lr": 0.002, "joint.width": 128, "student.alpha": 0.3},
]


def write_job(d: Path, store: Path) -> Path:
    (d / "space.yaml").write_text(
        "description: fault injection\nparams:\n"
        "  fusion_level: {type: fixed, value: 2}\n"
        "  student.recipe.lr: {type: categorical, choices: [0.002, 1.0e+6]}\n"
        f"  joint.width: {{type: categorical, choices: [128, {OOM_WIDTH}]}}\n"
        "  student.alpha: {type: categorical, choices: [0.5, 0.3]}\n")
    job = d / "faults.yaml"
    job.write_text(
        f"name: faults\npipeline: {ROOT / 'pipelines' / 'offline_default.yaml'}\nspace: space.yaml\n"
        "stage: students\nstudies: [digits]\nmetric: val/acc1\nmode: max\n"
        f"num_samples: {len(POINTS)}\nseed: 0\nscheduler: {{type: none}}\nresources: {{cpu: 1, gpu: 0}}\n"
        f"max_concurrent_trials: 2\nmax_failures: 1\nstore: {store}\n"
        f"points_to_evaluate: {json.dumps(POINTS)}\n")
    return job


def kill_a_worker_mid_trial(run, exp: Path, deadline: float) -> str:
    """SIGKILL the worker process of the first trial seen between its first and last epoch; returns its trial id."""
    while True:
        assert run.poll() is None, f"the search ended before a worker could be killed:\n{run.output[-4000:]}"
        assert time.monotonic() < deadline, f"no trial reached its first epoch in time:\n{run.output[-4000:]}"
        for d in exp.glob("run_stage_*"):
            lines = result_lines(exp, d.name.split("_")[2])
            if lines:
                last = json.loads(lines[-1])
                if last["training_iteration"] < EPOCHS and last.get("reused", 0) == 0:
                    os.kill(int(last["pid"]), signal.SIGKILL)
                    return d.name.split("_")[2]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fault_search(mlfd_cli, offline_store: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("faults")
    job = write_job(base, offline_store)
    out = base / "out"
    args = ["tune", job, "--out", out, "--smoke", f"--set=pipeline.student.recipe.epochs={EPOCHS}",
            *[f"--set=pipeline.datasets.{d}.{k}={n}" for d in DATASETS for k, n in (("max_train", 100),
                                                                                   ("max_test", 100))]]
    run = mlfd_cli.start(*args)
    killed = kill_a_worker_mid_trial(run, out / "ray" / "faults-digits", time.monotonic() + 600)
    assert run.wait(600) == 0, run.output[-5000:]
    assert not run.cleanup(grace=30)
    return read_search(out, [str(a) for a in args]), killed, run.output


def by_lr_width(df: pd.DataFrame, lr: float, width: int) -> pd.DataFrame:
    return df[(df["config/student.recipe.lr"] == lr) & (df["config/joint.width"] == width)]


def test_failed_trials_end_as_error_with_their_reason(fault_search) -> None:
    s, _, _ = fault_search
    df = s.trials
    assert len(df) == len(POINTS) and df["trial_id"].is_unique
    diverged = by_lr_width(df, 1.0e6, 128).iloc[0]
    oom = by_lr_width(df, 0.002, OOM_WIDTH).iloc[0]
    assert diverged["status"] == "ERROR" and "DivergedError" in diverged["error"], diverged.to_dict()
    assert "loss became" in diverged["error"], diverged["error"]
    assert oom["status"] == "ERROR" and "OutOfMemory" in oom["error"], oom.to_dict()
    assert "ran out of host memory" in oom["error"], oom["error"]
    # The console says so too, one line per failed trial with the reason (mlfd/tune/progress.py).
    for row, words in ((diverged, "loss became"), (oom, "ran out of host memory")):
        said = [ln for ln in fault_search[2].splitlines() if f"({row['trial_id']}) FAILED: " in ln]
        assert len(said) == 1 and words in said[0], (said, fault_search[2][-3000:])
    # The other trials went on and finished every epoch, with real results.
    ok = df[df["config/student.recipe.lr"].eq(0.002) & df["config/joint.width"].eq(128)]
    assert len(ok) == 2 and (ok["status"] == "TERMINATED").all() and (ok["epochs"] == EPOCHS).all(), ok
    assert (ok["best/val/acc1"] > 20).all(), ok["best/val/acc1"].tolist()  # 10 classes: chance is 10%


def test_killed_worker_is_retried_from_its_checkpoint(fault_search) -> None:
    s, killed, _ = fault_search
    row = s.trials.set_index("trial_id").loc[killed]
    assert row["status"] == "TERMINATED" and row["epochs"] == EPOCHS and row["error"] == "", row.to_dict()
    exp = s.out / "ray" / "faults-digits"
    lines = [json.loads(x) for x in result_lines(exp, killed)]
    (trial_dir,) = exp.glob(f"run_stage_{killed}_*")
    assert "Failure # 1" in (trial_dir / "error.txt").read_text()  # Ray recorded the dead worker, then retried
    assert sum(f"({killed}) failed, retrying: " in ln for ln in fault_search[2].splitlines()) == 1, fault_search[2]
    # Retried from its checkpoint, not from scratch: the last report came from a restored trial whose iterations
    # since the restore are fewer than its iterations.
    assert lines[-1]["training_iteration"] == EPOCHS
    assert lines[-1]["iterations_since_restore"] < EPOCHS, lines[-1]
    assert len({x["pid"] for x in lines}) == 2, [x["pid"] for x in lines]  # another worker after the kill


def test_searcher_is_told_which_trials_failed(fault_search) -> None:
    """Optuna's study (saved with the experiment) holds the failed trials as infeasible, the worst rank of TPE."""
    from mlfd.tune.searcher import FAILED_ATTR, FailureAwareOptunaSearch

    s, _, _ = fault_search
    searcher = FailureAwareOptunaSearch()
    searcher.restore_from_dir(str(s.out / "ray" / "faults-digits"))
    trials = searcher._ot_study.trials
    failed = sorted((t.params["student.recipe.lr"], t.params["joint.width"]) for t in trials
                    if t.user_attrs.get(FAILED_ATTR))
    assert failed == [(0.002, OOM_WIDTH), (1.0e6, 128)], [(t.params, t.state, t.user_attrs) for t in trials]
    assert all(t.constraints == {FAILED_ATTR: 1.0} for t in trials if t.user_attrs.get(FAILED_ATTR))


def test_failed_trials_are_failed_runs_in_mlflow(fault_search) -> None:
    from mlflow.tracking import MlflowClient

    s, killed, _ = fault_search
    c = MlflowClient(tracking_uri=f"sqlite:///{s.out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("faults")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    children = {r.data.tags["mlfd.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == sorted(s.trials["trial_id"]), sorted(children)  # one run per trial, none twice
    for _, row in s.trials.iterrows():
        run = children[row["trial_id"]]
        if row["status"] == "ERROR":
            assert run.info.status == "FAILED", run.info
            assert ("DivergedError" in run.data.tags["mlfd.error"]) or ("OutOfMemory" in run.data.tags["mlfd.error"])
        else:
            assert run.info.status == "FINISHED", run.info
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED"}  # nothing left RUNNING
    # The killed-and-retried trial logged each epoch once.
    hist = c.get_metric_history(children[killed].info.run_id, "val/acc1")
    assert sorted(m.step for m in hist) == list(range(1, EPOCHS + 1)), [m.step for m in hist]
