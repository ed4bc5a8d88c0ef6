"""``mlfd tune``: one Ray Tune experiment per study, Optuna TPE through OptunaSearch, ASHA, resume, export.

Layout of an output directory::

    OUT/search.json         the resolved job and pipeline (what --resume checks and export reads)
    OUT/ray/<name>-<study>  Ray Tune experiment state (storage_path), restorable with Tuner.restore
    OUT/store/              artifact store shared by every trial and study
    OUT/trials.parquet      one row per trial
    OUT/best/<study>.yaml   the best trial of each study as a standalone pipeline
    OUT/logs/ray.log        what Ray, Optuna and MLflow log (on screen only with ``verbose``; see progress.py)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mlfd.config import PipelineSpec, apply_overrides, dump_yaml, from_dict, read_yaml, smoke_pipeline, to_dict
from mlfd.errors import NodeLost, SpecError
from mlfd.store import atomic_write_bytes, atomic_write_text
from mlfd.tune._private import result_grid_trials
from mlfd.search import SEARCH_FILE, JobSpec, SearchPlan, load_job, resolve
from mlfd.tune.packing import plan_gpu
from mlfd.tune.trainable import run_stage, stage_epochs

_logger = logging.getLogger(__name__)

DONE_SUFFIX = ".done"
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


def study_names(job: JobSpec, spec: PipelineSpec) -> list[str | None]:
    names = [d.name for d in spec.datasets]
    if job.stage in ("students", "teachers") or (job.stage == "joint" and spec.joint.variant == "per_target"):
        studies = job.studies or (spec.only_students if job.stage == "students" and spec.only_students else names)
        for s in studies:
            if s not in names:
                raise SpecError(f"studies: unknown dataset {s!r}; allowed: {names}")
        return list(studies)
    return [None]


def prepare(job_path: str, out: Path, smoke: bool, overrides: list[str] | None) -> SearchPlan:
    """Everything a search needs, validated before any compute: job, pipeline, space, studies, paths."""
    from mlfd.tune.spaces import apply_config, check_levels, load_space

    job, base = load_job(job_path, smoke=smoke, overrides=overrides)
    check_resources(job)  # before the datasets are read: the answer does not depend on them
    from mlfd.data import load_dataset
    import mlfd.models  # noqa: F401  (registers the arch check that from_dict runs)
    pipe_path = resolve(base, job.pipeline)
    pipeline = apply_overrides(read_yaml(pipe_path), job.set)
    spec = from_dict(PipelineSpec, pipeline, path=str(pipe_path))
    if smoke:  # the same small-data variant as `mlfd run --smoke`, then the job's own smoke overrides
        pipeline = apply_overrides(to_dict(smoke_pipeline(spec)), job.smoke.get("set", []))
        spec = from_dict(PipelineSpec, pipeline, path=f"{pipe_path} (smoke)")
    space_path = resolve(base, job.space)
    space = load_space(space_path)
    # Every branch of the space must make a valid pipeline: catches fields the space names that this pipeline lacks,
    # and values it does not accept. Deterministic: the configs of cover() take every branch and every bound.
    configs = space.cover()
    for config in configs:
        from_dict(PipelineSpec, apply_config(pipeline, config), path=f"{space_path} applied to {pipe_path}")
    check_levels(space, configs, spec.fusion_levels, job.stage)
    studies = study_names(job, spec)
    for d in spec.datasets:
        load_dataset(d)
    # Memory-aware packing (packing.py): dry-run one trial, refuse a fraction that does not fit, resolve 'auto'.
    gpu = plan_gpu(job, pipeline, space, studies)
    out = out.resolve()
    return SearchPlan(job=job, pipeline=pipeline, studies=studies, job_file=str(Path(job_path).resolve()),
                      pipeline_file=str(pipe_path), space_file=str(space_path),
                      storage_path=job.storage_path or str(out / "ray"), store=job.store or str(out / "store"),
                      tracking_uri=job.tracking_uri or f"sqlite:///{out / 'mlflow.db'}", smoke=smoke, gpu=gpu)


def check_resources(job: JobSpec) -> None:
    """Refuse GPU trials on a machine without GPUs before anything starts."""
    import torch

    if job.resources.gpu not in (0, 0.0) and not torch.cuda.is_available():
        raise SpecError(f"resources.gpu: {job.resources.gpu!r} asks for GPUs but this machine has none; "
                        "run with --set resources.gpu=0 to use CPUs")


def open_output(out: Path, plan: SearchPlan, resume: bool, claim: bool = True) -> None:
    """Create or check the output directory: a new search needs a fresh one, --resume needs the same search.

    ``claim=False`` only checks (nothing is written), so a refused command leaves ``out`` as it was.
    """
    f = out / SEARCH_FILE
    if resume:
        if not f.is_file():
            raise SpecError(f"--resume: {out} holds no search ({SEARCH_FILE} missing); run without --resume")
        if SearchPlan.saved_fingerprint(out) != plan.fingerprint():
            raise SpecError(f"--resume: {out} holds a different search (job {_saved_job_file(out)}); "
                            "use the same job, --smoke and --set as the first run, or another --out")
        return
    if f.is_file():
        raise SpecError(f"--out: {out} already holds a search; pass --resume to continue it or choose another --out")
    if claim:
        plan.save(out)


def _saved_job_file(out: Path) -> str:
    try:
        return str(json.loads((out / SEARCH_FILE).read_text()).get("job_file"))
    except (OSError, ValueError):
        return "unreadable"


def _scheduler(job: JobSpec, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    s = job.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(s.grace_period, max_t),
                             reduction_factor=s.reduction_factor)
    if s.type == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_t, reduction_factor=s.reduction_factor)
    return FIFOScheduler()


def trial_threads(job: JobSpec) -> int:
    """torch threads of a trial (and of the teacher tasks): its CPUs."""
    return max(1, int(job.resources.cpu))


def trial_context(plan: SearchPlan, study: str | None) -> dict:
    """What every trial of a study needs besides its sampled values (passed with tune.with_parameters)."""
    return {"pipeline": plan.pipeline, "stage": plan.job.stage, "study": study, "store": plan.store,
            "threads": trial_threads(plan.job)}


def _tuner(plan: SearchPlan, study: str | None, index: int, callbacks: list, resume: bool, verbose: bool = False):
    from ray import tune

    from mlfd.tune.atomic_fs import storage_filesystem, sweep_partial
    from mlfd.tune.progress import LiveView
    from mlfd.tune.spaces import load_space, make_searcher

    job, spec = plan.job, plan.spec
    name = plan.experiment_name(study)
    exp_path = os.path.join(plan.storage_path, name)
    context = trial_context(plan, study)
    trainable = tune.with_resources(tune.with_parameters(run_stage, context=context),
                                    {"cpu": job.resources.cpu, "gpu": plan.gpu})
    fs = storage_filesystem(plan.storage_path)
    if resume and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        from mlfd.tune.watch import rewatch

        sweep_partial(exp_path)
        # A restored study brings back the callbacks it was started with (MLflow, live view), pickled with it.
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, storage_filesystem=fs)
        rewatch(tuner, callbacks)  # this command's watch, not the one pickled with the experiment
        return tuner
    space = load_space(plan.space_file)
    searcher = make_searcher(space, job.metric, job.mode, seed=job.seed + index,
                             points_to_evaluate=job.points_to_evaluate or None)
    view = LiveView(study or job.stage, job.metric, job.mode, stage_epochs(spec, job.stage))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=job.metric, mode=job.mode, search_alg=searcher,
                                    scheduler=_scheduler(job, stage_epochs(spec, job.stage)),
                                    num_samples=job.num_samples, max_concurrent_trials=job.max_concurrent_trials,
                                    reuse_actors=job.reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=plan.storage_path, storage_filesystem=fs,
                                  callbacks=[*callbacks, view], checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=job.max_failures),
                                  verbose=1 if verbose else 0),  # 0: Ray prints no tables (see quiet_ray)
    )


def trial_rows(results, study: str | None, job: JobSpec, max_epochs: int) -> list[dict]:
    """One row per trial of a finished study."""
    rows = []
    for r in results:
        cfg = dict(r.config or {})
        hist = r.metrics_dataframe
        metric = job.metric
        epochs = int(r.metrics.get("training_iteration", 0)) if r.metrics else 0
        best = float(hist[metric].max()) if hist is not None and metric in hist else float("nan")
        final = float(r.metrics[metric]) if r.metrics and metric in r.metrics else float("nan")
        if r.error is not None:
            status, error = "ERROR", f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300]}"
        else:
            status, error = ("TERMINATED" if epochs >= max_epochs else "STOPPED"), ""
        rows.append({"study": study or job.stage, "trial_id": str((r.metrics or {}).get("trial_id") or
                                                                  Path(r.path).name), "status": status,
                     "epochs": epochs, f"final/{metric}": final, f"best/{metric}": best, "error": error,
                     "path": r.path, "trial_index": trial_index(r), **trial_nodes(r),
                     **{f"config/{k}": v for k, v in sorted(cfg.items())}})
    return rows


def trial_nodes(result) -> dict:
    """Where a trial ran: ``node`` (Ray node id of its last report), ``node_ip``, ``hostname``, and ``nodes``, every
    node it reported from in order (two for a trial retried elsewhere after its node was lost)."""
    from mlfd.tune.trainable import NODE_KEY

    m, hist = result.metrics or {}, result.metrics_dataframe
    seen = list(dict.fromkeys(hist[NODE_KEY].dropna())) if hist is not None and NODE_KEY in hist else []
    last = m.get(NODE_KEY) or (seen[-1] if seen else "")
    return {"node": str(last), "node_ip": str(m.get("node_ip") or ""), "hostname": str(m.get("hostname") or ""),
            "nodes": ",".join(map(str, seen or ([last] if last else [])))}


def trial_index(result) -> int | None:
    """Ray's creation order of a trial in its study (1, 2, ...; kept across --resume): the counter that starts the
    trial's experiment tag (``3_fusion_level=2,...``), which Ray also puts in the trial directory's name
    (``run_stage_<8 hex id>_3_fusion_level=2,..._<date>``), read from there when the trial never reported."""
    tag = str((result.metrics or {}).get("experiment_tag") or "")
    m = re.match(r"(\d+)_", tag) or re.match(r".*?_[0-9a-f]{8}_(\d+)_", Path(result.path).name)
    return int(m.group(1)) if m else None


def run_search(job_path: str, out: Path, smoke: bool = False, resume: bool = False, address: str | None = None,
               overrides: list[str] | None = None, tracking=None,
               connect_timeout: float = CONNECT_TIMEOUT_S, lost_node_timeout: float = LOST_NODE_TIMEOUT_S,
               verbose: bool = False) -> pd.DataFrame:
    """Run (or resume) every study of a job; write trials.parquet and best/<study>.yaml. Returns the trial table.

    With ``address`` the search joins an existing Ray cluster: the head must answer within ``connect_timeout``
    seconds (:func:`connect`), and the cluster must have what the job asks for, before anything is written to ``out``.
    Trials that no live node can host for ``lost_node_timeout`` seconds stop the search (``NodeLost``, state saved).

    What Ray, Optuna and MLflow log goes to ``OUT/logs/ray.log``; with ``verbose`` also to the screen, with Ray Tune's
    own progress tables and the trial workers' output. The live view (progress.py) logs to ``mlfd.tune.progress``.
    """
    from mlfd.tune.progress import RAY_LOG, ThirdPartyLogs

    out = Path(out).resolve()
    quiet_ray(verbose)
    logs = ThirdPartyLogs(verbose)

    def claimed() -> None:
        logs.open(out / RAY_LOG)
        _logger.info("mlfd tune: Ray's own output goes to %s (%s)", out / RAY_LOG,
                     "and here" if verbose else "--verbose shows it here")

    try:
        return _run_search(job_path, out, smoke, resume, address, overrides, tracking, connect_timeout,
                           lost_node_timeout, verbose, claimed)
    finally:
        logs.restore()


def quiet_ray(verbose: bool) -> None:
    """Ray Tune's settings for a quiet console (or, ``verbose``, Ray's own), set before Ray Tune reads them."""
    # Ray Tune's new output engine prints its header table whatever RunConfig(verbose) says; the classic one prints
    # nothing at verbose 0.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose else "0"
    # Snapshot experiment state often, so a killed driver loses at most the trials still running.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Frequent snapshots are the point (and CheckpointConfig(num_to_keep=1) forces one after every trial checkpoint):
    # Ray's warning that they may become a bottleneck is off, as its message says to do.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not verbose:  # MLflow's notices when it creates its database come before OUT/logs exists: warnings only
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _run_search(job_path: str, out: Path, smoke: bool, resume: bool, address: str | None,
                overrides: list[str] | None, tracking, connect_timeout: float, lost_node_timeout: float,
                verbose: bool, claimed) -> pd.DataFrame:
    """:func:`run_search` once the console is set up; ``claimed()`` is called once ``out`` holds the search."""
    import ray

    from mlfd.tune.mlflow_callback import study_callbacks
    from mlfd.tune.watch import LostNodeWatch

    if address:  # before the datasets are read: the answers depend on the job file alone
        first = load_job(job_path, smoke, overrides)[0]
        check_resources(first)
        check_cluster_paths(first)
        wait_for_head(address, connect_timeout)  # an unreachable cluster fails before the datasets are read
    if tracking is not None:  # a remote server that does not answer fails before the datasets are even read
        from mlfd.tracking import Tracker

        uri = load_job(job_path, smoke, overrides)[0].tracking_uri
        if uri:
            Tracker.check_reachable(uri)
    plan = prepare(job_path, out, smoke, overrides)
    job, spec = plan.job, plan.spec
    open_output(out, plan, resume, claim=False)  # a misused --out/--resume is refused before tracking writes to OUT
    rows: list[dict] = []
    try:
        connect(address, connect_timeout, verbose)
        if address:
            check_cluster_resources(job, ray.cluster_resources(), address)
        if tracking is not None:
            # An unreachable tracking server fails here, before any compute and before OUT is claimed by search.json
            # (otherwise the same command, rerun once the server is up, is refused as "already holds a search").
            tracking.open(plan)
        open_output(out, plan, resume)
        claimed()
        if job.stage in ("students", "joint"):
            prebuild_teachers(plan)
        for i, study in enumerate(plan.studies):
            name = plan.experiment_name(study)
            cbs = study_callbacks(tracking, plan, study, trial_context(plan, study)) if tracking else []
            watch = LostNodeWatch(lost_node_timeout)
            tuner = _tuner(plan, study, i, [*cbs, watch], resume, verbose)
            _logger.info("mlfd tune: study %s (%d/%d), %d trials -> %s", study or job.stage, i + 1,
                         len(plan.studies), job.num_samples, os.path.join(plan.storage_path, name))
            results = tuner.fit()
            watch.raise_if_stopped(f"on a healthy cluster continue it with the same command plus --resume --out {out}")
            if _interrupted(results, job):
                raise KeyboardInterrupt(f"search interrupted during study {study or job.stage}; finished trials are "
                                        f"kept in {plan.storage_path}; continue with --resume --out {out}")
            study_rows = trial_rows(results, study, job, stage_epochs(spec, job.stage))
            rows.extend(study_rows)
            write_trials(out, rows)
            pause_point("results")
            best_yaml = None
            if best_row(pd.DataFrame(study_rows), job.metric, job.mode) is not None:
                best_yaml = export_best(out, study or job.stage, out / "best" / f"{study or job.stage}.yaml")
            if tracking:
                tracking.finish_study(plan, study, best_yaml)
        if tracking:
            tracking.close()
    except BaseException as e:  # Ctrl-C/SIGTERM -> KILLED, any other error -> FAILED: no parent run is left RUNNING
        if tracking is not None:
            tracking.interrupted("KILLED" if isinstance(e, (KeyboardInterrupt, NodeLost)) else "FAILED")
        if isinstance(e, KeyboardInterrupt) and not str(e) and (out / SEARCH_FILE).is_file():
            raise KeyboardInterrupt(f"search interrupted; continue with --resume --out {out}") from None
        raise
    finally:
        ray.shutdown()
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Joining a cluster; stopping on SIGTERM
# --------------------------------------------------------------------------------------------------------------------

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


def _build_teacher(pipeline: dict, store: str, name: str, threads: int) -> str:
    import torch

    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore

    torch.set_num_threads(threads)
    ctx = Context(spec=from_dict(PipelineSpec, pipeline, validate=False), store=ArtifactStore(store), progress=False)
    return str(StageTrial(ctx, "teachers", name).build().path)


def prebuild_teachers(plan: SearchPlan) -> None:
    """Train the shared upstream (one teacher per dataset) as parallel Ray tasks before any trial needs it.

    Without this, the first trials of a study would each wait on the teacher locks and train them one by one.
    """
    import ray

    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore

    # Teachers already in the store (--resume, a shared store) need no task: a worker only to find them costs seconds.
    job = plan.job
    ctx = Context(spec=plan.spec, store=ArtifactStore(plan.store), progress=False)
    names = [d.name for d in ctx.spec.datasets if StageTrial(ctx, "teachers", d.name).artifact() is None]
    if not names:
        return
    task = ray.remote(_build_teacher).options(num_cpus=job.resources.cpu, num_gpus=plan.gpu)
    threads = trial_threads(job)
    _logger.info("mlfd tune: teachers for %s (built once, in parallel, reused by every trial)", ", ".join(names))
    start = time.monotonic()
    refs = [task.remote(plan.pipeline, plan.store, n, threads) for n in names]
    pause_point("teachers")
    ray.get(refs)
    _logger.info("mlfd tune: teachers ready in %.0f s", time.monotonic() - start)


PAUSE_ENV = "MLFD_PAUSE_AT"


def pause_point(name: str) -> None:
    """Fault-injection point of the reliability tests: with ``MLFD_PAUSE_AT=<name>`` the driver says so on stderr
    and waits there to be killed (``teachers``: teacher tasks running; ``results``: a study's trials.parquet written,
    its best YAML and MLflow summary not yet). Without the variable it does nothing."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    _logger.info("mlfd tune: paused at %s (%s)", name, PAUSE_ENV)
    while True:
        time.sleep(1.0)


