"""The dry run: one trial of a stage run for a few steps in a child process (``python -m mlfd.tune.packing``),
on stand-in upstream artifacts, with its peak memory measured per phase."""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
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

PROBE_STEPS = 2
PROBE_TIMEOUT_S = 1800.0


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
    from mlfd.stages.trial import StageTrial

    spec = ctx.spec

    def dry(trial: StageTrial) -> Callable[[], None]:
        def run() -> None:
            fit(LimitedTask(trial.task(), steps), dataclasses.replace(trial.recipe(), epochs=1), ctx.device,
                progress=False)
        return run

    if stage in ("teachers", "multi_head", "joint_head"):
        for s in studies if stage == "teachers" else [None]:
            yield f"trial:{s or stage}", dry(StageTrial(ctx, stage, s))
        return
    # students / joint: the teachers are prebuilt as Ray tasks with the same GPU fraction, so they must fit too.
    for d in spec.datasets:
        yield f"teacher:{d.name}", dry(StageTrial(ctx, "teachers", d.name))
    for s in studies:
        trial = StageTrial(ctx, stage, s)
        yield f"upstream:{s or stage}", trial.build_upstream
        yield f"trial:{s or stage}", dry(trial)


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
                                  text=True, timeout=timeout, env=child_env())
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


def child_env() -> dict[str, str]:
    """The environment of the child: this one, with the directory holding ``mlfd`` on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[3])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, path) if p)}


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

