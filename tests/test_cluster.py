"""``mlfd tune`` on a real two-node Ray cluster on this machine, and the ways a cluster search stops.

* A head and a worker, each with its own raylet and 1 CPU (``ray.cluster_utils.Cluster`` in a child process), all on
  127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` for the cluster and the driver). ``mlfd tune --address`` runs the
  smoke quickstart against it with MLflow on a real ``mlflow server``. The storage path and the artifact store sit in
  one directory of this machine's disk that both nodes see: it stands in for the NFS volume of a real cluster (the
  store's lock files work across the nodes' processes here; on NFS they need a server with lock support).
  The worker node (its raylet and its workers) is SIGKILLed while a trial runs there: the trial continues on the head
  from its last checkpoint and the search completes, every trial once in trials.parquet and in MLflow.
* When no surviving node can host a trial (trials of 2 CPUs, the only 2-CPU node lost), the search stops with its state
  saved, exit 2 and one line naming the lost node; ``--resume`` after a fresh node joined finishes it.
* A cluster that cannot be reached fails within ``--connect-timeout`` with exit 2 and a one-line cause; Ctrl-C and
  SIGTERM stop the driver while it waits.
* SIGTERM in the middle of a (local) search stops it like Ctrl-C: exit 143, MLflow runs KILLED, the --resume hint,
  no Ray process left.
* What cannot work on a cluster is refused before any compute (exit 2).
* deploy/ files run real ``mlfd`` command lines.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import CLI_ENV, CliRun, descendants, identity, same_process, snapshot_status
from test_tracking import MlflowServer, all_runs, client, free_port, history_len, split_runs
from test_tune import JOB, experiment_dir, one_line_error, read_search, result_lines, same_epoch, tiny, wait_for

from mlfd.tracking import TAG_NODE, TAG_TRIAL  # noqa: E402
from mlfd.tune.launch import LOOPBACK_ENV, TERM_GRACE_S, check_cluster_resources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {LOOPBACK_ENV: "0"}
# A lost node is declared dead after about 3 missed health checks of 1 s (Ray's default: 5 of 3 s plus a timeout).
HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
          "RAY_health_check_failure_threshold": "3"}
SAMPLES = 4
CLUSTER_EPOCHS = 3  # the smoke variant's student epochs
# One study, every trial runs every epoch (no early stop): 4 trials, 2 at a time, one per node. The digits students
# train on the smoke variant's 300 images (1-2 s per epoch here), so a trial that has reported its first epoch on the
# worker is caught there before it finishes.
CLUSTER_ARGS = ["--smoke", "--set=studies=[digits]", f"--set=num_samples={SAMPLES}", "--set=max_concurrent_trials=2",
                "--set=scheduler.type=none", "--set=points_to_evaluate=[]", "--set=seed=31", "--set=max_failures=2",
                f"--set=pipeline.student.recipe.epochs={CLUSTER_EPOCHS}", *tiny(100),
                "--set=pipeline.datasets.digits.max_train=300"]

CLUSTER_SCRIPT = """
import json, sys, time
import ray._private.utils
from ray.cluster_utils import Cluster
# Cluster() records its address in /tmp/ray/ray_current_cluster, where every plain ray.init() on this machine would
# find it and try to join (other users' local searches included), and it stays there when the cluster is killed by
# pid: this cluster is reached only through its address.
ray._private.utils.write_ray_address = lambda *args, **kwargs: None
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
c.add_node(num_cpus=int(sys.argv[1]))
c.wait_for_nodes()
info = lambda n: {"node_id": n.node_id, "raylet": n.all_processes["raylet"][0].process.pid}
print(json.dumps({"address": c.address, "nodes": [info(n) for n in c.list_all_nodes()]}), flush=True)
for line in sys.stdin:  # "add CPUS LOST_NODE_ID": forget a killed worker, add a fresh one
    _, cpus, lost = line.split()
    for n in [n for n in c.worker_nodes if n.node_id == lost]:
        c.remove_node(n, allow_graceful=False)
    n = c.add_node(num_cpus=int(cpus))
    c.wait_for_nodes(timeout=120)
    print(json.dumps(info(n)), flush=True)
