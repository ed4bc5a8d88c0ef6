"""Joining a Ray cluster (``mlfd tune --address``), refusing a job the cluster cannot run, and stopping a search on
SIGTERM the way Ctrl-C does."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

from mlfd.errors import SpecError
from mlfd.search import JobSpec

_logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 60.0
"""How long ``mlfd tune --address`` waits for the Ray head to answer (``--connect-timeout``)."""
LOST_NODE_TIMEOUT_S = 30.0
"""How long trials may wait for resources that no live node has (a lost node) before the search stops, exit 2
(``--lost-node-timeout``; see mlfd.tune.watch)."""
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0, Ray keeps a 127.0.0.1 address as it is instead of replacing it with this machine's IP."""
TERM_GRACE_S = 60
"""Seconds ``mlfd tune`` needs after SIGTERM to stop its trials, save their state and end its Ray processes (13 s
measured in test_cluster.py on a loaded 2-core machine); a scheduler's grace period before SIGKILL should be at least
this."""

_stopped_by: list[int] = []


def stopped_by_sigterm() -> bool:
    """Whether the search was stopped by SIGTERM (the CLI then exits 143 instead of Ctrl-C's 130)."""
    return signal.SIGTERM in _stopped_by


def _on_sigterm(signum: int, frame) -> None:
    """SIGTERM does what Ctrl-C does at that moment: Ray Tune's handler stops the experiment and saves its state, or
    Python's raises KeyboardInterrupt."""
    _stopped_by.append(signum)
    # os.write, not print: the main thread may be inside a write to stderr (a reentrant call would raise).
    os.write(2, f"mlfd tune: SIGTERM received: stopping like Ctrl-C (within {TERM_GRACE_S} s)\n".encode())
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def handle_sigterm() -> None:
    """Make SIGTERM (Kubernetes, Slurm, ``kill``) stop the search like Ctrl-C. Called before Ray starts and again
    after ``ray.init``, which installs its own handler (a driver that exits at once, leaving MLflow runs RUNNING)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _gcs_target(address: str) -> tuple[str, int] | None:
    """(host, port) that ``ray.init(address)`` will connect to; None when Ray finds the address itself."""
    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):  # Ray Client: the proxy on the head (port 10001 by default)
        host, _, port = address[len("ray://"):].partition("/")[0].rpartition(":")
        return (host or address[len("ray://"):], int(port) if port.isdigit() else 10001)
    try:
        # Ray's own reading of the address: "auto" (RAY_ADDRESS, the latest local cluster), and 127.0.0.1 replaced
        # by this machine's IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
        canon = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise SpecError(f"--address {address}: {str(e).strip().splitlines()[0]}") from None
    if canon is None:
        return None
    host, _, port = canon.rpartition(":")
    if not port.isdigit():
        raise SpecError(f"--address {address}: expected host:port (e.g. 10.0.0.1:6379), ray://host:10001 or auto")
    return host, int(port)


def wait_for_head(address: str, timeout: float, poll: float = 0.5) -> None:
    """Wait until the Ray head at ``address`` accepts a connection; SpecError naming the likely cause after
    ``timeout`` seconds. A plain socket probe in Python: Ctrl-C and SIGTERM stop it at once (``ray.init`` retries a
    head it cannot reach in C++ for many minutes and ignores both meanwhile)."""
    target = _gcs_target(address)
    if target is None:
        return
    host, port = target
    _logger.info("mlfd tune: joining the Ray cluster at %s (up to %g s)", address, timeout)
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
        if time.monotonic() + poll > deadline:
            break
        time.sleep(poll)
    given = address.rpartition(":")[0]
    if given in ("127.0.0.1", "localhost", "::1") and host != given:
        cause = (f"Ray replaced {given} with this machine's IP {host}; a cluster started on 127.0.0.1 listens only "
                 f"on 127.0.0.1: set {LOOPBACK_ENV}=0 for the cluster and for mlfd tune")
    else:
        cause = ("is the head running (ray status --address ADDRESS), is the port open from this machine, is the "
                 "address the head's GCS port (6379 by default)? Or raise --connect-timeout")
    reason = f"{type(last).__name__}: {last}" if last else "no answer"
    raise SpecError(f"--address {address}: no Ray cluster answered at {host}:{port} within {timeout:g} s "
                    f"({reason}); {cause}")


def connect(address: str | None, timeout: float = CONNECT_TIMEOUT_S, verbose: bool = False) -> None:
    """Start a local Ray cluster (``address`` None) or join an existing one, within ``timeout`` seconds. The
    workers' output reaches this console only when ``verbose`` (it is in Ray's session logs in any case)."""
    import ray

    handle_sigterm()
    if ray.is_initialized():
        return
    if address:
        wait_for_head(address, timeout)  # again: the head may have gone since the first check
    # Without --address a search starts its own local cluster ("local"): a plain ray.init() would join whatever
    # cluster RAY_ADDRESS or /tmp/ray/ray_current_cluster names (another user's, or a dead one it then waits for).
    ray.init(address=address or "local", include_dashboard=False, configure_logging=False, log_to_driver=verbose)
    handle_sigterm()  # ray.init replaced it


def check_cluster_resources(job: JobSpec, resources: dict, address: str) -> None:
    """Refuse a job the cluster cannot run: GPU trials on a cluster without GPUs, a trial larger than the cluster."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if job.resources.gpu not in (0, 0.0) and gpus == 0:
        raise SpecError(f"resources.gpu: {job.resources.gpu!r} asks for GPUs but the cluster at {address} has none "
                        f"({cpus:g} CPUs); run with --set resources.gpu=0 or add GPU nodes")
    if job.resources.cpu > cpus:
        raise SpecError(f"resources.cpu: a trial asks for {job.resources.cpu:g} CPUs but the cluster at {address} "
                        f"has {cpus:g} in all")


def check_cluster_paths(job: JobSpec) -> None:
    """Joining an existing cluster needs storage every node sees and a tracking server every node reaches."""
    if job.storage_path is None:
        raise SpecError("storage_path: --address needs a shared storage_path in the job (NFS path or s3:// URI) so "
                        "every node writes trial state to the same place")
    if job.store is None:
        raise SpecError("store: --address needs a shared store directory in the job (the same path on every node, "
                        "e.g. an NFS mount) so that teachers and caches are built once for the whole cluster")
    if "://" not in job.store and not Path(job.store).is_dir():
        raise SpecError(f"store: {job.store} does not exist on this machine; with --address it must be a shared "
                        f"directory mounted at the same path on every node (create it on the shared volume)")
    uri = job.tracking_uri or ""
    if not uri.startswith(("http://", "https://", "databricks")):
        raise SpecError(f"tracking_uri: --address needs a remote MLflow tracking server (http://host:port), "
                        f"got {uri or 'none (the default is a SQLite file on this machine)'}")
