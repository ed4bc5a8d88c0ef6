"""``mlfd tune JOB --plan``: what a search will cost, measured on this machine before any trial runs.

Nothing is trained at full size and Ray is not started. The estimate adds up, for the command as a whole:

* **driver start**: importing the stack and :func:`mlfd.tune.launch.prepare` (datasets read, space checked), timed as
  ``--plan`` runs them; at launch also the time this estimate took;
* **Ray start and stop**: :data:`RAY_START_S` (a local cluster; not measured by ``--plan``, which does not start
  Ray; the value comes from ``mlfd tune`` runs on the 2-core reference machine, see the constant; so do
  :data:`RAY_REPORT_S` and :data:`STUDY_OVERHEAD_S`: the three parts of the estimate that are not timed here);
* **teacher prebuild** (``students`` and ``joint`` searches): each teacher that the store lacks, trained as a Ray
  task, as many at once as the CPUs/GPUs allow (list scheduling of the measured teacher times);
* per study, the **trials**, list-scheduled in creation order on ``concurrency`` slots (:func:`concurrency`,
  :func:`makespan`). One trial costs

  - its **worker start** (a fresh Python process importing Ray, torch and mlfd and reading the datasets, timed in a
    child process) when it gets a new worker: the first ``concurrency`` trials of a study (later ones reuse a
    finished trial's worker with ``reuse_actors``, else every trial);
  - its **upstream**: for ``students`` the feature caches of its fusion level (once per level and search; the
    expected number of levels the search touches comes from the space, :func:`expected_levels`), the joint teacher
    T* it distils from (per trial when the space changes T*'s key, e.g. ``joint.dropout``; per level otherwise) and
    T*'s targets on its dataset; for ``joint`` the caches; nothing for ``teachers`` and the baselines;
  - its **set-up**: building its task (models, data on the device, targets read), timed;
  - its **expected epochs** under the scheduler (:func:`expected_trial_epochs`) times the measured **seconds per
    epoch**: training images / (training images/s) + val images / (eval images/s) + one checkpoint save (timed) +
    Ray's handling of the reported epoch (:data:`RAY_REPORT_S`);
  - its final **test** pass (the stage evaluates the test split once);
* a fixed :data:`STUDY_OVERHEAD_S` per study (Tuner set-up, the study's MLflow runs, trials.parquet, best YAML).

Speeds come from the measuring core of ``mlfd plan`` (:mod:`mlfd.stages.measure`): the trial's real task
(:class:`mlfd.stages.trial.StageTrial`) on a probe of a few batches of each dataset, a few timed optimizer steps after
a warm-up step and a timed val pass, with the trial's thread count (``resources.cpu``) on the trial's device. Upstream
builds (caches, targets) are timed whole on the probe and scaled by image count (their fixed part, loading the
teacher and opening files, is spread over the probe's images, so this errs high on small data). All trials are
costed at one representative config: the job's first ``points_to_evaluate`` entry, else the space's first covering
config. Left out: the spread of speeds across the space (a deeper level or a wider model is slower), early stops
other than the scheduler's, other work on the machine, and time a trial waits on a lock another trial holds.

Device-hours are trial-busy seconds times each trial's share of a device: its GPU fraction (GPU-hours) or, on CPU
trials, its CPUs (CPU-hours).

After a search, ``mlfd tune`` keeps the estimate and the measured times in ``OUT/price.json`` (:data:`PRICE_FILE`);
``mlfd report`` puts them side by side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mlfd.config import PipelineSpec, from_dict
from mlfd.search import SearchPlan

_logger = logging.getLogger(__name__)

PRICE_FILE = "price.json"
"""The estimate (and, after the search, the measured times) in a search's output directory."""

RAY_START_S = 11.0
"""Seconds to start a local Ray cluster (``ray.init``) and stop it at the end. Measured by ``mlfd tune`` itself
(``measured.ray_start_s`` + ``measured.ray_stop_s`` in OUT/price.json): 9-11 s on the shared 2-core, 24 GiB
reference machine; ``--plan`` does not start Ray to measure it."""

STUDY_OVERHEAD_S = 5.0
"""Seconds per study besides its trials: Tuner set-up and experiment state, the study's MLflow parent run, writing
trials.parquet and the best YAML. Measured by ``mlfd tune`` as ``wall_s - fit_s`` of each study in OUT/price.json:
3-8 s on the reference machine."""

RAY_REPORT_S = 1.0
"""Seconds Ray Tune adds to each reported epoch besides the checkpoint save that the probe times: the result's trip to
the driver, the checkpoint's move to storage, the MLflow callback and experiment-state snapshots. The median excess
of ``time_this_iter_s`` over the probe's seconds per epoch in epochs 2-3 of the smoke quickstart's trials was 0.5 s
on the reference machine at load 2 and 1.2 s at load 9 (``mlfd tune --plan`` and the run's ``result.json``)."""