while True:
    time.sleep(3600)
"""


def cluster_env(loopback: bool = True) -> dict:
    env = {k: v for k, v in CLI_ENV.items() if k not in ("RAY_ADDRESS", LOOPBACK_ENV)}
    return {**env, **(LOOPBACK if loopback else {}), **HEALTH}


@dataclass
class LocalCluster:
    """A two-node Ray cluster (head with 1 CPU, worker with ``worker_cpus``) in a child process; stopped by the pids
    it started."""

    root: Path
    worker_cpus: int = 1
    proc: subprocess.Popen | None = None
    address: str = ""
    head: dict = field(default_factory=dict)
    worker: dict = field(default_factory=dict)
    spawned: dict[int, str] = field(default_factory=dict)

    def start(self, timeout: float = 240) -> LocalCluster:
        self.log = open(self.root / "cluster.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, str(self.worker_cpus)], cwd=self.root,
                                     env=cluster_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        line = ""
        while not line:
            assert self.proc.poll() is None and time.monotonic() < deadline, f"cluster did not start:\n{self.tail()}"
            line = self.proc.stdout.readline().strip()
        info = json.loads(line)
        self.address = info["address"]
        self.head, self.worker = info["nodes"]  # the head first (list_all_nodes)
        self.record()
        current = Path("/tmp/ray/ray_current_cluster")
        assert not current.is_file() or current.read_text().strip() != self.address, "other ray.init() would join"
        return self

    def record(self) -> None:
        self.spawned.update(descendants(self.proc.pid))

    def replace_worker(self, cpus: int) -> dict:
        """A fresh worker node with ``cpus`` CPUs in place of the (killed) worker; it becomes ``self.worker``."""
        self.proc.stdin.write(f"add {cpus} {self.worker['node_id']}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line, f"cluster could not add a node:\n{self.tail()}"
        self.worker = json.loads(line)
        self.record()
        return self.worker

    def node_processes(self, node: dict) -> dict[int, str]:
        """A node's raylet and everything it started (its workers)."""
        pid = node["raylet"]
        return {pid: identity(pid), **descendants(pid)} if identity(pid) else {}

    def kill_node(self, node: dict) -> dict[int, str]:
        """SIGKILL a node: its raylet and its workers, as a machine that loses power."""
        procs = self.node_processes(node)
        self.spawned.update(procs)
        for p, ident in procs.items():
            if same_process(p, ident):
                os.kill(p, signal.SIGKILL)
        return procs

    def tail(self) -> str:
        self.log.flush()
        return (self.root / "cluster.log").read_text()[-3000:]

    def stop(self) -> dict[int, str]:
        """Kill every process of the cluster by pid; returns those still alive afterwards (should be none)."""
        self.record()
        alive = {**self.spawned, self.proc.pid: identity(self.proc.pid)}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p, ident in alive.items():
                if ident and same_process(p, ident):
                    try:
                        os.kill(p, sig)
                    except OSError:
                        pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(i and same_process(p, i) for p, i in alive.items()):
                time.sleep(0.3)
        self.proc.wait(10)
        self.proc.stdin.close()
        self.log.close()
        return {p: i for p, i in alive.items() if i and same_process(p, i)}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("cluster-mlflow")).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:
        if c.proc is not None:
            left = c.stop()
            assert not left, f"cluster processes still alive after teardown: {left}"


def tune_args(out: Path, shared: Path, address: str, uri: str, *extra: str) -> list:
    return ["tune", JOB, "--out", out, "--address", address, *CLUSTER_ARGS, f"--set=storage_path={out / 'ray'}",
            f"--set=store={shared / 'store'}", f"--set=tracking_uri={uri}", *extra]


# --------------------------------------------------------------------------------------------------------------------
# Two nodes, one of them lost mid-search
# --------------------------------------------------------------------------------------------------------------------


