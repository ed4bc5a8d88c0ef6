"""The same smoke search on a simulated cluster: 1 node x 2 CPUs against 2 nodes x 1 CPU, through ``--address``.

Both clusters run on this machine (``ray.cluster_utils.Cluster`` in a child process, every node on 127.0.0.1 with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``); the second has two raylets, so trials are scheduled across nodes. Each run is
``mlfd tune tune_jobs/quickstart.yaml --smoke --address HEAD`` for one study with N trials, two at a time, no early
stop, the same seed (the same sampled configurations), on a copy of one warm store (teachers trained once
beforehand: the comparison is about the trial phase), with MLflow on a real ``mlflow server`` on 127.0.0.1.

Reported per layout:

* ``wall_s``: the ``mlfd tune`` process from start to exit;
* ``trials_s``: the trial phase, from the first trial's start to the last trial's last report (result.json);
* ``in_trial_s``: the sum over trials of the time Ray measured inside the trainable (``time_total_s``);
* ``overhead_per_trial_s``: CPU-slot seconds of the trial phase not spent inside a trainable, per trial:
  ``(trials_s * slots - in_trial_s) / N`` (actor start, scheduling, checkpoint and result handling, idle slots).

The headline is the wall-time ratio 2 nodes / 1 node (1.0 = a second node costs nothing). Both layouts have the
same 2 CPUs of the same machine, so the ratio isolates what a second node adds, not what a second machine gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, emit, parse_args, setup, table, tmpdir  # noqa: E402

JOB = ROOT / "tune_jobs" / "quickstart.yaml"
STUDY = "digits"
LAYOUTS = {"1 node x 2 CPUs": [2], "2 nodes x 1 CPU": [1, 1]}
CLUSTER_SCRIPT = """
import json, sys, time
import ray._private.utils
from ray.cluster_utils import Cluster
# Cluster() records its address in /tmp/ray/ray_current_cluster, where every plain ray.init() on this machine would
# find it and try to join (other users' local searches included), and it stays there when the cluster is killed by
# pid: this cluster is reached only through its address.
ray._private.utils.write_ray_address = lambda *args, **kwargs: None
cpus = json.loads(sys.argv[1])
c = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus[0], "include_dashboard": False})
for n in cpus[1:]:
    c.add_node(num_cpus=n)
c.wait_for_nodes()
print(json.dumps({"address": c.address}), flush=True)
while True:
    time.sleep(3600)
"""


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop_tree(proc: subprocess.Popen, known: list[int]) -> None:
    """End ``proc`` and every process it started (recorded pids plus those alive now), by pid."""
    pids = sorted(set(known + descendants(proc.pid) + [proc.pid]))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        time.sleep(3)
    proc.wait(30)


def start_cluster(cpus: list[int], log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(cpus)], env=child_env(),
                                stdout=subprocess.PIPE, stderr=f, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"cluster {cpus} did not start: {log.read_text()[-2000:]}")
    return proc, json.loads(line)["address"]


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "server.log", "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "art"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=child_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with opener.open(uri + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer: {(root / 'server.log').read_text()[-2000:]}")


def search_sets(n: int, epochs: int, max_train: int) -> list[str]:
    sets = [f"studies=[{STUDY}]", f"num_samples={n}", "max_concurrent_trials=2", "scheduler.type=none",
            "points_to_evaluate=[]", "seed=7", f"pipeline.student.recipe.epochs={epochs}"]
    return sets + [f"pipeline.datasets.{d}.max_train={max_train}" for d in ("mnist", "fashion", "digits")]


def trial_phase(exp: Path) -> tuple[float, float, int]:
    """(first trial start -> last report, sum of in-trainable seconds, trials) from the trials' result.json."""
    starts, ends, inside = [], [], 0.0
    for f in exp.glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not lines:
            continue
        starts.append(lines[0]["timestamp"] - lines[0]["time_this_iter_s"])
        ends.append(lines[-1]["timestamp"])
        inside += lines[-1]["time_total_s"]
    return max(ends) - min(starts), inside, len(starts)


def run_layout(name: str, cpus: list[int], tmp: Path, warm: Path, uri: str, sets: list[str]) -> dict:
    cluster, address = start_cluster(cpus, tmp / f"cluster-{len(cpus)}.log")
    known = descendants(cluster.pid)
    try:
        out = tmp / f"search-{len(cpus)}"
        store = tmp / f"store-{len(cpus)}"
        shutil.copytree(warm, store)
        cmd = [sys.executable, "-m", "mlfd.cli", "tune", str(JOB), "--smoke", "--out", str(out), "--address", address,
               *[f"--set={s}" for s in sets], f"--set=storage_path={out / 'ray'}", f"--set=store={store}",
               f"--set=tracking_uri={uri}"]
        t0 = time.perf_counter()
        with open(tmp / f"tune-{len(cpus)}.log", "w") as log:
            rc = subprocess.run(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=1800).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"{name}: mlfd tune exit {rc}: {(tmp / f'tune-{len(cpus)}.log').read_text()[-3000:]}")
        known += descendants(cluster.pid)
        phase, inside, n = trial_phase(out / "ray" / f"quickstart-{STUDY}")
        slots = sum(cpus)
        import pandas as pd

        nodes = pd.read_parquet(out / "trials.parquet")["node"].nunique()
        return {"layout": name, "nodes_used": nodes, "trials": n, "wall_s": wall, "trials_s": phase,
                "in_trial_s": inside, "overhead_per_trial_s": (phase * slots - inside) / n}
    finally:
        stop_tree(cluster, known)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    device = setup(args)
    n, epochs, max_train = (4, 2, 100) if args.quick else (8, 3, 300)
    sets = search_sets(n, epochs, max_train)
    with tmpdir("cluster") as tmp:
        tmp = Path(tmp)
        from bench.overhead import warm_store
        from mlfd.tune.launch import prepare

        warm = tmp / "warm-store"
        print("cluster: training the teachers once (warm store) ...", flush=True)
        warm_store(prepare(str(JOB), tmp / "plan", True, sets), warm)
        server, uri = start_mlflow(tmp / "mlflow")
        rows = []
        try:
            for name, cpus in LAYOUTS.items():
                print(f"cluster: {name}: {n} trials, 2 at a time ...", flush=True)
                rows.append(run_layout(name, cpus, tmp, warm, uri, sets))
        finally:
            stop_tree(server, [])
    print(table(rows))
    one, two = rows
    ratio = two["wall_s"] / one["wall_s"]
    phase_ratio = two["trials_s"] / one["trials_s"]
    print(f"cluster: wall 2 nodes / 1 node = {ratio:.2f} (trial phase {phase_ratio:.2f}); overhead per trial "
          f"{one['overhead_per_trial_s']:.1f} s (1 node) vs {two['overhead_per_trial_s']:.1f} s (2 nodes)")
    summary = (f"the same {n}-trial smoke search on 2 nodes x 1 CPU took {ratio:.2f}x the wall time of 1 node x 2 "
               f"CPUs (trial phase {phase_ratio:.2f}x); scheduling overhead {one['overhead_per_trial_s']:.1f} s vs "
               f"{two['overhead_per_trial_s']:.1f} s per trial")
    return emit("cluster", args, device, {"rows": rows, "ratio": ratio, "trial_phase_ratio": phase_ratio}, summary)


if __name__ == "__main__":
    main()