PROBE_STEPS = 3
"""Timed optimizer steps per task (after one warm-up step)."""


# --------------------------------------------------------------------------------------------------------------------
# Scheduler arithmetic
# --------------------------------------------------------------------------------------------------------------------


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Milestones (epochs) below ``max_t`` at which Ray's ASHA may stop a trial: ``grace * rf**k`` for
    ``k < int(log(max_t / grace) / log(rf) + 1)``, as ``ray.tune.schedulers.ASHAScheduler`` builds its one bracket.
    A rung at ``max_t`` itself stops nothing early, so it is left out."""
    import numpy as np  # the same float arithmetic as Ray's

    grace = min(grace_period, max_t)
    n = int(np.log(max_t / grace) / np.log(reduction_factor) + 1)
    return [int(grace * reduction_factor ** k) for k in range(n) if grace * reduction_factor ** k < max_t]


def asha_continue_probability(recorded: int, reduction_factor: float) -> float:
    """Probability that a trial continues past an ASHA rung where ``recorded`` trials reported before it.

    Ray stops it when its metric is below the ``q = 1 - 1/rf`` quantile (linear interpolation) of the values recorded
    there; the first trial always continues. With i.i.d. metrics (no ties) the new value's rank among the
    ``m + 1`` values is uniform, so ``P = (m - q (m - 1)) / (m + 1)`` (exact when ``q (m - 1)`` is whole; linear in
    rank between). For large m it tends to ``1/rf``.
    """
    m = recorded
    if m == 0:
        return 1.0
    q = 1.0 - 1.0 / reduction_factor
    return (m - q * (m - 1)) / (m + 1)


def asha_trial_epochs(num_samples: int, grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """Expected epochs of each trial (in creation order) under Ray's asynchronous successive halving.

    Trials reach every rung in creation order. Trial j reaches the first rung ``r_1`` (the grace period); at rung i it
    continues with :func:`asha_continue_probability` of the number m of trials recorded there before it, whose
    distribution is carried from trial to trial (each earlier trial adds one with the probability it reached the
    rung). So with ``rho_{j,i}`` the probability that trial j reaches rung i (``rho_{j,1} = 1``)::

        E[epochs_j] = sum_i rho_{j,i} (r_i - r_{i-1}) + rho_{j,K+1} (max_t - r_K)
        rho_{j,i+1} = rho_{j,i} * sum_m P(m recorded at rung i before j) * p(m)

    The total is the expected number of trial-epochs. Example (hand-computed in the tests): 3 trials, grace 1, rf 2,
    max_t 3 (rungs 1, 2) -> 3, 1.75, 1.75 epochs, 6.5 in all (FIFO: 9).
    """
    rungs = asha_rungs(grace_period, reduction_factor, max_t)
    counts = [[1.0] for _ in rungs]  # per rung: P(m trials recorded there so far), m = 0, 1, ...
    out = []
    for _ in range(num_samples):
        reach, prev, epochs = 1.0, 0, 0.0
        for i, r in enumerate(rungs):
            epochs += reach * (r - prev)
            prev = r
            dist = counts[i]
            p = sum(pm * asha_continue_probability(m, reduction_factor) for m, pm in enumerate(dist))
            counts[i] = [(1 - reach) * a + reach * b for a, b in zip(dist + [0.0], [0.0] + dist)]
            reach *= p
        out.append(epochs + reach * (max_t - prev))
    return out


def hyperband_trial_epochs(num_samples: int, reduction_factor: float, max_t: int) -> list[float]:
    """Expected epochs of each trial (in creation order) under Ray's (synchronous) ``HyperBandScheduler``.

    Ray fills brackets s = 0, 1, ..., s_max (then a new band) in trial order, bracket s holding up to
    ``n0 = ceil(S / (s + 1) * eta**s)`` trials (``S = round(log(max_t) / log(eta)) + 1``) that all run
    ``r0 = int(max_t * eta**-s)`` epochs; each of its s halvings keeps ``n = ceil(n / eta)`` trials (of those
    present) and raises their epochs to ``int(min(r * eta, max_t))``. A bracket with m trials therefore costs
    ``m r0 + sum_h min(m_h, n_h) (r_h - r_{h-1})`` trial-epochs, shared equally (in expectation) by its m trials.
    Example (hand-computed in the tests): 9 trials, eta 2, max_t 4 -> brackets of 3, 3, 3 trials costing 12, 10, 7:
    29 trial-epochs (FIFO: 36).
    """
    import numpy as np

    eta = reduction_factor
    s_max_1 = int(np.round(np.log(max_t) / np.log(eta))) + 1
    out: list[float] = []
    s = 0
    while len(out) < num_samples:
        bracket, s = s, (s + 1) % s_max_1  # a band holds brackets 0 .. s_max_1 - 1, then a new band starts
        n0, r0 = int(np.ceil(s_max_1 / (bracket + 1) * eta ** bracket)), int(max_t * eta ** (-bracket))
        if r0 == 0:  # Ray skips a bracket too small to run an epoch
            continue
        m = min(n0, num_samples - len(out))
        total, live, n, r = m * r0, m, n0, r0
        for _ in range(bracket):
            n = int(np.ceil(n / eta))
            live = min(live, n)
            r_next = int(min(r * eta, max_t))
            total += live * (r_next - r)
            r = r_next
        out += [total / m] * m
    return out


def expected_trial_epochs(scheduler: Any, num_samples: int, max_t: int) -> list[float]:
    """Expected epochs of each trial of a study under the job's scheduler (``SchedulerSpec``): ASHA
    (:func:`asha_trial_epochs`), HyperBand (:func:`hyperband_trial_epochs`) or none (FIFO: every trial runs
    ``max_t``; ``num_samples * max_t`` in all)."""
    if scheduler.type == "asha":
        return asha_trial_epochs(num_samples, scheduler.grace_period, scheduler.reduction_factor, max_t)
    if scheduler.type == "hyperband":
        return hyperband_trial_epochs(num_samples, scheduler.reduction_factor, max_t)
    return [float(max_t)] * num_samples


def expected_levels(choices: Sequence[int], fixed: Sequence[int], sampled: int) -> float:
    """Expected number of distinct fusion levels a search trains at: the levels of its fixed points plus, for each
    other choice, the chance that one of ``sampled`` uniform draws picks it (TPE samples at random until it has
    enough trials): ``|fixed| + sum_{l not fixed} 1 - (1 - 1/K)**sampled``."""
    fixed_set = set(fixed) & set(choices)
    k = len(choices)
    return len(fixed_set) + sum(1 - (1 - 1 / k) ** sampled for c in choices if c not in fixed_set)


# --------------------------------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------------------------------


def concurrency(max_concurrent: int | None, cpus: float, gpus: float, trial_cpu: float, trial_gpu: float,
                num_samples: int) -> int:
    """Trials of a study that run at once: the smallest of ``max_concurrent_trials``, the CPUs over the CPUs per
    trial, the GPUs over the GPU fraction per trial (when it uses GPUs) and the trials of the study; at least 1."""
    limits = [num_samples, math.floor(cpus / trial_cpu + 1e-9)]
    if max_concurrent:
        limits.append(max_concurrent)
    if trial_gpu > 0:
        limits.append(math.floor(gpus / trial_gpu + 1e-9))
    return max(1, min(limits))


def makespan(durations: Sequence[float], slots: int) -> float:
    """Wall time of jobs started in order, each on the slot that frees first (what Ray does with pending trials)."""
    free = [0.0] * max(1, slots)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free) if durations else 0.0


def machine_resources() -> tuple[float, float]:
    """(CPUs, GPUs) a local Ray cluster would offer: the CPUs this process may use and the visible GPUs."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return float(cpus), float(torch.cuda.device_count() if torch.cuda.is_available() else 0)