def running_on(exp: Path, node_id: str) -> list[str]:
    """Trials whose latest report came from ``node_id`` and that have epochs left to train."""
    found = []
    for d in exp.glob("run_stage_*"):
        lines = result_lines(exp, d.name.split("_")[2])
        try:
            last = json.loads(lines[-1]) if lines else {}
        except ValueError:  # a line being written
            continue
        if last.get("node") == node_id and last.get("training_iteration", CLUSTER_EPOCHS) < CLUSTER_EPOCHS - 1:
            found.append(d.name.split("_")[2])
    return found


LOST_SAMPLES = 2
# Trials of 2 CPUs: only the 2-CPU worker can host one (the head has 1 CPU). A name of its own keeps its MLflow
# experiment apart from the other searches on the module's server.
LOST_ARGS = ["--set=name=lost-node", f"--set=num_samples={LOST_SAMPLES}", "--set=resources.cpu=2", "--set=seed=37"]


def epoch_lines(exp: Path, trial_id: str) -> tuple[list[dict], list[int], dict[int, dict]]:
    """A trial's reported results, their epochs in order, and the first result of each epoch."""
    lines = [json.loads(x) for x in result_lines(exp, trial_id)]
    first: dict[int, dict] = {}
    for x in lines:
        first.setdefault(x["training_iteration"], x)
    return lines, [x["training_iteration"] for x in lines], first


@pytest.mark.slow
def test_losing_the_only_node_that_fits_stops_and_resumes(mlflow_server: MlflowServer, mlfd_cli,
                                                          tmp_path: Path) -> None:
    """Head 1 CPU + worker 2 CPUs, trials of 2 CPUs; the worker is SIGKILLed while a trial runs there. No live node
    can host the trials, so the search stops (state saved) with exit 2 and one line naming the lost node; a fresh
    2-CPU worker joins and ``--resume`` finishes it: every trial once in trials.parquet and in MLflow.

    Before the module's other cluster tests: its own cluster, so that two clusters never run at once.
    """
    cluster = LocalCluster(tmp_path, worker_cpus=2)
    try:
        cluster.start()
        shared = tmp_path / "shared"  # this machine's disk stands in for the NFS volume every node mounts
        (shared / "store").mkdir(parents=True)
        out = shared / "out"
        args = tune_args(out, shared, cluster.address, mlflow_server.uri, *LOST_ARGS)
        run = mlfd_cli.start(*args, "--lost-node-timeout", "5", env=cluster_env())
        exp = out / "ray" / "lost-node-digits"
        lost = cluster.worker["node_id"]
        killed = wait_for(run, lambda: running_on(exp, lost), "a trial reported an epoch on the worker", timeout=600)
        gone = cluster.kill_node(cluster.worker)
        t0 = time.monotonic()
        assert run.wait(300) == 2, run.output[-5000:]
        print(f"stopped {time.monotonic() - t0:.1f} s after the node was killed")
        # One line, the last one (Ray Tune has logged the trial's failure, with the traceback of the lost actor, above).
        errors = [line for line in run.output.splitlines() if line.startswith("mlfd: error:")]
        assert len(errors) == 1 and run.output.strip().splitlines()[-1] == errors[0], run.output[-3000:]
        for words in (f"lost Ray node {lost} (127.0.0.1): no live node can host a waiting trial ([CPU=2]",
                      f"--resume --out {out}"):
            assert words in errors[0], errors[0]
        assert "2 trial(s) wait for resources that no live Ray node has; the search stops in 5 s" in run.output
        assert not [p for p, i in gone.items() if same_process(p, i)], "worker node processes survived SIGKILL"
        assert not run.cleanup(grace=30)
        # Nothing lost: Tune saved the state with the killed trial still to finish, and no MLflow run is RUNNING.
        assert snapshot_status(exp)[killed[0]] != "TERMINATED", snapshot_status(exp)
        c = client(mlflow_server.uri)
        parents, children = split_runs(all_runs(c, "lost-node"))
        assert [r.info.status for r in parents] == ["KILLED"], [r.info.status for r in parents]
        assert {r.info.status for r in children} <= {"KILLED", "FINISHED"}, [r.info.status for r in children]

        fresh = cluster.replace_worker(2)["node_id"]
        resumed = mlfd_cli.start(*args, "--resume", env=cluster_env())
        assert resumed.wait(600) == 0, resumed.output[-5000:]
        assert not resumed.cleanup(grace=30)
    finally:
        left = cluster.stop() if cluster.proc is not None else {}
    assert not left, f"cluster processes still alive after teardown: {left}"

    df = read_search(out, [str(a) for a in args]).trials
    assert sorted(df["trial_id"]) == sorted(d.name.split("_")[2] for d in exp.glob("run_stage_*")), df["trial_id"]
    assert len(df) == LOST_SAMPLES and df["trial_id"].is_unique
    assert (df["status"] == "TERMINATED").all() and (df["epochs"] == CLUSTER_EPOCHS).all() and \
        (df["error"] == "").all(), df[["trial_id", "status", "epochs", "error"]]
    assert set(df["node"]) <= {lost, fresh}, (df["node"], lost, fresh)  # never on the 1-CPU head
    for _, r in df.iterrows():
        lines, iters, first = epoch_lines(exp, r["trial_id"])
        if r["trial_id"] in killed:  # continued on the fresh worker from its checkpoint
            assert r["nodes"] == f"{lost},{fresh}" and r["node"] == fresh, r[["nodes", "node"]]
            assert iters.count(1) == 1, f"trial {r['trial_id']} restarted from scratch: {iters}"
        assert sorted(first) == list(range(1, CLUSTER_EPOCHS + 1)) and iters == sorted(iters), iters
        assert all(same_epoch(x, first[x["training_iteration"]]) for x in lines), iters

    parents, children = split_runs(all_runs(c, "lost-node"))
    assert [r.info.status for r in parents] == ["FINISHED"], [r.info.status for r in parents]
    assert sorted(r.data.tags[TAG_TRIAL] for r in children) == sorted(df["trial_id"])
    for r in children:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        assert history_len(c, r.info.run_id, "val/acc1") == CLUSTER_EPOCHS