def _interrupted(results, job: JobSpec) -> bool:
    """Ray Tune returns normally on Ctrl-C; unfinished trials (or too few) tell us the study did not complete."""
    trials = result_grid_trials(results)  # Ray keeps per-trial status only in a private attribute
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < job.num_samples or bool(_unfinished_in_saved_state(results))


def _unfinished_in_saved_state(results) -> list[str]:
    """Trials the last saved experiment state holds as not finished.

    On Ctrl-C, Tune saves the experiment state and then stops the trials in flight, marking them TERMINATED in
    memory; only the saved state (what ``Tuner.restore`` resumes) still says they had not finished.
    """
    try:
        # Named by session start (one per run or resume): the newest name is the last state (mtimes are not:
        # Tune rewrites every file of the folder when it syncs at the end).
        files = sorted(Path(results.experiment_path).glob("experiment_state-*.json"), key=lambda f: f.name)
        if not files:
            return []
        data = json.loads(files[-1].read_text())
        out = []
        for item in data.get("trial_data", []):
            t = json.loads(item[0]) if isinstance(item[0], str) else item[0]
            if t.get("status") not in ("TERMINATED", "ERROR"):
                out.append(str(t.get("trial_id")))
        return out
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):  # remote storage, other format
        return []


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


def write_trials(out: Path, rows: list[dict]) -> None:
    import io

    df = pd.DataFrame(rows)
    # The same columns in the same order whatever order Ray returns the trials in (conditional params appear only in
    # some rows): the trial's own columns, then its sampled params sorted by name.
    df = df[[c for c in df.columns if not c.startswith("config/")] + sorted(c for c in df.columns
                                                                            if c.startswith("config/"))]
    for c in df.columns:  # parquet wants one type per column; sampled categoricals may mix int/str
        if df[c].dtype == object and c.startswith("config/"):
            df[c] = df[c].map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out / "trials.parquet", buf.getvalue())


