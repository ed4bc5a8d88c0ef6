"""Shared test helpers and fixtures (imported by test files as ``from conftest import ...``).

* ``ROOT``, this checkout's root, first on ``sys.path`` (the package need not be installed; pytest works from any
  directory), and ``ENV``, the environment of every subprocess a test starts (it imports this checkout's ``mlfd``);
* running the real ``mlfd`` CLI in a subprocess, and the processes it leaves behind;
* reading what a finished ``mlfd tune`` search wrote (trials.parquet, search.json, Ray's trial directories).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from mlfd.search import SearchPlan

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Ray turns on token auth for local clusters by default; local CI runs without it (as .ci/run does).
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
CLI_ENV = ENV

DATASETS = ("mnist", "fashion", "digits")
"""The offline default pipeline's datasets (pipelines/offline_default.yaml)."""


# --------------------------------------------------------------------------------------------------------------------
# Reading a search's outputs
# --------------------------------------------------------------------------------------------------------------------


def experiment_dir(out: Path, study: str) -> Path:
    """Ray Tune's experiment directory of one study of a quickstart search written to ``out``."""
    return out / "ray" / f"quickstart-{study}"


def result_lines(exp: Path, trial_id: str) -> list[str]:
    """The trial's result.json, one reported epoch per line (none for a trial that has not started)."""
    found = list(exp.glob(f"run_stage_{trial_id}_*"))
    assert len(found) <= 1, f"trial {trial_id}: more than one directory in {exp}: {found}"
    f = found[0] / "result.json" if found else None
    return f.read_text().splitlines() if f is not None and f.is_file() else []


def snapshot_status(exp: Path) -> dict[str, str]:
    """trial id -> status in Ray Tune's latest experiment snapshot (what ``Tuner.restore`` will start from)."""
    files = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.name)  # one per session, named by its start
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
        return {t["trial_id"]: t["status"] for t in (json.loads(s) for s, _ in data["trial_data"])}
    except (OSError, ValueError, KeyError):  # being rewritten: read it again on the next poll
        return {}


@dataclass
class Search:
    """A finished search: its output directory, trials.parquet, search.json (the plan)."""

    out: Path
    trials: pd.DataFrame
    plan: SearchPlan
    args: list[str]
    """The ``mlfd tune`` arguments that made it."""
    output: str = ""
    """What the command printed (stdout and stderr together), when a test ran it."""


def read_search(out: Path, args: list[str]) -> Search:
    return Search(out, pd.read_parquet(out / "trials.parquet"), SearchPlan.load(out), args)


# --------------------------------------------------------------------------------------------------------------------
# The mlfd CLI in a subprocess
# --------------------------------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process on the host (Linux /proc; no psutil needed)."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            out.setdefault(ppid, []).append(int(name))
    return out


def identity(pid: int) -> str | None:
    """``<start time> <command line>`` of a live process (a reused pid gets another), None when it is gone or a
    zombie. The command line is read at each call: Ray workers rename themselves (ray::IDLE -> ray::ImplicitFunc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return f"{fields[19]} {cmd}"
    except OSError:
        return None


def same_process(pid: int, ident: str) -> bool:
    now = identity(pid)
    return now is not None and now.split(" ", 1)[0] == ident.split(" ", 1)[0]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (pid -> identity)."""
    tree, out, todo = _children(), {}, [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            ident = identity(c)
            if ident is not None:
                out[c] = ident
                todo.append(c)
    return out


@dataclass
class CliRun:
    """A ``python -m mlfd.cli`` subprocess and every process it started (recorded while it ran)."""

    args: list[str]
    cwd: Path
    env: dict = field(default_factory=lambda: dict(CLI_ENV))
    proc: subprocess.Popen | None = None
    spawned: dict[int, str] = field(default_factory=dict)

    def start(self) -> CliRun:
        self._out = open(self.cwd / f"cli-{time.monotonic_ns()}.log", "w+")
        # Own session: signals meant for the driver reach only the driver, as `kill -INT <pid>` would.
        self.proc = subprocess.Popen([sys.executable, "-m", "mlfd.cli", *self.args], cwd=self.cwd, env=self.env,
                                     stdout=self._out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return self

    def record(self) -> None:
        """Remember the driver's current descendants (Ray's head processes, workers), to find leftovers later."""
        self.spawned.update(descendants(self.proc.pid))

    def poll(self) -> int | None:
        self.record()
        return self.proc.poll()

    @property
    def output(self) -> str:
        self._out.flush()
        self._out.seek(0)
        return self._out.read()

    def wait(self, timeout: float) -> int:
        """Wait for the driver to exit; on timeout interrupt it, kill it, clean up, and fail."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                self.cleanup()
                pytest.fail(f"mlfd {' '.join(self.args[:2])} did not finish in {timeout:.0f}s; output tail:\n"
                            f"{self.output[-4000:]}")
            time.sleep(0.5)
        return self.proc.returncode

    def leftovers(self, grace: float = 30.0, ignore: tuple[str, ...] = ()) -> dict[int, str]:
        """Processes the driver started that are still alive once it has exited: waits up to ``grace`` seconds for
        them to go (those whose command line contains a word of ``ignore`` are not waited for)."""
        deadline = time.monotonic() + grace
        while True:
            alive = {p: identity(p) for p, c in self.spawned.items() if same_process(p, c)}
            waited = [c for c in alive.values() if not any(w in c for w in ignore)]
            if not waited or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)

    def cleanup(self, grace: float = 0.0) -> dict[int, str]:
        """Kill (by pid, after checking it is still the process recorded) what the driver left behind; returns what
        was alive ``grace`` seconds after the driver exited."""
        left = self.leftovers(grace)
        alive = dict(left)
        for sig in (signal.SIGTERM, signal.SIGKILL) if alive else ():
            for p, c in alive.items():
                if same_process(p, c):
                    try:
                        os.kill(p, sig)
                    except OSError:
                        pass
            time.sleep(2.0)
            alive = {p: c for p, c in alive.items() if same_process(p, c)}
            if not alive:
                break
        return left


@pytest.fixture(scope="session")
def offline_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact store for the searches of the offline default pipeline's smoke variant with 100 train images per
    dataset (test_faults.py, test_tune.py): the teachers and their feature caches are built by the first search and
    read by the others, as a user's searches on one store would. Their trials must not share a configuration (a
    student found in the store is not trained again), so the fault-injection search avoids the quickstart's first
    point (the paper's alpha 0.6)."""
    return tmp_path_factory.mktemp("offline-store")


@pytest.fixture(scope="module")
def mlfd_cli(tmp_path_factory: pytest.TempPathFactory):
    """``mlfd_cli(*args, timeout=...)`` runs ``python -m mlfd.cli ARGS`` to the end and returns the finished CliRun;
    ``mlfd_cli.start(*args)`` returns a running one. Whatever a run leaves behind is killed at teardown."""
    logs = tmp_path_factory.mktemp("cli")
    runs: list[CliRun] = []

    def start(*args: str, env: dict | None = None) -> CliRun:
        r = CliRun([str(a) for a in args], logs, env={**CLI_ENV, **(env or {})}).start()
        runs.append(r)
        return r

    def run(*args: str, timeout: float = 600) -> CliRun:
        r = start(*args)
        r.wait(timeout)
        return r

    run.start = start
    yield run
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
        r.cleanup()
        r._out.close()
