"""MLflow tracking of `mlfd tune` and `mlfd run`: real SQLite stores, real `mlflow server`s on 127.0.0.1, a real
local Ray cluster; no mocks.

The searches are the expensive part (minutes on 2 shared CPU cores), so one tiny search serves every search test: a
background thread starts a `mlflow server`, runs the search against it, interrupts it with SIGINT once a trial has
finished, and resumes it, while the cheaper tests (unreachable server, journal, `mlfd run`) run in the foreground.
Tests that look at the search wait for it through the ``search`` fixture.

Run with ``RAY_AUTH_MODE=disabled python -m pytest -q tests/test_tracking.py -x``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import snapshot_status

from mlfd.search import JobSpec, SearchPlan
from mlfd.tracking import (PENDING_PREFIX, STATE_FILE, TAG_DATASET, TAG_LEVEL, TAG_PARENT, TAG_STAGE, TAG_TRIAL,
                           Tracker, best_artifact)

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tune_jobs" / "quickstart.yaml"
PIPELINE = ROOT / "pipelines" / "offline_default.yaml"
REGISTERED = "mlfd-test-digits-student"
READY_S = 150.0  # `mlflow server` takes 15-40 s to answer here, more when the cores are busy
PHASE_S = 480.0  # one `mlfd tune` invocation of the tiny search
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Tiny data and epochs for every dataset of the pipeline (the same for the search and `mlfd run`, so that they share
# the teachers in one store).
PIPELINE_SETS = ["teacher.epochs=1", "student.recipe.epochs=2", "joint.recipe.epochs=2"] + [
    f"datasets.{d}.{k}={n}" for d in ("mnist", "fashion", "digits")
    for k, n in (("max_train", 100), ("max_val", 50), ("max_test", 50))]
# One study, two trials one after the other (a trial is finished while the next one runs: the moment to interrupt).
SEARCH_SETS = ["studies=[digits]", "num_samples=2", "max_concurrent_trials=1"] + [f"pipeline.{s}" for s in
                                                                                     PIPELINE_SETS]
RUN_SETS = ["fusion_levels=[1]", "controls.own_teacher=false", "controls.no_kd=false", "baselines.multi_head=false",
            "baselines.joint_head=false", "only_students=[digits]"] + PIPELINE_SETS


def sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def child_env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with its SQLite database and artifact folder under ``root``."""

    def __init__(self, root: Path, port: int | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, port or free_port()
        self.db, self.artifacts, self.log = root / "server.db", root / "server-artifacts", root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"], cwd=self.root, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own process group: stop() ends the server and its workers together
        return self

    def wait_ready(self, timeout: float = READY_S) -> "MlflowServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"mlflow server exited:\n{self.log_tail()}"
            try:
                with OPENER.open(self.uri + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        try:  # uvicorn workers of the group may outlive the parent by a moment
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening(self.port), f"port {self.port} still answers after the server stopped"
        self.proc = None

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.is_file() else ""


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(c, experiment: str) -> list:
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}; experiments: " \
                            f"{[e.name for e in c.search_experiments()]}"
    return c.search_runs([exp.experiment_id], max_results=1000)


def split_runs(runs: list) -> tuple[list, list]:
    parents = [r for r in runs if TAG_PARENT not in r.data.tags]
    children = [r for r in runs if TAG_PARENT in r.data.tags]
    return parents, children


def statuses(runs: list) -> dict[str, str]:
    return {r.info.run_name: r.info.status for r in runs}


def history_len(c, run_id: str, key: str) -> int:
    steps = [m.step for m in c.get_metric_history(run_id, key)]
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
    return len(steps)


# ----------------------------------------------------------------------------------------------------------------
# The search: started in the background, interrupted after a finished trial, resumed
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SearchScenario:
    root: Path
    store: Path
    server: MlflowServer = field(init=False)
    out: Path = field(init=False)
    rc: list[int] = field(default_factory=list)
    finished_before_interrupt: list[str] = field(default_factory=list)
    after_interrupt: dict[str, str] = field(default_factory=dict)
    parent_before: str | None = None
    outage: bool = False
    error: BaseException | None = None
    _proc: subprocess.Popen | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.server = MlflowServer(self.root / "server")
        self.out = self.root / "search"

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "mlfd.cli", "tune", str(JOB), "--smoke", "--out", str(self.out),
                *sets(SEARCH_SETS + [f"tracking_uri={self.server.uri}", f"store={self.store}"]),
                "--register", REGISTERED, *extra]

    def start(self) -> "SearchScenario":
        self.server.start()
        self._thread = threading.Thread(target=self._run, name="search-scenario", daemon=True)
        self._thread.start()
        return self

    def _popen(self, log: str, *extra: str) -> subprocess.Popen:
        with open(self.root / log, "w") as f:
            self._proc = subprocess.Popen(self.command(*extra), cwd=ROOT, env=child_env(), stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        return self._proc

    def _wait(self, proc: subprocess.Popen, what: str) -> int:
        deadline = time.monotonic() + PHASE_S
        while proc.poll() is None:
            if self._stop.is_set():
                raise RuntimeError("stopped")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still running after {PHASE_S:.0f} s")
            time.sleep(1)
        return proc.returncode

    def _run(self) -> None:
        try:
            self.server.wait_ready()
            c = client(self.server.uri)
            # 1. Start, and interrupt (Ctrl-C) as soon as one trial's run is FINISHED on the server.
            proc = self._popen("search1.log")
            deadline = time.monotonic() + PHASE_S
            # Ray's own state snapshot, polled on disk: the server is too slow to poll for a trial of seconds.
            exp = self.out / "ray" / "quickstart-digits"
            while proc.poll() is None and not self.finished_before_interrupt:
                if self._stop.is_set():
                    raise RuntimeError("stopped")
                assert time.monotonic() < deadline, f"no trial finished in {PHASE_S:.0f} s\n{self.log('search1.log')}"
                self.finished_before_interrupt = [t for t, st in snapshot_status(exp).items() if st == "TERMINATED"]
                time.sleep(0.2)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the driver only, as a terminal's Ctrl-C would reach it
            self.rc.append(self._wait(proc, "interrupted search"))
            self.after_interrupt = statuses(all_runs(c, "quickstart"))
            state = self.out / STATE_FILE
            self.parent_before = json.loads(state.read_text())["parents"]["digits"] if state.is_file() else None
            # 2. Resume it, and take the server away as the resumed study starts: its calls wait in the journal and
            # reach the server once it is back (it takes 15-40 s to answer again).
            proc = self._popen("search2.log", "--resume")
            deadline = time.monotonic() + PHASE_S
            while proc.poll() is None and "mlfd tune: study digits" not in (self.root / "search2.log").read_text():
                assert time.monotonic() < deadline, f"resumed study did not start\n{self.log('search2.log')}"
                time.sleep(0.2)
            self.server.stop()
            self.outage = True
            self.server.start()
            self.rc.append(self._wait(proc, "resumed search"))
            self.server.wait_ready()
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def log(self, name: str) -> str:
        f = self.root / name
        return f.read_text()[-6000:] if f.is_file() else ""

    def result(self) -> "SearchScenario":
        assert self._thread is not None
        self._thread.join(timeout=2 * PHASE_S + READY_S + 60)
        assert not self._thread.is_alive(), "search scenario still running"
        if self.error is not None:
            raise AssertionError(f"search scenario failed: {self.error!r}\n--- first run\n{self.log('search1.log')}"
                                 f"\n--- resumed run\n{self.log('search2.log')}\n--- server\n"
                                 f"{self.server.log_tail()}") from self.error
        return self

    def close(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=120)
        self.server.stop()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact store for the search and `mlfd run`: the teachers are trained once."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module", autouse=True)