@pytest.mark.slow
def test_search_on_two_nodes_survives_losing_the_worker(cluster: LocalCluster, mlflow_server: MlflowServer,
                                                        mlfd_cli, tmp_path: Path) -> None:
    """The smoke search through ``--address`` on head + worker; the worker is SIGKILLed while a trial runs there."""
    shared = tmp_path / "shared"  # this machine's disk stands in for the NFS volume every node mounts
    (shared / "store").mkdir(parents=True)
    out = shared / "out"
    args = tune_args(out, shared, cluster.address, mlflow_server.uri)
    run: CliRun = mlfd_cli.start(*args, env=cluster_env())
    exp = experiment_dir(out, "digits")
    killed = wait_for(run, lambda: running_on(exp, cluster.worker["node_id"]), "a trial reported an epoch on the "
                      "worker node", timeout=600)
    gone = cluster.kill_node(cluster.worker)
    time.sleep(2)
    assert not [p for p, i in gone.items() if same_process(p, i)], "worker node processes survived SIGKILL"
    assert run.wait(600) == 0, run.output[-5000:]
    assert not run.cleanup(grace=30)

    df = read_search(out, [str(a) for a in args]).trials
    assert sorted(df["trial_id"]) == sorted(d.name.split("_")[2] for d in exp.glob("run_stage_*")), df["trial_id"]
    assert len(df) == SAMPLES and df["trial_id"].is_unique
    assert (df["status"] == "TERMINATED").all() and (df["epochs"] == CLUSTER_EPOCHS).all() and \
        (df["error"] == "").all(), df[["trial_id", "status", "epochs", "error"]]
    head, worker = cluster.head["node_id"], cluster.worker["node_id"]
    ran_on = {n for ns in df["nodes"] for n in ns.split(",")}
    assert ran_on == {head, worker}, (ran_on, head, worker)  # trials ran on both nodes
    assert set(df["node_ip"]) == {"127.0.0.1"} and (df["hostname"] != "").all()
    for _, r in df.iterrows():
        lines, iters, first = epoch_lines(exp, r["trial_id"])
        assert r["best/val/acc1"] == max(x["val/acc1"] for x in lines)
        if r["trial_id"] not in killed:
            assert iters == list(range(1, CLUSTER_EPOCHS + 1)), (r["trial_id"], iters)
            continue
        # Continued on the head from its checkpoint: epoch 1 is not trained again; an epoch reported after the last
        # saved state may be trained again from the checkpoint, with the same numbers.
        assert r["nodes"] == f"{worker},{head}" and r["node"] == head, r[["nodes", "node"]]
        assert iters == sorted(iters) and sorted(first) == list(range(1, CLUSTER_EPOCHS + 1)), iters
        assert iters.count(1) == 1, f"trial {r['trial_id']} restarted from scratch: {iters}"
        assert all(same_epoch(x, first[x["training_iteration"]]) for x in lines), iters
        assert {x["node"] for x in lines} == {worker, head}

    # Teachers and caches: built once in the shared store, by whichever node asked first; no half-built leftovers.
    store = shared / "store"
    assert len([p for p in (store / "teacher").iterdir() if not p.name.startswith(".")]) == 3
    assert not [p for p in store.rglob(".*.tmp")], "a builder left a temporary directory"

    # MLflow: one child run per trial with its node tag, each epoch logged once, nothing left RUNNING.
    c = client(mlflow_server.uri)
    parents, children = split_runs(all_runs(c, "quickstart"))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags[TAG_TRIAL] for r in children) == sorted(df["trial_id"])
    nodes = dict(zip(df["trial_id"], df["node"]))
    for r in children:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        assert r.data.tags[TAG_NODE] == nodes[r.data.tags[TAG_TRIAL]]
        assert history_len(c, r.info.run_id, "val/acc1") == CLUSTER_EPOCHS