# --------------------------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StagePrice:
    """One stage a study needs, with what it costs."""

    label: str
    """e.g. ``teacher mnist``, ``caches L2``, ``joint teacher L2``, ``targets mnist``, ``trial (students mnist)``."""
    scope: str
    """How often it is built: ``search`` (once), ``level`` (once per fusion level), ``trial`` (by every trial)."""
    stored: bool | None
    """The store holds it already (None: depends on the sampled config)."""
    seconds_per_epoch: float | None = None
    epochs: int = 0
    seconds: float = 0.0
    """One build: set-up, ``epochs x seconds_per_epoch`` and the final evaluation, or the whole build of a
    cache/targets."""
    setup_s: float = 0.0
    """Building the stage's task before its first step (models, data on the device, targets read), as timed."""


@dataclass
class StudyPrice:
    """The estimate of one study."""

    study: str
    stages: list[StagePrice]
    trials: int
    trial_epochs: float
    """Expected trial-epochs under the scheduler."""
    epoch_s: float
    concurrency: int
    trial_seconds: list[float]
    """Expected duration of each trial, in creation order (worker start, upstream, epochs, test)."""
    wall_s: float
    device_hours: float


@dataclass
class SearchPrice:
    """The estimate of a whole search (see the module docstring)."""

    job: str
    stage: str
    device: str
    threads: int
    scheduler: str
    cpus: float
    gpus: float
    trial_cpu: float
    trial_gpu: float
    device_unit: str
    """``GPU-hours`` or ``CPU-hours``."""
    config: dict
    """The representative trial config every trial is costed at."""
    overheads: dict[str, float]
    """Fixed costs in seconds: ``driver_start``, ``pricing`` (at launch), ``ray_start``, ``teachers``,
    ``worker_start``, ``study_overhead``."""
    teachers: list[StagePrice]
    studies: list[StudyPrice]
    wall_s: float
    device_hours: float
    measured_in_s: float = 0.0
    """How long measuring took."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SearchPrice:
        d = dict(d)
        d["teachers"] = [StagePrice(**t) for t in d["teachers"]]
        d["studies"] = [StudyPrice(**{**s, "stages": [StagePrice(**t) for t in s["stages"]]}) for s in d["studies"]]
        return cls(**d)


@dataclass
class _Costs:
    """What the probe measured (seconds at full size)."""

    teacher: dict[str, StagePrice] = field(default_factory=dict)
    caches: float = 0.0
    joint: StagePrice | None = None
    targets: dict[str, float] = field(default_factory=dict)
    trial: dict[str, StagePrice] = field(default_factory=dict)
    test_s: dict[str, float] = field(default_factory=dict)


class _WorkerStart:
    """Seconds a fresh trial worker takes to start, timed in a child Python: importing Ray Tune, torch and mlfd's
    trainable, then reading the datasets (from their prepared files, as a worker does). The child runs beside the
    probe when the machine has a CPU to spare for it (it times itself), else after it."""

    CODE = ("import time\nt0 = time.perf_counter()\nimport json, sys\nimport ray.tune, torch\n"
            "import mlfd.tune.trainable, mlfd.stages.trial\nfrom mlfd.config import DatasetSpec, from_dict\n"
            "from mlfd.data import load_dataset\nfor d in json.loads(sys.argv[1]):\n"
            "    load_dataset(from_dict(DatasetSpec, d, validate=False))\nprint(time.perf_counter() - t0)\n")

    def __init__(self, datasets: list[dict]):
        self.datasets = datasets
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from mlfd.tune.packing.probe import child_env

        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, json.dumps(self.datasets)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())

    def seconds(self) -> float:
        if self.proc is None:
            self.start()
        try:
            out, err = self.proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise RuntimeError("price: the worker-start probe took over 600 s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"price: the worker-start probe failed: {err.strip().splitlines()[-1:]}")
        return float(out.strip().splitlines()[-1])


def _full_sizes(spec: PipelineSpec) -> dict[str, dict[str, int]]:
    from mlfd.data import load_dataset

    return {d.name: {s: len(getattr(load_dataset(d), s)) for s in ("train", "val", "test")} for d in spec.datasets}


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _epoch_price(label: str, scope: str, task: Any, setup_s: float, recipe: Any, device: Any, steps: int,
                 train: int, val: int, test: int, probe_val: int) -> tuple[StagePrice, float]:
    """(price of one build of a trained stage, seconds of its test pass), from its task timed on the probe."""
    from mlfd.stages.measure import time_eval, time_train_steps

    ips = time_train_steps(task, recipe, device, steps)
    eps = time_eval(task, probe_val, device, recipe)
    per_epoch = train / ips + val / eps
    test_s = test / eps
    return StagePrice(label, scope, None, per_epoch, recipe.epochs, setup_s + recipe.epochs * per_epoch + test_s,
                      setup_s), test_s


def _checkpoint_seconds(task: Any, recipe: Any) -> float:
    """One per-epoch checkpoint: the module's and optimizer's state saved and copied once (Ray's storage sync)."""
    import shutil

    from mlfd.engine import build_optimizer
    from mlfd.store import save_torch

    opt = build_optimizer(task.module.parameters(), recipe)
    with tempfile.TemporaryDirectory(prefix="mlfd-price-ckpt-") as tmp:
        t0 = time.perf_counter()
        save_torch({"model": task.module.state_dict(), "optimizer": opt.state_dict()}, Path(tmp) / "a" / "state.pt")
        shutil.copytree(Path(tmp) / "a", Path(tmp) / "b")
        return time.perf_counter() - t0


def _measure(spec: PipelineSpec, stage: str, studies: list[str | None], steps: int) -> _Costs:
    """Time the trial's stages on a probe of ``spec`` (see the module docstring)."""
    import torch

    from mlfd.data import load_dataset
    from mlfd.stages.cache import build_cache
    from mlfd.stages.common import EVAL_BATCH, Context
    from mlfd.stages.joint import joint_targets, train_joint
    from mlfd.stages.measure import ProbeContext, probe_data, probe_spec, seed_teachers
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore

    sizes = _full_sizes(spec)
    costs = _Costs()
    recipes = [spec.teacher_for(d.name) for d in spec.datasets] + [spec.student_for(d.name).recipe
                                                                   for d in spec.datasets]
    n_train = (1 + steps) * max(r.batch_size for r in recipes)
    n_eval = min(EVAL_BATCH, n_train)
    with tempfile.TemporaryDirectory(prefix="mlfd-price-") as tmp:
        pctx = ProbeContext(spec=probe_spec(spec), store=ArtifactStore(Path(tmp) / "store"), progress=False)
        pctx.probe = {d.name: probe_data(load_dataset(d), n_train, n_eval) for d in spec.datasets}
        device = pctx.device
        full = Context(spec=spec, store=pctx.store, progress=False)  # the full-size recipes (epochs)
        probe_n = {n: {s: len(getattr(p, s)) for s in ("train", "val", "test")} for n, p in pctx.probe.items()}

        def priced(st: str, study: str | None, label: str, scope: str, names: list[str]) -> tuple[StagePrice, float]:
            t0 = time.perf_counter()
            task = StageTrial(pctx, st, study).task()
            setup_s = time.perf_counter() - t0
            recipe = dataclasses.replace(StageTrial(pctx, st, study).recipe(),
                                         epochs=StageTrial(full, st, study).recipe().epochs)
            train = sum(sizes[n]["train"] for n in names)
            if st in ("multi_head", "joint_head"):  # one batch of every dataset per step over the largest one
                train = max(math.ceil(sizes[n]["train"] / recipe.batch_size) for n in names) * recipe.batch_size \
                    * len(names)
            sp, test_s = _epoch_price(label, scope, task, setup_s, recipe, device, steps, train,
                                      sum(sizes[n]["val"] for n in names), sum(sizes[n]["test"] for n in names),
                                      sum(probe_n[n]["val"] for n in names))
            if scope == "trial":  # a trial reports every epoch with a checkpoint
                sp.seconds_per_epoch += _checkpoint_seconds(task, recipe) + RAY_REPORT_S
            del task
            return sp, test_s

        names = [d.name for d in spec.datasets]
        if stage in ("students", "joint"):
            for n in names:
                costs.teacher[n] = priced("teachers", n, f"teacher {n}", "search", [n])[0]
        seed_teachers(pctx)  # untrained stand-ins under the real keys: caches and T* are built from them
        if stage in ("students", "joint"):
            plan = StageTrial(pctx, stage, studies[0]).joint_plan
            for t in plan.teachers:
                for d in plan.datasets:
                    images = sum(sizes[d].values())
                    costs.caches += _timed(lambda t=t, d=d: build_cache(pctx, t, d, plan.level)) * images / sum(
                        probe_n[d].values())
        if stage == "students":
            plan = StageTrial(pctx, stage, studies[0]).joint_plan
            costs.joint = priced("joint", studies[0], f"joint teacher L{plan.level}", "level", list(plan.datasets))[0]
            train_joint(pctx, plan)  # one probe epoch, so that the targets below time only themselves
            for s in studies:
                costs.targets[s] = _timed(lambda s=s: joint_targets(pctx, plan, s)) * sizes[s]["train"] / probe_n[s][
                    "train"]
        for s in studies:
            used = list(StageTrial(pctx, stage, s).joint_plan.datasets) if stage == "joint" else (
                names if stage in ("multi_head", "joint_head") else [s])
            label = f"trial ({stage}{' ' + s if s else ''})"
            costs.trial[s or stage], costs.test_s[s or stage] = priced(stage, s, label, "trial", used)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return costs


def representative_config(job: Any, space: Any) -> dict:
    """The config every trial is costed at: the job's first ``points_to_evaluate`` entry, else the space's first
    covering config."""
    return dict(job.points_to_evaluate[0]) if job.points_to_evaluate else dict(space.cover()[0])


def _joint_scope(job: Any, pipeline: dict, space: Any, study: str | None) -> str:
    """``trial`` when configs of one fusion level give different joint teachers (the space searches T*), else
    ``level``."""
    from mlfd.stages.common import Context
    from mlfd.stages.trial import StageTrial
    from mlfd.store import ArtifactStore
    from mlfd.tune.spaces import apply_config

    keys: dict[int, set[str]] = {}
    with tempfile.TemporaryDirectory(prefix="mlfd-price-keys-") as tmp:
        store = ArtifactStore(Path(tmp))
        for config in [*job.points_to_evaluate, *space.cover()]:
            spec = from_dict(PipelineSpec, apply_config(pipeline, config), validate=False)
            trial = StageTrial(Context(spec=spec, store=store, progress=False), "joint", study)
            keys.setdefault(trial.joint_plan.level, set()).add(trial.output()[1])
    return "trial" if any(len(k) > 1 for k in keys.values()) else "level"


def _level_choices(space: Any, spec: PipelineSpec) -> list[int]:
    from mlfd.tune.spaces import FUSION_LEVEL

    for p in space.params:
        if p.name == FUSION_LEVEL and getattr(p, "choices", None):
            return [int(c) for c in p.choices]
    return list(spec.fusion_levels[:1])


def _stored(ctx: Any, stage: str, study: str | None) -> dict[str, bool]:
    """What the real store holds for a trial at the representative config: teachers, caches, T*, targets."""
    from mlfd.stages.cache import cache_key
    from mlfd.stages.joint import TARGETS_KIND, targets_key
    from mlfd.stages.trial import StageTrial

    out = {f"teacher {d.name}": StageTrial(ctx, "teachers", d.name).artifact() is not None for d in ctx.spec.datasets}
    if stage in ("students", "joint"):
        plan = StageTrial(ctx, stage, study).joint_plan
        out["caches"] = all(ctx.store.get("features", cache_key(ctx, t, d, plan.level)) is not None
                            for t in plan.teachers for d in plan.datasets)
    if stage == "students":
        joint = StageTrial(ctx, "joint", study)
        art = joint.artifact()
        out["joint"] = art is not None
        out["targets"] = art is not None and ctx.store.get(TARGETS_KIND, targets_key(ctx, art.key, study)) is not None
    out["trial"] = StageTrial(ctx, stage, study).artifact() is not None
    return out


@dataclass
class _Shared:
    """What every study's trials share: the fixed costs and the concurrency."""

    worker_start: float
    first_caches: float
    """Caches of the representative level, built by the search's first trial (0 when stored)."""
    extra_caches: float
    """Each sampled trial's share of the caches of the other levels the search is expected to touch."""
    joint_scope: str
    concurrency: int
    share: float
    """A trial's share of a device (GPU fraction or CPUs) for device-hours."""


def _study_price(job: Any, study: str | None, index: int, stored: dict[str, bool], costs: _Costs, shared: _Shared,
                 epochs: list[float], level: int) -> StudyPrice:
    """One study: its stages, each trial's expected duration in creation order, its wall time (list scheduling on
    the concurrency's slots plus :data:`STUDY_OVERHEAD_S`) and device-hours."""
    key = study or job.stage
    trial = dataclasses.replace(costs.trial[key], stored=stored["trial"])
    stages: list[StagePrice] = []
    if job.stage in ("students", "joint"):
        stages.append(StagePrice(f"caches L{level}", "level", stored["caches"], seconds=costs.caches))
    if job.stage == "students":
        stages += [dataclasses.replace(costs.joint, scope=shared.joint_scope, stored=stored["joint"]),
                   StagePrice(f"targets {study}", shared.joint_scope, stored["targets"], seconds=costs.targets[study])]
    stages.append(trial)
    per_level = shared.joint_scope == "level"
    durations = []
    for i in range(job.num_samples):
        point = i < len(job.points_to_evaluate)
        d = shared.worker_start if (i < shared.concurrency or not job.reuse_actors) else 0.0
        d += (shared.first_caches if index == 0 and i == 0 else 0.0) + (0.0 if point else shared.extra_caches)
        if job.stage == "students":  # T* (a point's is shared by the studies) and its targets on this study
            joint_built = stored["joint"] or (point and index > 0) or (per_level and (i or index))
            d += 0.0 if joint_built else costs.joint.seconds
            d += 0.0 if stored["targets"] or (per_level and i > 0) else costs.targets[study]
        if not (point and stored["trial"]):  # else the trial finds its artifact and replays its epochs
            d += trial.setup_s + epochs[i] * trial.seconds_per_epoch + costs.test_s[key]
        durations.append(d)
    return StudyPrice(key, stages, job.num_samples, sum(epochs), trial.seconds_per_epoch, shared.concurrency,
                      durations, makespan(durations, shared.concurrency) + STUDY_OVERHEAD_S,
                      sum(durations) * shared.share / 3600)


def price_search(job: Any, pipeline: dict, space_file: str, studies: list[str | None], store: str, threads: int,
                 gpu_fraction: float = 0.0, job_name: str = "", driver_start_s: float = 0.0,
                 steps: int = PROBE_STEPS) -> SearchPrice:
    """Measure and estimate a prepared search (see the module docstring).

    Args:
        job: The :class:`mlfd.search.JobSpec` (smoke and overrides applied).
        pipeline: The job's pipeline as a dict (smoke variant and ``set`` applied).
        space_file: The search space YAML.
        studies: The studies in the order they run.
        store: The artifact store the search reads and fills.
        threads: torch threads of a trial (``mlfd.tune.trials.trial_threads``: its CPUs).
        gpu_fraction: The GPU fraction per trial (``plan.gpu``, ``prepare``'s packing result).
        job_name: What to call the job in the output.
        driver_start_s: Measured seconds from the command's start to the end of ``prepare``.
        steps: Timed optimizer steps per task.
    """
    import torch

    from mlfd.stages.common import Context
    from mlfd.store import ArtifactStore
    from mlfd.tune.spaces import apply_config, load_space
    from mlfd.tune.trainable import stage_epochs

    t0 = time.perf_counter()
    space = load_space(space_file)
    config = representative_config(job, space)
    spec = from_dict(PipelineSpec, apply_config(pipeline, config), path="price")
    cpus, gpus = machine_resources()
    worker = _WorkerStart([dataclasses.asdict(d) for d in spec.datasets])
    if cpus > threads:
        worker.start()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        costs = _measure(spec, job.stage, list(studies), steps)
    finally:
        torch.set_num_threads(before)
    worker_start = worker.seconds()
    ctx = Context(spec=spec, store=ArtifactStore(store), progress=False)
    # The scheduler stops trials at the job pipeline's epochs (launch._tuner); a trial trains its config's.
    max_t = stage_epochs(spec, job.stage)
    if job.scheduler.type != "none":
        max_t = min(max_t, stage_epochs(from_dict(PipelineSpec, pipeline, validate=False), job.stage))
    conc = concurrency(job.max_concurrent_trials, cpus, gpus, job.resources.cpu, gpu_fraction, job.num_samples)
    share = gpu_fraction if gpu_fraction > 0 else job.resources.cpu

    # Teachers: prebuilt as parallel Ray tasks (students / joint searches) when the store lacks them.
    stored0 = _stored(ctx, job.stage, studies[0])
    teachers = []
    for name, sp in costs.teacher.items():
        sp.stored = stored0[f"teacher {name}"]
        teachers.append(sp)
    build = [t.seconds for t in teachers if not t.stored]
    task_slots = concurrency(None, cpus, gpus, job.resources.cpu, gpu_fraction, len(build))
    teachers_wall = (makespan(build, task_slots) + worker_start) if build else 0.0

    # Caches: the representative level's, then the other levels the search is expected to touch.
    levels = _level_choices(space, spec)
    fixed = [int(p.get("fusion_level", spec.fusion_levels[0])) for p in job.points_to_evaluate]
    sampled = sum(max(0, job.num_samples - len(job.points_to_evaluate)) for _ in studies)
    extra_levels = max(0.0, expected_levels(levels, fixed or [spec.fusion_levels[0]], sampled) - 1)
    joint_scope = _joint_scope(job, pipeline, space, studies[0]) if job.stage == "students" else "level"
    epochs = expected_trial_epochs(job.scheduler, job.num_samples, max_t)
    shared = _Shared(worker_start, costs.caches if not stored0.get("caches") else 0.0,
                     extra_levels * costs.caches / max(1, sampled), joint_scope, conc, share)
    out_studies = [_study_price(job, study, si, _stored(ctx, job.stage, study), costs, shared, epochs,
                                spec.fusion_levels[0]) for si, study in enumerate(studies)]
    measured_in = time.perf_counter() - t0
    overheads = {"driver_start": driver_start_s, "pricing": 0.0, "ray_start": RAY_START_S, "teachers": teachers_wall,
                 "worker_start": worker_start, "study_overhead": STUDY_OVERHEAD_S}
    wall = driver_start_s + RAY_START_S + teachers_wall + sum(s.wall_s for s in out_studies)
    device_hours = sum(s.device_hours for s in out_studies) + sum(build) * share / 3600
    return SearchPrice(job_name or job.name, job.stage, str(ctx.device), threads, _scheduler_text(job.scheduler, max_t),
                       cpus, gpus,
                       float(job.resources.cpu), float(gpu_fraction), "GPU-hours" if gpu_fraction > 0 else "CPU-hours",
                       config, overheads, teachers, out_studies, wall, device_hours, measured_in)


def _scheduler_text(s: Any, max_t: int) -> str:
    if s.type == "asha":
        return f"ASHA (grace {min(s.grace_period, max_t)}, rf {s.reduction_factor}, max {max_t} epochs)"
    if s.type == "hyperband":
        return f"HyperBand (rf {s.reduction_factor}, max {max_t} epochs)"
    return f"FIFO ({max_t} epochs)"


def with_pricing(price: SearchPrice, seconds: float) -> SearchPrice:
    """The estimate of a launch that measured it first: the measuring time is part of the command's wall time."""
    over = dict(price.overheads, pricing=seconds)
    return dataclasses.replace(price, overheads=over, wall_s=price.wall_s + seconds)


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    """``h:mm:ss``."""
    if s is None or s != s:
        return "n/a"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _store_word(stored: bool | None) -> str:
    return "stored" if stored else "build" if stored is not None else "?"


def price_table(p: SearchPrice) -> str:
    """The estimate as text: teachers, each study's stages and trials, the totals."""
    o = p.overheads
    out = [f"price of {p.job} ({p.stage}) on {p.device}, {p.threads} thread{'s' * (p.threads > 1)} per trial; "
           f"scheduler {p.scheduler}",
           f"resources: {p.cpus:g} CPUs, {p.gpus:g} GPUs; per trial {p.trial_cpu:g} CPU, {p.trial_gpu:g} GPU",
           f"every trial costed at {json.dumps(p.config)}", ""]
    rows = [[t.label, t.scope, _store_word(t.stored), f"{t.seconds_per_epoch:.2f}" if t.seconds_per_epoch else "",
             str(t.epochs or ""), "-" if t.stored else fmt_time(t.seconds)] for t in p.teachers]
    for s in p.studies:
        rows += [[f"{s.study}: {t.label}", t.scope, _store_word(t.stored),
                  f"{t.seconds_per_epoch:.2f}" if t.seconds_per_epoch else "", str(t.epochs or ""),
                  "-" if t.stored and t.scope != "trial" else fmt_time(t.seconds)] for t in s.stages]
    out += _table(["stage", "built per", "store", "s/epoch", "epochs", "one build"], rows, {3, 4, 5})
    out.append("")
    rows = [[s.study, str(s.trials), f"{s.trial_epochs:.2f}", str(s.concurrency),
             fmt_time(sum(s.trial_seconds) / max(1, s.trials)), fmt_time(s.wall_s), f"{s.device_hours:.3f}"]
            for s in p.studies]
    out += _table(["study", "trials", "trial-epochs", "at once", "per trial", "wall", p.device_unit], rows,
                  {1, 2, 3, 4, 5, 6})
    out += ["", f"fixed: driver start {fmt_time(o['driver_start'])}, Ray start/stop {fmt_time(o['ray_start'])}, "
                f"teacher prebuild {fmt_time(o['teachers'])}, worker start {o['worker_start']:.1f} s per new worker, "
                f"{o['study_overhead']:.0f} s per study"
                + (f", pricing {fmt_time(o['pricing'])}" if o["pricing"] else ""),
            f"expected wall time {fmt_time(p.wall_s)}, {p.device_hours:.3f} {p.device_unit} "
            f"(measured in {p.measured_in_s:.0f} s)"]
    return "\n".join(out)


def write_price(price: SearchPrice, path: Path, measured: dict | None = None) -> None:
    """Write the estimate (and the measured times, when given) as JSON."""
    from mlfd.store import atomic_write_text

    data = {"estimate": price.to_dict()}
    if measured is not None:
        data["measured"] = measured
    atomic_write_text(Path(path), json.dumps(data, indent=1, default=str))


def read_price(out: Path) -> tuple[SearchPrice | None, dict | None]:
    """(estimate, measured times) from a search's ``OUT/price.json``; (None, None) when it has none or is not
    readable."""
    f = Path(out) / PRICE_FILE
    try:
        data = json.loads(f.read_text())
        return SearchPrice.from_dict(data["estimate"]), data.get("measured")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None




# --------------------------------------------------------------------------------------------------------------------
# What mlfd tune calls
# --------------------------------------------------------------------------------------------------------------------


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def price_prepared(plan: SearchPlan, threads: int, driver_start_s: float) -> SearchPrice:
    """Price a search that :func:`mlfd.tune.launch.prepare` prepared."""
    return price_search(plan.job, plan.pipeline, plan.space_file, plan.studies, plan.store, threads, plan.gpu,
                        Path(plan.job_file).name, driver_start_s)


def launch_price(plan: SearchPlan, threads: int, out: Path, resume: bool) -> SearchPrice | None:
    """The estimate a launching search saves in ``OUT/price.json`` (None on ``--resume`` when it has one already,
    or when measuring fails: an estimate never stops a search). Its wall time includes the time measuring took."""
    if resume and (Path(out) / PRICE_FILE).is_file():
        return None
    t0 = time.monotonic()
    try:
        price = price_prepared(plan, threads, process_age())
    except Exception as e:  # noqa: BLE001
        _logger.warning("mlfd tune: no price estimate (%s: %s)", type(e).__name__, str(e).splitlines()[0][:200])
        return None
    price = with_pricing(price, time.monotonic() - t0)
    _logger.info("mlfd tune: price: expected wall time %s, %.3f %s (measured in %.0f s; details: --plan)",
                 fmt_time(price.wall_s), price.device_hours, price.device_unit, price.overheads["pricing"])
    return price


def save_measured(out: Path, measured: dict) -> None:
    """Add the measured times of the search that just ran to ``OUT/price.json`` (kept as is without an estimate)."""
    price, _ = read_price(out)
    if price is None:
        return
    try:
        write_price(price, Path(out) / PRICE_FILE, measured)
    except OSError as e:  # the search itself finished: say so and go on
        _logger.warning("mlfd tune: could not add the measured times to %s (%s)", Path(out) / PRICE_FILE, e)


__all__ = ["PRICE_FILE", "RAY_START_S", "STUDY_OVERHEAD_S", "SearchPrice", "StagePrice", "StudyPrice",
           "asha_continue_probability", "asha_rungs", "asha_trial_epochs", "concurrency", "expected_levels",
           "expected_trial_epochs", "fmt_time", "hyperband_trial_epochs", "launch_price", "makespan", "price_prepared",
           "price_search", "price_table", "process_age", "read_price", "representative_config", "save_measured",
           "write_price"]