def _background_search(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                       shared_store: Path):
    """Start the search scenario at once (when a selected test needs it), so it runs alongside the other tests."""
    if not any("search" in item.fixturenames for item in request.session.items):
        yield None
        return
    scenario = SearchScenario(tmp_path_factory.mktemp("search"), shared_store).start()
    yield scenario
    scenario.close()


@pytest.fixture(scope="module")
def search(_background_search: SearchScenario) -> SearchScenario:
    return _background_search.result()


@pytest.fixture(scope="module", autouse=True)
def _journal_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The journal test's server, started with the module: it boots while the first test runs."""
    if not any("journal_server" in item.fixturenames for item in request.session.items):
        yield None
        return
    server = MlflowServer(tmp_path_factory.mktemp("journal-server")).start()
    yield server
    server.stop()


@pytest.fixture
def journal_server(_journal_server: MlflowServer) -> MlflowServer:
    return _journal_server.wait_ready()


# ----------------------------------------------------------------------------------------------------------------
# Foreground tests (they run while the search does)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unreachable_server_fails_before_any_compute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 with one line naming tracking_uri; no Ray, no trials, and the output directory is not claimed."""
    port = free_port()  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "search"
    r = subprocess.run([sys.executable, "-m", "mlfd.cli", "tune", str(JOB), "--smoke", "--out", str(out),
                        *sets(SEARCH_SETS + [f"tracking_uri={uri}"])], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("mlfd: error: tracking_uri: "), r.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    assert "Ray" not in r.stdout + r.stderr, r.stdout[-2000:]
    assert not out.exists()  # no search.json (a rerun would be refused), no ray/, no store/, no trials

    from mlfd.cli import main  # `mlfd run --tracking-uri`: the same check, before any stage

    capsys.readouterr()
    assert main(["run", str(PIPELINE), "--smoke", "--out", str(tmp_path / "run"), "--tracking-uri", uri,
                 *sets(RUN_SETS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mlfd: error: tracking_uri: ") and f"127.0.0.1:{port}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tracker_journal_keeps_calls_while_server_is_down(tmp_path: Path, journal_server: MlflowServer) -> None:
    """Server stopped mid-way: calls go to the journal within seconds, with a warning; replayed after a restart."""
    server = journal_server
    journal = tmp_path / "out" / "mlflow_pending.jsonl"
    try:
        t = Tracker(server.uri, "journal-test", journal)
        rid = t.start_run("trial", {"mlfd.trial_id": "t1"})
        t.log_metrics(rid, {"val/acc1": 10.0}, step=1)
        server.stop()

        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="unreachable"):
            t.log_metrics(rid, {"val/acc1": 20.0, "train/loss/kd": 0.5, "skipped": float("nan")}, step=2)
        t.log_params(rid, {"student.alpha": 0.25, "tracking.password": "hunter2",
                           "job.tracking_uri": "http://me:hunter2@mlflow.example:5000"})
        t.end_run(rid)
        child = t.start_run("child", {TAG_PARENT: rid, "mlfd.trial_id": "t2"})  # a run created while away
        assert child.startswith(PENDING_PREFIX)
        t.log_metrics(child, {"val/acc1": 30.0}, step=1)
        t.end_run(child)
        # a run to continue, asked for while away: whether it exists is decided at replay, so no duplicate
        again = t.start_run("trial", {"mlfd.trial_id": "t1"}, reuse={"mlfd.trial_id": "t1"})
        assert again.startswith(PENDING_PREFIX)
        t.log_metrics(again, {"val/acc1": 25.0}, step=3)
        t.end_run(again)
        elapsed = time.monotonic() - t0
        assert elapsed < 60, f"journalling took {elapsed:.0f} s: MLflow's HTTP retries are not bounded"
        entries = [json.loads(ln) for ln in journal.read_text().splitlines()]
        assert [e["fn"] for e in entries] == ["log_batch", "log_batch", "set_terminated", "create_run", "log_batch",
                                              "set_terminated", "create_run", "log_batch", "set_terminated"]
        assert entries[6]["reuse"] == {"mlfd.trial_id": "t1"} and "reuse" not in entries[3]
        assert "hunter2" not in journal.read_text()

        server.start().wait_ready()  # the same port and database
        assert Tracker(server.uri, "journal-test", journal).flush() == 0  # e.g. a later process replays it
        assert not journal.exists()

        c = client(server.uri)
        run = c.get_run(rid)
        assert [(m.step, m.value) for m in c.get_metric_history(rid, "val/acc1")] == [(1, 10.0), (2, 20.0), (3, 25.0)]
        assert run.data.metrics["train/loss/kd"] == 0.5 and "skipped" not in run.data.metrics
        assert run.data.params == {"student.alpha": "0.25", "tracking.password": "***",
                                   "job.tracking_uri": "http://***@mlflow.example:5000"}
        assert run.info.status == "FINISHED"
        kids = c.search_runs([run.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{rid}'")
        assert len(kids) == 1 and kids[0].data.tags["mlfd.trial_id"] == "t2"
        assert kids[0].data.metrics == {"val/acc1": 30.0} and kids[0].info.status == "FINISHED"
        assert t.resolve_id(child) == kids[0].info.run_id
        assert t.resolve_id(again) == rid and len(c.search_runs([run.info.experiment_id])) == 2
    finally:
        server.stop()


@pytest.mark.slow
def test_pipeline_run_logs_parent_and_one_child_per_stage(tmp_path: Path, shared_store: Path) -> None:
    """`mlfd run` with the default tracking (SQLite in OUT): one parent, one child per stage, curves per epoch."""
    from mlfd.cli import main

    out = tmp_path / "run"
    rc = main(["run", str(PIPELINE), "--smoke", "--quiet", "--out", str(out), "--store", str(shared_store),
               *sets(RUN_SETS)])
    assert rc == 0
    assert (out / "mlflow.db").is_file() and not (out / "mlflow_pending.jsonl").exists()
    c = client(f"sqlite:///{out / 'mlflow.db'}")
    runs = all_runs(c, "offline-default")
    parents, children = split_runs(runs)
    labels = ["teacher mnist", "teacher fashion", "teacher digits", "joint teacher L1", "student digits L1"]
    assert len(parents) == 1 and sorted(r.data.tags[TAG_STAGE] for r in children) == sorted(labels)
    parent = parents[0]
    assert parent.data.tags[TAG_STAGE] == "pipeline" and parent.data.tags.get("mlflow.source.git.commit")
    assert parent.data.params["student.alpha"] == "0.6" and parent.data.params["fusion_levels"] == "[1]"
    assert {r.data.tags[TAG_PARENT] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}, statuses(runs)
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"results.parquet", "pipeline.yaml"}

    results = pd.read_parquet(out / "results.parquet")
    by_stage = {r.data.tags[TAG_STAGE]: r for r in children}
    for name in ("mnist", "fashion", "digits"):
        r = by_stage[f"teacher {name}"]
        assert r.data.tags[TAG_DATASET] == name and TAG_LEVEL not in r.data.tags
        row = results[(results.dataset == name) & (results.role == "dataset_specific") & (results.split == "test")]
        assert history_len(c, r.info.run_id, "val/acc1") == int(row.epochs.iloc[0]) == 1
        assert r.data.metrics["test/acc1"] == pytest.approx(float(row.acc1.iloc[0]))
    student = by_stage["student digits L1"]
    assert student.data.tags[TAG_DATASET] == "digits" and student.data.tags[TAG_LEVEL] == "1"
    row = results[(results.role == "student") & (results.split == "test")]
    assert history_len(c, student.info.run_id, "val/acc1") == int(row.epochs.iloc[0]) == 2
    assert {"train/loss", "train/loss/kd", "train/loss/mse_l1", "val/acc5", "test/acc1", "test/acc5",
            "best/val/acc1"} <= set(student.data.metrics)
    assert student.data.metrics["test/acc1"] == pytest.approx(float(row.acc1.iloc[0]))
    joint = by_stage["joint teacher L1"]
    assert joint.data.tags[TAG_LEVEL] == "1" and TAG_DATASET not in joint.data.tags  # three datasets
    assert joint.data.tags["mlfd.cache_on_device"] == "true"  # auto: the smoke caches fit the host's memory
    assert history_len(c, joint.info.run_id, "val/acc1/digits") == 2


# ----------------------------------------------------------------------------------------------------------------
# The search (logged to a real `mlflow server` on 127.0.0.1, interrupted and resumed)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_logs_to_remote_server(search: SearchScenario) -> None:
    assert search.rc[-1] == 0, search.log("search2.log")
    c = client(search.server.uri)  # read back over HTTP
    runs = all_runs(c, "quickstart")  # one experiment per job
    assert {e.name for e in c.search_experiments()} <= {"quickstart", "Default"}
    assert len(runs) == 3
    assert not (search.out / "mlflow.db").exists()  # nothing went to the default SQLite store
    assert not (search.out / "mlflow_pending.jsonl").exists()


@pytest.mark.slow
def test_search_run_hierarchy(search: SearchScenario) -> None:
    c = client(search.server.uri)
    runs = all_runs(c, "quickstart")
    parents, children = split_runs(runs)
    trials = pd.read_parquet(search.out / "trials.parquet")
    assert len(trials) == 2 and len(parents) == 1 and len(children) == len(trials)
    parent = parents[0]
    assert {r.info.status for r in runs} == {"FINISHED"}, statuses(runs)

    # Parent: the study, the job file, the search space, the git commit.
    commit = parent.data.tags["mlflow.source.git.commit"]  # HEAD then (others may have committed since)
    assert len(commit) == 40 and subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit,
                                                 "HEAD"]).returncode == 0, commit
    assert parent.data.tags["mlfd.study"] == "digits" and parent.data.tags["mlfd.job_file"] == str(JOB)
    assert parent.data.params["job.num_samples"] == "2" and parent.data.params["job.stage"] == "students"
    assert parent.data.params["job.tracking_uri"] == search.server.uri
    inputs = {Path(a.path).name for a in c.list_artifacts(parent.info.run_id, "inputs")}
    assert inputs == {"quickstart.yaml", "students.yaml", "offline_default.yaml"}

    # Children: one per trial, nested, tagged, params = the resolved trial config, a metric per epoch.
    assert {r.data.tags[TAG_PARENT] for r in children} == {parent.info.run_id}
    by_trial = {r.data.tags[TAG_TRIAL]: r for r in children}
    assert sorted(by_trial) == sorted(trials.trial_id)
    for _, row in trials.iterrows():
        run = by_trial[row.trial_id]
        tags, params = run.data.tags, run.data.params
        assert tags[TAG_DATASET] == "digits" and tags[TAG_STAGE] == "students"
        assert tags[TAG_LEVEL] == str(int(row["config/fusion_level"]))
        assert float(params["student.alpha"]) == pytest.approx(float(row["config/student.alpha"]))
        assert float(params["student.temperature"]) == pytest.approx(float(row["config/student.temperature"]))
        assert params["fusion_levels"] == f"[{int(row['config/fusion_level'])}]"
        assert params["datasets.digits.max_train"] == "100" and params["student.recipe.epochs"] == "2"
        assert history_len(c, run.info.run_id, "val/acc1") == int(row.epochs) >= 1
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss/kd")) == \
            list(range(1, int(row.epochs) + 1))
        assert {"val/acc1", "val/acc5", "train/loss", "train/loss/kd", "train/loss/mse_l1"} <= set(run.data.metrics)
        assert run.data.metrics["val/acc1"] == pytest.approx(float(row["final/val/acc1"]))


@pytest.mark.slow
def test_search_survives_the_server_going_away(search: SearchScenario) -> None:
    """The server was stopped as the resumed study started: the search finished, said so, and every call it kept
    in the journal reached the server once it was back (the other tests check those runs and metrics)."""
    assert search.outage and search.rc[-1] == 0, search.log("search2.log")
    assert "mlfd: warning: MLflow unreachable; tracking calls kept in" in (search.root / "search2.log").read_text()
    assert not (search.out / "mlflow_pending.jsonl").exists()


@pytest.mark.slow
def test_search_resume_continues_the_same_runs(search: SearchScenario) -> None:
    assert search.rc[0] == 130, f"the first run was not interrupted (exit {search.rc[0]})\n{search.log('search1.log')}"
    assert search.finished_before_interrupt, "interrupted before any trial finished"
    # Interrupted: nothing is left RUNNING (the study's parent and unfinished trials are KILLED).
    assert "RUNNING" not in search.after_interrupt.values(), search.after_interrupt
    assert search.after_interrupt["search-digits"] == "KILLED"
    trials_then = sorted(v for k, v in search.after_interrupt.items() if k != "search-digits")
    assert trials_then in (["FINISHED"], ["FINISHED", "KILLED"]), search.after_interrupt  # KILLED: the one in flight
    c = client(search.server.uri)
    runs = all_runs(c, "quickstart")
    parents, children = split_runs(runs)
    trial_ids = [r.data.tags[TAG_TRIAL] for r in children]
    assert len(trial_ids) == len(set(trial_ids)) == 2, trial_ids  # no duplicate run for a resumed trial
    assert set(search.finished_before_interrupt) <= set(trial_ids)
    state = json.loads((search.out / STATE_FILE).read_text())
    assert [p.info.run_id for p in parents] == [state["parents"]["digits"]] == [search.parent_before]
    assert {r.info.status for r in runs} == {"FINISHED"}, statuses(runs)


@pytest.mark.slow
def test_search_best_model_logged_under_parent(search: SearchScenario) -> None:
    import mlflow
    import torch

    from mlfd.config import load_pipeline, to_dict
    from mlfd.data import load_dataset
    from mlfd.models import create_model
    from mlfd.stages.common import read_metrics
    from mlfd.store import load_torch

    c = client(search.server.uri)
    parents, _ = split_runs(all_runs(c, "quickstart"))
    parent = parents[0]
    plan = SearchPlan.load(search.out)
    best_yaml = search.out / "best" / "digits.yaml"
    art = best_artifact(plan, best_yaml, "digits")
    assert art is not None and art.kind == "student"
    metrics = read_metrics(art)
    assert parent.data.metrics["test/acc1"] == pytest.approx(metrics["test"]["acc1"])
    assert parent.data.metrics["test/acc5"] == pytest.approx(metrics["test"]["acc5"])
    assert parent.data.metrics["best/val/acc1"] == pytest.approx(metrics["val"]["acc1"])

    # Artifacts: the exported best YAML and the state dict, identical to the files they came from.
    dest = search.root / "downloaded"
    got = Path(c.download_artifacts(parent.info.run_id, "best", str(dest)))
    assert (got / "digits.yaml").read_text() == best_yaml.read_text()
    stored = load_torch(art.file("model.pt"))
    logged = load_torch(got / "model.pt")
    assert stored.keys() == logged.keys() and all(torch.equal(stored[k], logged[k]) for k in stored)
    assert json.loads((got / "preprocessing.json").read_text())["input_size"] == 32

    # The MLflow model predicts what the student built from the stored state dict predicts (any batch size).
    spec = load_pipeline(best_yaml)
    ds = spec.dataset("digits")
    net = create_model(type(ds.student_net)(**{**to_dict(ds.student_net), "checkpoint": None, "pretrained": False}),
                       load_dataset(ds).num_classes)
    net.load_state_dict(stored)
    net.eval()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(search.server.uri)  # models:/ URIs resolve through the tracking server
    try:
        model = mlflow.pytorch.load_model(parent.data.tags["mlfd.best_model_uri"])
    finally:
        mlflow.set_tracking_uri(previous)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = net(x), model(x)
    assert actual.shape == (5, 10)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)

    # --register NAME: one version, from this run (a resumed search does not register the study again).
    versions = c.search_model_versions(f"name='{REGISTERED}'")
    assert [v.run_id for v in versions] == [parent.info.run_id]


def test_input_files_are_logged_without_credentials(tmp_path: Path) -> None:
    """A search's parent run gets the job, space and pipeline files as artifacts under inputs/ (real MLflow, SQLite
    store): read back from MLflow, they hold no credential (user:password@ of URIs, values of secret-named keys), and
    every other line is the file's own. The job's params are redacted the same way."""
    from mlfd.tracking import SearchTracking

    secret_job = ("name: leaky\nstage: students\ntracking_uri: http://alice:s3cr3t@mlflow.example:5000\n"
                  "storage_path: s3://AKIA:k3y@bucket/ray\nset: [pipeline.student.recipe.lr=0.1]\napi_token: abc123\n"
                  "extra:\n  - password = hunter2\n")
    files = {"job.yaml": secret_job, "space.yaml": (ROOT / "search_spaces" / "students.yaml").read_text(),
             "pipeline.yaml": PIPELINE.read_text()}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = JobSpec(pipeline="pipeline.yaml", space="space.yaml", name="leaky", stage="students",
                  tracking_uri="http://alice:s3cr3t@mlflow.example:5000", storage_path="s3://AKIA:k3y@bucket/ray")
    plan = SearchPlan(job=job, pipeline={}, studies=["digits"], job_file=str(tmp_path / "job.yaml"),
                      pipeline_file=str(tmp_path / "pipeline.yaml"), space_file=str(tmp_path / "space.yaml"),
                      storage_path=job.storage_path, store=str(tmp_path / "store"), tracking_uri=uri)
    tracking = SearchTracking(tmp_path / "out")
    tracking.open(plan)
    rid = tracking.parent(plan, "digits")

    c = client(uri)
    assert sorted(a.path for a in c.list_artifacts(rid, "inputs")) == [f"inputs/{n}" for n in sorted(files)]
    logged = {n: Path(c.download_artifacts(rid, f"inputs/{n}", str(tmp_path / "back"))).read_text() for n in files}
    assert logged["space.yaml"] == files["space.yaml"] and logged["pipeline.yaml"] == files["pipeline.yaml"]
    job = logged["job.yaml"]
    for secret in ("s3cr3t", "alice", "AKIA", "k3y", "abc123", "hunter2"):
        assert secret not in job, job
    assert job.splitlines() == ["name: leaky", "stage: students", "tracking_uri: http://***@mlflow.example:5000",
                                "storage_path: s3://***@bucket/ray", "set: [pipeline.student.recipe.lr=0.1]",
                                "api_token: '***'", "extra:", "  - password = '***'"]
    params = c.get_run(rid).data.params
    assert params["job.tracking_uri"] == "http://***@mlflow.example:5000"
    assert params["job.storage_path"] == "s3://***@bucket/ray"