# --------------------------------------------------------------------------------------------------------------------
# A cluster that cannot be reached; stopping while connecting
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loopback_cluster_without_the_env_var_fails_fast(cluster: LocalCluster, mlflow_server: MlflowServer,
                                                         mlfd_cli, tmp_path: Path) -> None:
    """The user's mistake: a head on 127.0.0.1, a driver without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray rewrites
    the address to this machine's IP, where nothing listens). Exit 2 within the timeout, one line naming the cause."""
    (tmp_path / "store").mkdir()
    out = tmp_path / "out"
    run = mlfd_cli.start(*tune_args(out, tmp_path, cluster.address, mlflow_server.uri, "--connect-timeout", "5"),
                         env=cluster_env(loopback=False))
    wait_for(run, lambda: "joining the Ray cluster" in run.output, "the driver tried to connect", timeout=300)
    t0 = time.monotonic()
    assert run.wait(60) == 2, run.output[-3000:]
    assert time.monotonic() - t0 < 30
    one_line_error(2, run.output, f"--address {cluster.address}", "within 5 s", f"{LOOPBACK_ENV}=0")
    assert not (out / "search.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_stop_while_connecting(sig: signal.Signals, rc: int, mlflow_server: MlflowServer, mlfd_cli,
                               tmp_path: Path) -> None:
    """Nothing listens at the address: the driver waits (up to 10 min) and a signal stops it at once."""
    (tmp_path / "store").mkdir()
    out = tmp_path / "out"
    address = f"127.0.0.1:{free_port()}"
    run = mlfd_cli.start(*tune_args(out, tmp_path, address, mlflow_server.uri, "--connect-timeout", "600"),
                         env=cluster_env())
    wait_for(run, lambda: "joining the Ray cluster" in run.output, "the driver tried to connect", timeout=300)
    time.sleep(2)
    t0 = time.monotonic()
    run.proc.send_signal(sig)
    assert run.wait(30) == rc, run.output[-3000:]
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in run.output, run.output[-3000:]
    assert not (out / "search.json").exists()
    assert not run.cleanup(grace=10)