def best_row(df: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best trial of a study: among trials that ran every epoch (reproducible by a rerun) if any, else all."""
    col = f"best/{metric}"
    ok = df[df["status"] != "ERROR"].dropna(subset=[col]) if len(df) else df
    if not len(ok):
        return None
    full = ok[ok["status"] == "TERMINATED"]
    pool = full if len(full) else ok
    return pool.loc[pool[col].idxmax() if mode == "max" else pool[col].idxmin()]


def config_cell(v: Any) -> Any:
    """A trials.parquet config cell as the sampled value (mixed-type categoricals are stored as JSON text)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v.item() if hasattr(v, "item") else v


def trial_config(row: pd.Series) -> dict:
    """The sampled values of one trials.parquet row (params a trial did not sample are left out)."""
    return {k[len("config/"):]: config_cell(v) for k, v in row.items()
            if k.startswith("config/") and config_cell(v) is not None}


def export_best(out: Path, study: str | None, dest: Path) -> Path:
    """Write the best trial of ``study`` in search ``out`` as a standalone pipeline YAML and return its path."""
    from mlfd.tune.spaces import apply_config

    out = Path(out)
    if not (out / SEARCH_FILE).is_file() or not (out / "trials.parquet").is_file():
        raise SpecError(f"{out}: no finished search here ({SEARCH_FILE} and trials.parquet are needed)")
    plan = SearchPlan.load(out)
    job = plan.job
    df = pd.read_parquet(out / "trials.parquet")
    studies = list(dict.fromkeys(df["study"]))
    study = study or studies[0]
    if study not in studies:
        raise SpecError(f"--study: unknown study {study!r}; allowed: {studies}")
    best = best_row(df[df["study"] == study], job.metric, job.mode)
    if best is None:
        raise SpecError(f"{out}: study {study!r} has no successful trial to export")
    config = trial_config(best)
    pipeline = copy.deepcopy(apply_config(plan.pipeline, config))
    if job.stage == "students":
        pipeline["only_students"] = [study]
    pipeline["controls"] = {"own_teacher": False, "no_kd": False}
    pipeline["baselines"] = dict(pipeline.get("baselines") or {}, multi_head=job.stage == "multi_head",
                                 joint_head=job.stage == "joint_head")
    spec = from_dict(PipelineSpec, pipeline, path="export")
    header = (f"# Best trial {best['trial_id']} of study {study!r} ({job.stage}) from {out}\n"
              f"# {job.metric} = {best[f'best/{job.metric}']:.4f} (best epoch, val); sampled: {json.dumps(config)}\n"
              # CPU kernels split reductions by thread count; a trial ran with resources.cpu torch threads.
              f"# the same numbers on CPU: OMP_NUM_THREADS={trial_threads(job)} mlfd run {Path(dest).name}\n")
    atomic_write_text(Path(dest), header + dump_yaml(spec))
    return Path(dest)
