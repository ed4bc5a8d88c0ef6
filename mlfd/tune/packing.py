"""Memory-aware packing of trials on fractional GPUs (design.md section 3).

Ray's fractional GPUs are logical: with ``resources.gpu: 0.125`` Ray places eight trials on one GPU whatever memory
they need, and the ninth allocation that does not fit kills a trial with CUDA out-of-memory. So before a search starts
(:mod:`mlfd.tune.launch`), one trial's peak memory is measured with a short dry run of the stage's real task, and

* a fixed fraction is refused when its trials would not fit (:func:`check_packing`), with a one-line error saying
  how many do fit;
* ``gpu: auto`` becomes the smallest fraction that fits, ``1/N`` (:func:`auto_fraction`).

The dry run (:func:`probe`) runs in a child process, so the driver never holds a CUDA context or cached memory that
the trials would then lack. It builds the stage's task the way a trial does (``StudentTask``, ``JointTask``,
``ClassifierTask`` or the baselines' ``SharedTask``) and runs :func:`mlfd.engine.fit` for one epoch cut to a few
steps (forward, backward, optimizer step, then the val evaluation), on the real data, which stays resident on the
GPU as in a trial. The upstream a trial needs (teachers, feature cache, joint teacher, its targets) is built in a
throw-away store from randomly initialised stand-in teachers: the same shapes and memory as the real upstream, without
training the teachers. A trial process that builds the shared upstream itself (the first one to ask) also needs the
memory of that build, so the upstream build is measured as a phase of its own; so is the training of each teacher for
``students`` and ``joint`` searches, whose teachers are prebuilt as Ray tasks with the same GPU fraction.

Memory of one trial process = the caching allocator's peak (``torch.cuda.max_memory_reserved``: what the process
takes from the GPU, the allocator's cache included) + a fixed reserve per process for the CUDA context, cuBLAS/cuDNN
workspaces and loaded kernels, which the allocator does not see (:data:`CONTEXT_RESERVE_BYTES`).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mlfd.config import PipelineSpec, from_dict, to_dict
from mlfd.errors import SpecError

_logger = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20
CONTEXT_RESERVE_BYTES = 512 * MIB
"""Per-process GPU memory outside the caching allocator: CUDA context, cuBLAS/cuDNN workspaces, kernel images."""
HEADROOM = 0.9
"""Fraction of the GPU's memory that trials may plan to use (the rest absorbs fragmentation and other processes)."""
MAX_AUTO_TRIALS = 8
"""``gpu: auto`` packs at most this many trials per GPU (on one H200, 8 small trials gave 4.2x the throughput of one;
more add little and each needs a CPU)."""
RAY_RESOURCE_STEP = 1e-4
"""Ray's granularity of fractional resources."""
PROBE_STEPS = 2
PROBE_TIMEOUT_S = 1800.0


# --------------------------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------------------------


def gib(n_bytes: float) -> str:
    """``n_bytes`` as a GiB figure for messages (``'3.20'``)."""
    return f"{n_bytes / GIB:.2f}"