# --------------------------------------------------------------------------------------------------------------------
# SIGTERM mid-search: a normal stop
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_mid_search_stops_like_ctrl_c(mlfd_cli, offline_store: Path, tmp_path: Path) -> None:
    """Kubernetes/Slurm preemption: SIGTERM while a trial runs (local Ray). Exit 143 within the stated grace period,
    the --resume hint last, MLflow runs KILLED, no Ray process left."""
    out = tmp_path / "out"
    args = ["tune", JOB, "--out", out, "--smoke", "--set=studies=[digits]", "--set=num_samples=2",
            "--set=points_to_evaluate=[]", "--set=seed=41", "--set=scheduler.type=none", *tiny(100),
            f"--set=store={offline_store}"]
    run = mlfd_cli.start(*args)
    exp = experiment_dir(out, "digits")
    wait_for(run, lambda: [d for d in exp.glob("run_stage_*") if result_lines(exp, d.name.split("_")[2])],
             "a trial reported an epoch")
    run.record()
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    rc = run.wait(TERM_GRACE_S + 60)
    took = time.monotonic() - t0
    print(f"stopped {took:.1f} s after SIGTERM")
    assert rc == 143, (rc, run.output[-4000:])
    assert took < TERM_GRACE_S, f"stopped {took:.0f} s after SIGTERM (stated grace {TERM_GRACE_S} s)"
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("mlfd: stopped by SIGTERM") and f"--resume --out {out}" in last, run.output[-2000:]
    assert "SIGTERM received" in run.output and "Aborted" not in run.output
    left = run.cleanup(grace=30)
    assert not left, f"processes still alive after SIGTERM: {left}"
    c = client(f"sqlite:///{out / 'mlflow.db'}")
    parents, children = split_runs(all_runs(c, "quickstart"))
    statuses = [(r.info.run_name, r.info.status) for r in parents + children]
    assert [r.info.status for r in parents] == ["KILLED"], statuses
    # The trial that was running is KILLED; one that had finished just before the signal would stay FINISHED.
    child_status = {r.info.status for r in children}
    assert "KILLED" in child_status and child_status <= {"KILLED", "FINISHED"}, statuses


# --------------------------------------------------------------------------------------------------------------------
# Refused before any compute
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sets, words", [
    ([], ("storage_path", "--address")),
    (["storage_path=runs/ray"], ("storage_path", "absolute")),
    (["storage_path=/tmp/x/ray"], ("store", "--address")),
    (["storage_path=/tmp/x/ray", "store=/nonexistent/mlfd-store"], ("/nonexistent/mlfd-store", "does not exist")),
    (["resources.gpu=auto"], ("resources.gpu",)),
], ids=["no-storage-path", "relative-storage-path", "no-store", "store-missing", "gpu-auto"])
def test_what_cannot_work_on_a_cluster_is_refused(sets: list[str], words: tuple, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    import torch

    from mlfd.cli import main

    if "resources.gpu=auto" in sets and torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the cluster check is tested below")
    out = tmp_path / "out"
    rc = main(["tune", str(JOB), "--out", str(out), "--smoke", "--address", "127.0.0.1:1", "--connect-timeout", "1",
               *[f"--set={s}" for s in sets]])
    one_line_error(rc, capsys.readouterr().err, *words)
    assert not out.exists()


def test_cluster_resources_are_checked() -> None:
    """What ray.cluster_resources() says of the cluster: GPU trials need GPU nodes; a trial must fit in the cluster."""
    from mlfd.config import SpecError
    from mlfd.search import load_job

    gpu, _ = load_job(JOB, overrides=["resources.gpu=auto"])
    cpu, _ = load_job(JOB, overrides=["resources.cpu=4"])
    with pytest.raises(SpecError, match=r"resources.gpu: 'auto' asks for GPUs but the cluster at h:1 has none"):
        check_cluster_resources(gpu, {"CPU": 64.0}, "h:1")
    check_cluster_resources(gpu, {"CPU": 64.0, "GPU": 8.0}, "h:1")
    with pytest.raises(SpecError, match="resources.cpu: a trial asks for 4 CPUs but the cluster at h:1 has 2"):
        check_cluster_resources(cpu, {"CPU": 2.0}, "h:1")


def ray_node(node_id: str, alive: bool, cpus: float, gpus: float = 0.0, ip: str = "127.0.0.1") -> dict:
    """A ``ray.nodes()`` entry: ``Resources`` are the node's totals (a dead node keeps its last ones)."""
    res = {"CPU": cpus, "memory": 2e9, "object_store_memory": 1e9, f"node:{ip}": 1.0}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip, "NodeManagerHostname": "host",
            "Resources": {**res, **({"GPU": gpus} if gpus else {})}}


