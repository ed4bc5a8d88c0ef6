"""``mlfd tune``: one Ray Tune experiment per study, Optuna TPE through OptunaSearch, ASHA, resume, extend.

Joining a cluster and SIGTERM are :mod:`mlfd.tune.cluster`; a finished study's rows, best trial and export are
:mod:`mlfd.tune.trials`.

Layout of an output directory::

    OUT/search.json         the resolved job and pipeline (what --resume checks and export reads)
    OUT/ray/<name>-<study>  Ray Tune experiment state (storage_path), restorable with Tuner.restore
    OUT/ray/<name>-<study>-extend<k>   the k-th ``--extend`` of that study (another Ray experiment)
    OUT/optuna.db           the persistent Optuna study of each study, <name>-<study> (job optuna_storage; see study.py)
    OUT/store/              artifact store shared by every trial and study
    OUT/trials.parquet      one row per trial
    OUT/best/<study>.yaml   the best trial of each study as a standalone pipeline
    OUT/logs/ray.log        what Ray, Optuna and MLflow log (on screen only with ``verbose``; see progress.py)
    OUT/price.json          the estimated cost, measured at launch, and the measured times (see price.py)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pandas as pd

from mlfd.config import PipelineSpec, apply_overrides, from_dict, read_yaml, smoke_pipeline, to_dict
from mlfd.errors import NodeLost, SpecError
from mlfd.tune._private import result_grid_trials
from mlfd.search import SEARCH_FILE, JobSpec, SearchPlan, load_job, resolve
from mlfd.tune.cluster import (CONNECT_TIMEOUT_S, LOST_NODE_TIMEOUT_S, check_cluster_paths, check_cluster_resources,
                               connect, wait_for_head)
from mlfd.tune.packing import plan_gpu
from mlfd.tune.study import default_storage, search_storage
from mlfd.tune.trainable import run_stage, stage_epochs
from mlfd.tune.trials import best_row, export_best, trial_rows, trial_threads, write_trials

_logger = logging.getLogger(__name__)

DONE_SUFFIX = ".done"


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
                      tracking_uri=job.tracking_uri or f"sqlite:///{out / 'mlflow.db'}", smoke=smoke, gpu=gpu,
                      optuna_storage=job.optuna_storage or default_storage(out))


def check_resources(job: JobSpec) -> None:
    """Refuse GPU trials on a machine without GPUs before anything starts."""
    import torch

    if job.resources.gpu not in (0, 0.0) and not torch.cuda.is_available():
        raise SpecError(f"resources.gpu: {job.resources.gpu!r} asks for GPUs but this machine has none; "
                        "run with --set resources.gpu=0 to use CPUs")


def open_output(out: Path, plan: SearchPlan, resume: bool, claim: bool = True, extend: int | None = None) -> None:
    """Create or check the output directory: a new search needs a fresh one, --resume and --extend the same search.

    ``claim=False`` only checks (nothing is written), so a refused command leaves ``out`` as it was. ``--resume`` and
    ``--extend`` take the search's rounds (``extends``), seeding (``warm_start``) and Optuna storage from its
    ``search.json``; with ``claim``, ``--extend N`` adds a round of N trials per study to it.
    """
    f = out / SEARCH_FILE
    if resume or extend is not None:
        flag = "--resume" if resume else "--extend"
        if not f.is_file():
            raise SpecError(f"{flag}: {out} holds no search ({SEARCH_FILE} missing); run without {flag}")
        if SearchPlan.saved_fingerprint(out) != plan.fingerprint():
            raise SpecError(f"{flag}: {out} holds a different search (job {_saved_job_file(out)}); "
                            "use the same job, --smoke and --set as the first run, or another --out")
        saved = SearchPlan.load(out)
        plan.extends, plan.warm_start = list(saved.extends), saved.warm_start
        plan.optuna_storage = saved.optuna_storage or plan.optuna_storage
        if extend is not None:
            check_finished(out, plan)
            if claim:
                plan.extends.append(int(extend))
                plan.save(out)
        return
    if f.is_file():
        raise SpecError(f"--out: {out} already holds a search; pass --resume to continue it or choose another --out")
    if claim:
        plan.save(out)


def check_search_args(out: Path, resume: bool, extend: int | None, warm_start: str | None) -> None:
    """Refuse --resume/--extend/--warm-start combinations that cannot work (before the job is even prepared)."""
    if extend is not None:
        if extend < 1:
            raise SpecError(f"--extend: must be >= 1 trials per study, got {extend}")
        if resume:
            raise SpecError("--extend: not with --resume; --extend adds trials to a finished search, --resume "
                            "continues an interrupted one (an interrupted --extend too)")
        if warm_start:
            raise SpecError("--warm-start: not with --extend; --extend seeds the search in --out with its own earlier "
                            "trials, --warm-start seeds a new search")
    if warm_start and resume:
        raise SpecError("--warm-start: not with --resume; a resumed search keeps the seeding it started with")
    if warm_start:
        check_warm_start(Path(warm_start), out)


def check_finished(out: Path, plan: SearchPlan) -> None:
    """Refuse ``--extend`` unless every study of the search in ``out`` has all the trials of its rounds."""
    trials = out / "trials.parquet"
    want = sum(plan.rounds())
    if not trials.is_file():
        raise SpecError(f"--extend: the search in {out} has not finished (no trials.parquet); continue it with "
                        "--resume first")
    counts = pd.read_parquet(trials, columns=["study"])["study"].value_counts()
    have = {plan.study_key(s): int(counts.get(plan.study_key(s), 0)) for s in plan.studies}
    short = [f"{k} {n}/{want}" for k, n in have.items() if n < want]
    if short:
        raise SpecError(f"--extend: the search in {out} has not finished ({', '.join(short)} trials); continue it "
                        "with --resume first")


def check_warm_start(source: Path, out: Path) -> SearchPlan:
    """The plan of the search in ``source`` that ``--warm-start`` seeds a new search in ``out`` with (SpecError if
    there is none, it has no Optuna storage, or it is ``out`` itself)."""
    if Path(source).resolve() == Path(out).resolve():
        raise SpecError(f"--warm-start: {source} is the --out of this search; seed a new search from another one, or "
                        "use --extend to add trials to this one")
    return warm_start_source(source)


def warm_start_source(source: Path) -> SearchPlan:
    """The plan of the search in ``source``, its ``optuna_storage`` the URL to read its studies from."""
    source = Path(source).resolve()
    if not (source / SEARCH_FILE).is_file():
        raise SpecError(f"--warm-start: {source} holds no search ({SEARCH_FILE} missing)")
    src = SearchPlan.load(source)
    url = search_storage(source, src.optuna_storage)
    if url is None:
        raise SpecError(f"--warm-start: {source} has no Optuna studies ({source / 'optuna.db'} missing); it was made "
                        "before mlfd kept them")
    src.optuna_storage = url
    return src


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


def trial_context(plan: SearchPlan, study: str | None) -> dict:
    """What every trial of a study needs besides its sampled values (passed with tune.with_parameters)."""
    from mlfd.tune.trainable import LATENCY_KEY

    return {"pipeline": plan.pipeline, "stage": plan.job.stage, "study": study, "store": plan.store,
            "threads": trial_threads(plan.job), "gpu": plan.gpu, LATENCY_KEY: plan.job.latency_batch_size}


def searcher_options(plan: SearchPlan, study: str | None, index: int, round_: int, space) -> dict:
    """Keyword arguments of :func:`mlfd.tune.spaces.make_searcher` for round ``round_`` of study ``index``.

    The sampler is seeded with ``seed + index`` (``+ 1000 * round_`` for an ``--extend``: new random startup draws);
    it writes its trials to the study's persistent Optuna study. Round 0 tries the job's ``points_to_evaluate`` first
    and, with ``--warm-start DIR``, starts from DIR's trials of the same study that fit the space; an ``--extend``
    round starts from every earlier trial of the persistent study.
    """
    from mlfd.tune.study import StudyRecord, directions, seed_trials, study_name

    job, key = plan.job, plan.study_key(study)
    name = study_name(job.name, key)
    seeds: list = []
    if round_ > 0:
        seeds = seed_trials(plan.optuna_storage, name, space, source=f"{name} (earlier rounds)")
    elif plan.warm_start:
        src = warm_start_source(Path(plan.warm_start))
        src_name = study_name(src.job.name, key)
        seeds = seed_trials(src.optuna_storage, src_name, space, source=f"{plan.warm_start} {src_name}")
        _logger.info("mlfd tune: study %s starts from %d trial(s) of %s (%s)", key, len(seeds), plan.warm_start,
                     src_name)
    return {"seed": job.seed + index + 1000 * round_, "startup_trials": job.startup_trials,
            "points_to_evaluate": (job.points_to_evaluate or None) if round_ == 0 else None,
            "study_name": name, "seeds": seeds,
            "record": StudyRecord(plan.optuna_storage, name, directions(job.mode)) if plan.optuna_storage else None}


def _tuner(plan: SearchPlan, study: str | None, index: int, callbacks: list, resume: bool, verbose: bool = False,
           round_: int = 0):
    from ray import tune

    from mlfd.tune.atomic_fs import storage_filesystem, sweep_partial
    from mlfd.tune.progress import LiveView
    from mlfd.tune.spaces import load_space, make_searcher

    job, spec = plan.job, plan.spec
    name = plan.experiment_name(study, round_)
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
    searcher = make_searcher(space, job.metrics, job.modes, constraints=job.constraints or None,
                             **searcher_options(plan, study, index, round_, space))
    view = LiveView(study or job.stage, job.objective, job.objective_mode, stage_epochs(spec, job.stage),
                    offset=sum(plan.rounds()[:round_]))
    return tune.Tuner(
        trainable,
        # The scheduler (ASHA, HyperBand) stops trials on the first objective; the searcher sees them all.
        tune_config=tune.TuneConfig(metric=job.objective, mode=job.objective_mode, search_alg=searcher,
                                    scheduler=_scheduler(job, stage_epochs(spec, job.stage)),
                                    num_samples=plan.rounds()[round_], max_concurrent_trials=job.max_concurrent_trials,
                                    reuse_actors=job.reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=plan.storage_path, storage_filesystem=fs,
                                  callbacks=[*callbacks, view], checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=job.max_failures),
                                  verbose=1 if verbose else 0),  # 0: Ray prints no tables (see quiet_ray)
    )


def run_search(job_path: str, out: Path, smoke: bool = False, resume: bool = False, address: str | None = None,
               overrides: list[str] | None = None, tracking=None,
               connect_timeout: float = CONNECT_TIMEOUT_S, lost_node_timeout: float = LOST_NODE_TIMEOUT_S,
               verbose: bool = False, extend: int | None = None, warm_start: str | None = None,
               price: bool = True) -> pd.DataFrame:
    """Run (or resume) every study of a job; write trials.parquet and best/<study>.yaml. Returns the trial table.

    ``price``: measure the search's estimated cost before Ray starts (mlfd.tune.price; not with ``address``) and keep
    it in ``OUT/price.json``.

    ``extend``: run that many more trials per study of the finished search in ``out`` (a new round, its sampler
    seeded with every earlier trial). ``warm_start``: a search directory whose trials seed this new search's samplers
    (those that fit its space). See :func:`check_search_args` for the combinations refused.

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
                           lost_node_timeout, verbose, claimed, extend, warm_start, price)
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
                verbose: bool, claimed, extend: int | None = None, warm_start: str | None = None,
                price_it: bool = True) -> pd.DataFrame:
    """:func:`run_search` once the console is set up; ``claimed()`` is called once ``out`` holds the search."""
    import ray

    from mlfd.tune.mlflow_callback import study_callbacks
    from mlfd.tune.price import PRICE_FILE, launch_price, process_age, save_measured, write_price
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
    check_search_args(out, resume, extend, warm_start)
    plan = prepare(job_path, out, smoke, overrides)
    job, spec = plan.job, plan.spec
    # A misused --out/--resume/--extend is refused before tracking writes to OUT.
    open_output(out, plan, resume, claim=False, extend=extend)
    if warm_start:
        plan.warm_start = str(Path(warm_start).resolve())
    if plan.optuna_storage and plan.optuna_storage != default_storage(out):
        from mlfd.tune.study import storage

        storage(plan.optuna_storage)  # a database server that does not answer fails before any compute
    # Priced before Ray starts; not on a cluster (--address), whose machines the driver cannot time.
    price = None if address or not price_it else launch_price(plan, trial_threads(job), out, resume)
    measured: dict = {"studies": {}, "resumed": resume}
    rows: list[dict] = []
    try:
        t0 = time.monotonic()
        connect(address, connect_timeout, verbose)
        measured["ray_start_s"] = time.monotonic() - t0
        if address:
            check_cluster_resources(job, ray.cluster_resources(), address)
        if tracking is not None:
            # An unreachable tracking server fails here, before any compute and before OUT is claimed by search.json
            # (otherwise the same command, rerun once the server is up, is refused as "already holds a search").
            tracking.open(plan)
        open_output(out, plan, resume, extend=extend)
        claimed()
        if price is not None:
            write_price(price, out / PRICE_FILE)
        if job.multi_objective and job.scheduler.type != "none":
            _logger.info("mlfd tune: %s stops trials on the first objective (%s %s) only", job.scheduler.type,
                         job.objective_mode, job.objective)
        t0 = time.monotonic()
        if job.stage in ("students", "joint"):
            prebuild_teachers(plan)
        measured["teachers_s"] = time.monotonic() - t0
        samples = plan.rounds()
        for i, study in enumerate(plan.studies):
            t0 = time.monotonic()
            fit_s = 0.0
            study_rows: list[dict] = []
            for r, n in enumerate(samples):
                name = plan.experiment_name(study, r)
                cbs = study_callbacks(tracking, plan, study, trial_context(plan, study)) if tracking else []
                watch = LostNodeWatch(lost_node_timeout)
                # Earlier rounds of an --extend are restored (finished: Ray returns their results at once).
                tuner = _tuner(plan, study, i, [*cbs, watch], resume or r < len(samples) - 1, verbose, round_=r)
                _logger.info("mlfd tune: study %s (%d/%d)%s, %d trials -> %s", study or job.stage, i + 1,
                             len(plan.studies), f", extension {r}" if r else "", n,
                             os.path.join(plan.storage_path, name))
                t_fit = time.monotonic()
                results = tuner.fit()
                fit_s += time.monotonic() - t_fit
                watch.raise_if_stopped(f"on a healthy cluster continue it with the same command plus --resume --out "
                                       f"{out}")
                if _interrupted(results, n):
                    raise KeyboardInterrupt(f"search interrupted during study {study or job.stage}; finished trials "
                                            f"are kept in {plan.storage_path}; continue with --resume --out {out}")
                new = trial_rows(results, study, job, stage_epochs(spec, job.stage))
                for row in new:  # one trial counter per study across its rounds
                    row["trial_index"] = None if row["trial_index"] is None else row["trial_index"] + sum(samples[:r])
                study_rows.extend(new)
            rows.extend(study_rows)
            write_trials(out, rows)
            pause_point("results")
            best_yaml = None
            if best_row(pd.DataFrame(study_rows), job.objective, job.objective_mode) is not None:
                best_yaml = export_best(out, study or job.stage, out / "best" / f"{study or job.stage}.yaml")
            if tracking:
                tracking.finish_study(plan, study, best_yaml, round_=len(samples) - 1)
            measured["studies"][plan.study_key(study)] = {"wall_s": time.monotonic() - t0, "fit_s": fit_s}
        if tracking:
            tracking.close()
        measured["finished"] = True
    except BaseException as e:  # Ctrl-C/SIGTERM -> KILLED, any other error -> FAILED: no parent run is left RUNNING
        if tracking is not None:
            tracking.interrupted("KILLED" if isinstance(e, (KeyboardInterrupt, NodeLost)) else "FAILED")
        if isinstance(e, KeyboardInterrupt) and not str(e) and (out / SEARCH_FILE).is_file():
            raise KeyboardInterrupt(f"search interrupted; continue with --resume --out {out}") from None
        raise
    finally:
        t0 = time.monotonic()
        ray.shutdown()
        if measured.get("finished"):
            save_measured(out, {**measured, "ray_stop_s": time.monotonic() - t0, "total_s": process_age()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Teachers built before the trials; fault-injection points; interrupted studies
# --------------------------------------------------------------------------------------------------------------------


def _build_teacher(pipeline: dict, store: str, name: str, threads: int, gpu: float = 0.0) -> str:
    import torch

    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore
    from mlfd.tune.memory import apply_memory_cap

    torch.set_num_threads(threads)
    ctx = Context(spec=from_dict(PipelineSpec, pipeline, validate=False), store=ArtifactStore(store), progress=False)
    apply_memory_cap(gpu, ctx.device)  # the same share of the GPU as a trial, enforced the same way
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
    refs = [task.remote(plan.pipeline, plan.store, n, threads, plan.gpu) for n in names]
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


def _interrupted(results, num_samples: int) -> bool:
    """Ray Tune returns normally on Ctrl-C; unfinished trials (or too few) tell us the study did not complete."""
    trials = result_grid_trials(results)  # Ray keeps per-trial status only in a private attribute
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < num_samples or bool(_unfinished_in_saved_state(results))


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