def trials_per_gpu(peak_bytes: int, gpu_total_bytes: int, headroom: float = HEADROOM,
                   reserve_bytes: int = CONTEXT_RESERVE_BYTES) -> int:
    """How many trial processes fit on one GPU.

    Args:
        peak_bytes: One trial's peak memory (caching allocator, as measured by :func:`probe`).
        gpu_total_bytes: The GPU's total memory.
        headroom: Usable fraction of the GPU's memory.
        reserve_bytes: Per-process memory outside the allocator (CUDA context and workspaces).

    Returns:
        ``floor(headroom * total / (peak + reserve))``; 0 when one trial does not fit alone.
    """
    if peak_bytes < 0 or gpu_total_bytes <= 0 or not 0 < headroom <= 1 or reserve_bytes < 0:
        raise ValueError(f"trials_per_gpu: need peak >= 0, total > 0, 0 < headroom <= 1, reserve >= 0; got "
                         f"{peak_bytes}, {gpu_total_bytes}, {headroom}, {reserve_bytes}")
    return int(headroom * gpu_total_bytes // (peak_bytes + reserve_bytes))


def packed_per_gpu(fraction: float) -> int:
    """Trials Ray places on one GPU when each asks for ``fraction`` of a GPU (1 for whole GPUs)."""
    if fraction <= 0:
        raise ValueError(f"packed_per_gpu: fraction must be > 0, got {fraction}")
    if fraction >= 1:
        return 1
    return int(math.floor(1.0 / fraction + 1e-6))


def fraction_for(n: int) -> float:
    """The GPU fraction that makes Ray place ``n`` trials per GPU: ``1/n`` rounded down to Ray's 0.0001 step."""
    if n < 1:
        raise ValueError(f"fraction_for: n must be >= 1, got {n}")
    if n == 1:
        return 1.0
    return math.floor(1.0 / n / RAY_RESOURCE_STEP) * RAY_RESOURCE_STEP


def _fits_alone_message(peak_bytes: int, gpu_total_bytes: int, headroom: float, reserve_bytes: int) -> str:
    return (f"one trial peaks at {gib(peak_bytes)} GiB (+{gib(reserve_bytes)} GiB CUDA context) and the GPU has "
            f"{gib(gpu_total_bytes)} GiB ({headroom:.0%} usable): it does not fit even alone; lower the batch size or "
            "the input size")


def check_packing(fraction: float, peak_bytes: int, gpu_total_bytes: int, headroom: float = HEADROOM,
                  reserve_bytes: int = CONTEXT_RESERVE_BYTES) -> None:
    """Refuse a GPU fraction whose packed trials would not fit in the GPU's memory.

    Args:
        fraction: ``resources.gpu`` of the job (a fraction below 1, or a whole number of GPUs).
        peak_bytes: One trial's peak memory.
        gpu_total_bytes: The GPU's total memory.
        headroom: Usable fraction of the GPU's memory.
        reserve_bytes: Per-process memory outside the allocator.

    Raises:
        SpecError: ``resources.gpu: 0.125 packs 8 trials per GPU but one trial peaks at X GiB and the GPU has Y GiB;
            at most N fit, use gpu: 1/N or more, or gpu: auto`` (or that one trial does not fit even alone).
    """
    fit = trials_per_gpu(peak_bytes, gpu_total_bytes, headroom, reserve_bytes)
    packs = packed_per_gpu(fraction)
    if packs <= fit:
        return
    if fit == 0:
        raise SpecError(f"resources.gpu: {fraction:g}: " + _fits_alone_message(peak_bytes, gpu_total_bytes, headroom,
                                                                                reserve_bytes))
    use = "1" if fit == 1 else f"{fraction_for(fit):g} (1/{fit})"
    raise SpecError(f"resources.gpu: {fraction:g} packs {packs} trials per GPU but one trial peaks at "
                    f"{gib(peak_bytes)} GiB (+{gib(reserve_bytes)} GiB CUDA context) and the GPU has "
                    f"{gib(gpu_total_bytes)} GiB ({headroom:.0%} usable); at most {fit} fit, use gpu: {use} or more, "
                    "or gpu: auto")


def auto_fraction(peak_bytes: int, gpu_total_bytes: int, max_trials: int = MAX_AUTO_TRIALS,
                  headroom: float = HEADROOM, reserve_bytes: int = CONTEXT_RESERVE_BYTES) -> float:
    """The GPU fraction for ``gpu: auto``: ``1/N`` with N the trials that fit (at most ``max_trials``).

    Raises:
        SpecError: One trial does not fit even alone.
    """
    fit = trials_per_gpu(peak_bytes, gpu_total_bytes, headroom, reserve_bytes)
    if fit == 0:
        raise SpecError("resources.gpu: auto: " + _fits_alone_message(peak_bytes, gpu_total_bytes, headroom,
                                                                       reserve_bytes))
    return fraction_for(min(fit, max(1, max_trials)))


# --------------------------------------------------------------------------------------------------------------------
# The worst case of a search space
# --------------------------------------------------------------------------------------------------------------------


def memory_worst_config(space: Any) -> dict:
    """The corner of a search space where a trial needs the most memory, as a flat trial config.

    Ints and numeric categoricals take their largest value (batch size, fusion level, widths); linear floats their
    high bound (a beta > 0 adds its level's features and adaptor); log-scaled floats (learning rates, decays,
    temperatures: no effect on memory) their geometric midpoint, so the dry steps stay numerically tame; other
    categoricals their first choice; fixed params their value. Conditions are honoured in declaration order, so with
    the largest fusion level every conditional beta is present.

    Args:
        space: A :class:`mlfd.tune.spaces.SearchSpace`.
    """
    values: dict = {}
    for p in space.params:
        if not p.active(values):
            continue
        if p.kind == "fixed":
            values[p.name] = copy.deepcopy(p.value)
        elif p.kind == "int":
            values[p.name] = p.high
        elif p.kind == "float":
            values[p.name] = math.sqrt(p.low * p.high) if p.log else p.high
        elif all(isinstance(c, (int, float)) for c in p.choices):
            values[p.name] = max(p.choices)
        else:
            values[p.name] = p.choices[0]
    return values


# --------------------------------------------------------------------------------------------------------------------
# The dry run (runs in a child process)
# --------------------------------------------------------------------------------------------------------------------


class LimitedTask:
    """A :class:`mlfd.engine.Task` cut to its first ``steps`` training batches per epoch (dry runs, benchmarks).

    Everything else (module, train step, evaluation) is the wrapped task's own.
    """

    def __init__(self, task: Any, steps: int):
        if steps < 1:
            raise ValueError(f"LimitedTask: steps must be >= 1, got {steps}")
        self.task = task
        self.module = task.module
        self.steps = min(steps, task.steps_per_epoch())

    def steps_per_epoch(self) -> int:
        return self.steps

    def train_batches(self, epoch: int) -> Iterator[Any]:
        return itertools.islice(self.task.train_batches(epoch), self.steps)

    def train_step(self, batch: Any) -> dict:
        return self.task.train_step(batch)

    def evaluate(self, split: str) -> dict[str, float]:
        return self.task.evaluate(split)


def standin_spec(spec: PipelineSpec, weights_dir: Path, stage: str) -> PipelineSpec:
    """The pipeline a dry run or a benchmark uses: teachers replaced by randomly initialised stand-ins.

    For ``students`` and ``joint`` each dataset's teacher gets a checkpoint of random weights (so stage 1 loads it
    instead of training: same shapes and memory, no training); students keep their architecture (their weights are
    trained by the trial anyway) and the joint teacher of a students search trains one epoch only (its targets' shapes
    are what matters). No model downloads pretrained weights.

    Args:
        spec: The trial's pipeline.
        weights_dir: Where the random teacher checkpoints are written.
        stage: The searched stage.
    """
    import torch

    from mlfd.data import load_dataset
    from mlfd.models import create_model
    from mlfd.store import save_torch

    s = copy.deepcopy(spec)
    for d in s.datasets:
        if d.student_model is None:
            d.student_model = copy.deepcopy(d.model)
        d.student_model.pretrained = False
        d.model.pretrained = False
        if stage in ("students", "joint"):
            torch.manual_seed(0)
            bare = dataclasses.replace(d.model, checkpoint=None)
            net = create_model(bare, load_dataset(d).num_classes)
            file = Path(weights_dir) / f"{d.name}.pt"
            save_torch({k: v.detach().cpu() for k, v in net.state_dict().items()}, file)
            d.model.checkpoint = str(file)
    if stage == "students":
        s.joint.recipe = dataclasses.replace(s.joint.recipe, epochs=1)
    return s


def _phases(ctx: Any, stage: str, studies: Sequence[str | None], steps: int) -> Iterator[tuple[str, Callable]]:
    """(name, thunk) of every phase a trial of ``stage`` (and its shared upstream) goes through."""
    from mlfd.engine import fit
    from mlfd.stages.baselines import SharedTask, baseline_model
    from mlfd.stages.cache import build_cache
    from mlfd.stages.joint import JointTask, joint_targets, plan_for
    from mlfd.stages.students import StudentTask, student_variant
    from mlfd.stages.teachers import ClassifierTask

    spec = ctx.spec

    def dry(make_task: Callable[[], Any], recipe: Any) -> Callable[[], None]:
        def run() -> None:
            task = make_task()
            fit(LimitedTask(task, steps), dataclasses.replace(recipe, epochs=1), ctx.device, progress=False)
        return run

    def teacher(name: str) -> Callable[[], Any]:
        return lambda: ClassifierTask(ctx, name, spec.dataset(name).model, spec.teacher_for(name))

    if stage == "teachers":
        for s in studies:
            yield f"trial:{s}", dry(teacher(s), spec.teacher_for(s))
        return
    if stage in ("multi_head", "joint_head"):
        model, recipe = baseline_model(ctx)
        yield f"trial:{stage}", dry(lambda: SharedTask(ctx, stage, model, recipe), recipe)
        return
    # students / joint: the teachers are prebuilt as Ray tasks with the same GPU fraction, so they must fit too.
    for d in spec.datasets:
        yield f"teacher:{d.name}", dry(teacher(d.name), spec.teacher_for(d.name))
    level = spec.fusion_levels[0]
    for s in studies:
        plan = plan_for(ctx, level, s)
        label = s or stage
        if stage == "students":
            yield f"upstream:{label}", lambda plan=plan, s=s: joint_targets(ctx, plan, s)
            yield f"trial:{label}", dry(lambda plan=plan, s=s: StudentTask(ctx, s, plan, student_variant(ctx, None, s)),
                                        spec.student_for(s).recipe)
        else:
            yield f"upstream:{label}", lambda plan=plan: [build_cache(ctx, t, d, plan.level) for t in plan.teachers
                                                         for d in plan.datasets]
            yield f"trial:{label}", dry(lambda plan=plan: JointTask(ctx, plan), spec.joint.recipe)


def _measure(fn: Callable[[], Any], device: Any) -> dict:
    """Run one phase and return its peak memory (GPU: allocator peaks; CPU: the process's peak RSS so far)."""
    import resource

    import torch

    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    out: dict = {}
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_bytes"] = out["peak_reserved_bytes"]
    out["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    if not cuda:
        out["peak_bytes"] = out["peak_rss_bytes"]
    out["seconds"] = round(time.perf_counter() - t0, 3)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_probe(request: dict) -> dict:
    """The child side of :func:`probe`: build the stand-in upstream and measure every phase. Returns a JSON dict."""
    import torch

    from mlfd.stages.common import Context
    from mlfd.store import ArtifactStore

    torch.set_num_threads(max(1, int(request.get("threads") or 1)))
    device = torch.device(request["device"])
    result: dict = {"device": str(device), "phases": {}}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        free, total = torch.cuda.mem_get_info(device)
        result.update(device_name=torch.cuda.get_device_name(device), total_bytes=int(total), free_bytes=int(free))
    spec = from_dict(PipelineSpec, request["pipeline"], path="probe", validate=False)
    spec.device = device.type
    with tempfile.TemporaryDirectory(prefix="mlfd-probe-") as tmp:
        spec = standin_spec(spec, Path(tmp), request["stage"])
        ctx = Context(spec=spec, store=ArtifactStore(Path(tmp) / "store"), progress=False)
        for name, fn in _phases(ctx, request["stage"], request["studies"], int(request.get("steps", PROBE_STEPS))):
            result["phases"][name] = _measure(fn, device)
    return result


# --------------------------------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProbeResult:
    """What a dry run measured.

    Attributes:
        device: ``cuda:0`` or ``cpu``.
        phases: Phase name (``teacher:<dataset>``, ``upstream:<study>``, ``trial:<study>``) -> ``peak_bytes`` (GPU:
            the allocator's reserved peak; CPU: the process's peak RSS), ``peak_allocated_bytes``,
            ``peak_reserved_bytes`` (GPU), ``peak_rss_bytes`` and ``seconds``.
        total_bytes: The GPU's total memory (0 on CPU).
        free_bytes: Its free memory when the probe started (0 on CPU).
        device_name: The GPU's name ('' on CPU).
    """

    device: str
    phases: dict[str, dict]
    total_bytes: int = 0
    free_bytes: int = 0
    device_name: str = ""

    @property
    def peak_bytes(self) -> int:
        """The largest peak over all phases."""
        return max((p["peak_bytes"] for p in self.phases.values()), default=0)

    @property
    def peak_phase(self) -> str:
        """The phase with the largest peak."""
        return max(self.phases, key=lambda k: self.phases[k]["peak_bytes"]) if self.phases else ""


def probe(spec: PipelineSpec | dict, stage: str, studies: Sequence[str | None], device: str = "cuda",
          steps: int = PROBE_STEPS, timeout: float = PROBE_TIMEOUT_S, threads: int | None = None) -> ProbeResult:
    """Dry-run a trial of ``stage`` (per study) in a child process and measure its peak memory per phase.

    Args:
        spec: The trial's pipeline (e.g. the job's pipeline at :func:`memory_worst_config` of its space).
        stage: ``students``, ``joint``, ``teachers``, ``multi_head`` or ``joint_head``.
        studies: The studies (dataset names; ``[None]`` for the joint teacher of the union and the baselines).
        device: ``cuda``, ``cuda:N`` or ``cpu`` (on CPU the figures are peak RSS).
        steps: Training steps of the dry run (then one val evaluation, as after a trial's epoch).
        timeout: Seconds before the child is stopped.
        threads: torch CPU threads in the child (default: all).

    Raises:
        SpecError: A trial does not fit on the GPU even alone (CUDA out of memory in the dry run), or the pipeline is
            invalid.
        RuntimeError: The dry run failed otherwise.
    """
    pipeline = to_dict(spec) if isinstance(spec, PipelineSpec) else spec
    request = {"pipeline": pipeline, "stage": stage, "studies": list(studies), "device": device, "steps": steps,
               "threads": threads or os.cpu_count() or 1}
    with tempfile.TemporaryDirectory(prefix="mlfd-probe-io-") as io_dir:
        req, out = Path(io_dir) / "request.json", Path(io_dir) / "result.json"
        req.write_text(json.dumps(request, default=str))
        try:
            proc = subprocess.run([sys.executable, "-m", "mlfd.tune.packing", str(req), str(out)], capture_output=True,
                                  text=True, timeout=timeout, env=_child_env())
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"packing: the dry run of a {stage} trial took over {timeout:.0f} s") from None
        data = json.loads(out.read_text()) if out.is_file() else {}
    if "error" in data:
        kind, message = data["error"], data["message"]
        if kind == "OutOfMemoryError" or "out of memory" in message.lower():
            raise SpecError(f"resources.gpu: one {stage} trial ran out of GPU memory in its dry run, alone on the GPU "
                            f"({message.splitlines()[0][:200]}); lower the batch size or the input size")
        if kind in ("SpecError", "CorruptArtifact"):
            raise SpecError(message)
        raise RuntimeError(f"packing: the dry run of a {stage} trial failed: {kind}: {message}")
    if proc.returncode != 0 or "phases" not in data:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"packing: the dry run of a {stage} trial exited with {proc.returncode}: {tail}")
    return ProbeResult(device=data["device"], phases=data["phases"], total_bytes=int(data.get("total_bytes", 0)),
                       free_bytes=int(data.get("free_bytes", 0)), device_name=data.get("device_name", ""))