def test_lost_node_decision() -> None:
    """Whether pending trials can ever run: a request against the totals of the live nodes, not what is free now."""
    from types import SimpleNamespace

    from ray.tune import PlacementGroupFactory

    from mlfd.tune.watch import lost_nodes, stuck_reason, trial_bundles, unhostable

    head, worker, dead = ray_node("aa", True, 1), ray_node("bb", True, 2), ray_node("bb", False, 2)
    two = [{"CPU": 2.0, "GPU": 0.0}]
    assert not unhostable([head, worker], two)  # healthy: a trial merely queued behind others on the worker
    assert unhostable([head, dead], two)  # the only node that fits was lost
    assert not unhostable([head, dead], [{"CPU": 1.0}])  # the survivor hosts 1-CPU trials: Ray retries them there
    assert unhostable([head, ray_node("cc", True, 1)], two)  # 2 CPUs in all, but on no single node
    assert unhostable([], [{"CPU": 1.0}]) and not unhostable([head], [{"CPU": 0.5, "GPU": 0.0}])
    gpu = ray_node("gg", True, 8, gpus=1)
    assert not unhostable([head, gpu], [{"CPU": 1.0, "GPU": 0.25}]) and unhostable([head], [{"CPU": 1.0, "GPU": 0.25}])
    assert unhostable([head, worker], [{"CPU": 1.0, "accelerator_type:A100": 0.01}])  # a custom resource no node has
    # Bundles: each on one node (PACK), or all on one (STRICT_PACK).
    pack = SimpleNamespace(placement_group_factory=PlacementGroupFactory([{"CPU": 1}, {"CPU": 1}], strategy="PACK"))
    strict = SimpleNamespace(placement_group_factory=PlacementGroupFactory([{"CPU": 1}, {"CPU": 1}],
                                                                          strategy="STRICT_PACK"))
    assert trial_bundles(pack) == [{"CPU": 1}, {"CPU": 1}] and trial_bundles(strict) == [{"CPU": 2}]
    assert not unhostable([head, ray_node("cc", True, 1)], trial_bundles(pack))
    assert unhostable([head, ray_node("cc", True, 1)], trial_bundles(strict))
    # The lost nodes: those that died during the search if any, else every dead node the cluster remembers.
    old = ray_node("00", False, 4, ip="10.0.0.9")
    assert lost_nodes([head, dead, old], before={"00"}) == [dead]
    assert lost_nodes([head, old], before={"00"}) == [old] and lost_nodes([head, worker]) == []
    assert stuck_reason([head, dead, old], two, 31.2, before={"00"}) == (
        "lost Ray node bb (127.0.0.1): no live node can host a waiting trial ([CPU=2]; the largest live node has "
        "CPU=1) for 31 s")
    assert stuck_reason([head, ray_node("cc", True, 1)], two, 5) == (
        "no live node can host a waiting trial ([CPU=2]; the largest live node has CPU=1) for 5 s, and no Ray node "
        "was lost: the trial asks for more than any node of the cluster has")
    many = [head] + [ray_node(f"d{i}", False, 2) for i in range(5)]
    assert "lost Ray node d0 (127.0.0.1), d1 (127.0.0.1), d2 (127.0.0.1), and 2 more:" in stuck_reason(many, two, 30)


def test_lost_node_timeout_is_checked(capsys: pytest.CaptureFixture) -> None:
    from mlfd.cli import main

    rc = main(["tune", str(JOB), "--lost-node-timeout", "-1"])
    one_line_error(rc, capsys.readouterr().err, "--lost-node-timeout", ">= 0")


# --------------------------------------------------------------------------------------------------------------------
# deploy/: the files run real mlfd command lines
# --------------------------------------------------------------------------------------------------------------------


def mlfd_argv(command: str) -> list[list[str]]:
    """Every ``mlfd ...`` command line in a shell snippet (``&&``/``;``/newline separated)."""
    found = []
    for part in command.replace("&&", "\n").replace(";", "\n").splitlines():
        words = shlex.split(part.strip().rstrip("\\"))
        if words and words[0] == "mlfd":
            found.append(words[1:])
    return found


def check_mlfd_command(argv: list[str]) -> None:
    """The argv parses with mlfd's own parser, and the files it names exist in the repository."""
    from mlfd.cli import build_parser

    args = build_parser().parse_args(argv)
    for name in ("job", "pipeline"):
        path = getattr(args, name, None)
        if path:
            assert (ROOT / path).is_file(), f"{argv}: {path} is not a file of the repository"


def test_cluster_launcher_file_runs_mlfd() -> None:
    """deploy/ray-cluster.yaml: provider local, head and workers started, and the ``ray exec`` line it documents runs
    a real ``mlfd tune`` against the cluster with shared storage and the head's MLflow server."""
    text = (ROOT / "deploy" / "ray-cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert cfg["max_workers"] == len(cfg["provider"]["worker_ips"])
    assert "--head" in " ".join(cfg["head_start_ray_commands"])
    assert "--address" in " ".join(cfg["worker_start_ray_commands"])
    assert any("mlflow server" in c for c in cfg["head_setup_commands"])
    execs = [shlex.split(ln.lstrip("# ")) for ln in text.splitlines() if ln.lstrip("# ").startswith("ray exec ")]
    assert len(execs) == 1, execs
    argv = mlfd_argv(execs[0][3])
    assert len(argv) == 1 and argv[0][0] == "tune", execs
    check_mlfd_command(argv[0])
    assert "--address" in argv[0] and "--set=store=/shared/store" in ["=".join(argv[0][i:i + 2]) for i in
                                                                       range(len(argv[0]) - 1)]


def test_rayjob_manifest_runs_mlfd_tune() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "rayjob.yaml").read_text()))
    jobs = [d for d in docs if d and d.get("kind") == "RayJob"]
    assert len(jobs) == 1 and jobs[0]["apiVersion"].startswith("ray.io/")
    spec = jobs[0]["spec"]
    argv = mlfd_argv(spec["entrypoint"])
    assert len(argv) == 1 and argv[0][0] == "tune" and "--address" in argv[0], spec["entrypoint"]
    check_mlfd_command(argv[0])
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod mounts the shared volume at the same path
        mounts = {m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/shared" in mounts, pod
    assert any(d and d.get("kind") == "Deployment" and "mlflow" in json.dumps(d) for d in docs), "no mlflow server"
    sets = [argv[0][i + 1] for i, a in enumerate(argv[0]) if a == "--set"]
    assert "tracking_uri=http://mlflow:5000" in sets and "store=/shared/store" in sets, sets


def test_dockerfile_installs_mlfd() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0].startswith("FROM ") and "cuda" in lines[0].lower() and "pytorch" in lines[0].lower(), lines[0]
    assert any(ln.startswith("RUN ") and "pip install" in ln and " ." in ln for ln in lines), lines
    cmd = [ln for ln in lines if ln.startswith(("CMD", "ENTRYPOINT"))]
    assert cmd, "no CMD"
    argv = json.loads(cmd[-1].split(None, 1)[1])
    assert argv[0] == "mlfd"
    check_mlfd_command(argv[1:])