def _child_env() -> dict[str, str]:
    """The environment of the child: this one, with the directory holding ``mlfd`` on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, path) if p)}


def measure_peak_memory(spec: PipelineSpec | dict, stage: str, study: str | None, device: str = "cuda") -> int:
    """Peak memory in bytes of one trial of ``stage`` for ``study``, from a dry run in a child process.

    On CUDA: the caching allocator's reserved peak over the trial's phases (upstream build, training steps with
    backward and optimizer step, val evaluation); the per-process CUDA context is not included (see
    :data:`CONTEXT_RESERVE_BYTES`). On CPU: the child's peak RSS.
    """
    return probe(spec, stage, [study], device).peak_bytes


# --------------------------------------------------------------------------------------------------------------------
# What `mlfd tune` calls
# --------------------------------------------------------------------------------------------------------------------


def plan_gpu(job: Any, pipeline: dict, space: Any, studies: Sequence[str | None],
             probe_fn: Callable[..., ProbeResult] = probe, log: Callable[[str], None] | None = None) -> float:
    """The GPU fraction each trial of a search asks Ray for, after a memory check (before Ray starts).

    ``resources.gpu: 0`` -> 0 without a dry run. Otherwise one trial per study is dry-run at the space's
    :func:`memory_worst_config`; a fixed fraction is checked (:func:`check_packing`) and ``auto`` is resolved
    (:func:`auto_fraction`).

    Args:
        job: The :class:`mlfd.tune.job.JobSpec`.
        pipeline: The job's pipeline as a dict (smoke variant and overrides applied).
        space: The job's :class:`mlfd.tune.spaces.SearchSpace`.
        studies: The job's studies.
        probe_fn: The dry run (tests pass a fake one).
        log: Where the one-line summary goes (default: stderr).

    Raises:
        SpecError: The fraction packs more trials than fit, or a trial does not fit alone.
    """
    from mlfd.tune.spaces import apply_config

    gpu = job.resources.gpu
    if gpu != "auto" and float(gpu) == 0:
        return 0.0
    worst = from_dict(PipelineSpec, apply_config(pipeline, memory_worst_config(space)), path="packing dry run")
    res = probe_fn(worst, job.stage, list(studies), "cuda")
    peak, total = res.peak_bytes, res.total_bytes
    if gpu == "auto":
        fraction = auto_fraction(peak, total)
    else:
        fraction = float(gpu)
        check_packing(fraction, peak, total)
    packs = packed_per_gpu(fraction)
    capped = job.max_concurrent_trials < packs
    cap = f" (max_concurrent_trials caps it at {job.max_concurrent_trials})" if capped else ""
    line = (f"mlfd tune: packing: one trial peaks at {gib(peak)} GiB ({res.peak_phase}, dry run at the space's "
            f"memory-worst corner) on a {gib(total)} GiB {res.device_name or 'GPU'}; gpu: {gpu} -> {fraction:g}, "
            f"{packs} trial{'s' if packs > 1 else ''} per GPU{cap}")
    (log or _logger.info)(line)
    return fraction


def trial_gpu(plan: dict, job: Any) -> float:
    """The GPU fraction of one trial of a prepared search (``plan['gpu']`` from :func:`plan_gpu`)."""
    if "gpu" in plan:
        return float(plan["gpu"])
    return 0.0 if job.resources.gpu == "auto" else float(job.resources.gpu)


def _main(argv: list[str]) -> int:
    """``python -m mlfd.tune.packing REQUEST.json RESULT.json``: the child of :func:`probe`."""
    request_file, result_file = argv
    try:
        result = run_probe(json.loads(Path(request_file).read_text()))
        code = 0
    except BaseException as e:  # the parent turns this into a one-line error
        traceback.print_exc()
        result, code = {"error": type(e).__name__, "message": str(e)}, 1
    Path(result_file).write_text(json.dumps(result, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
