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

The package: :mod:`~mlfd.tune.packing.arithmetic` (how many trials fit, the fraction to ask Ray for, the space's
memory-worst corner), :mod:`~mlfd.tune.packing.probe` (the dry run in a child process); this module holds what
``mlfd tune`` calls.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from mlfd.config import PipelineSpec, from_dict
from mlfd.tune.packing.arithmetic import (CONTEXT_RESERVE_BYTES, GIB, HEADROOM, MAX_AUTO_TRIALS, MIB,
                                          RAY_RESOURCE_STEP, auto_fraction, check_packing, fraction_for, gib,
                                          memory_worst_config, packed_per_gpu, trials_per_gpu)
from mlfd.tune.packing.probe import PROBE_STEPS, PROBE_TIMEOUT_S, LimitedTask, ProbeResult, probe, standin_spec

__all__ = ["CONTEXT_RESERVE_BYTES", "GIB", "HEADROOM", "MAX_AUTO_TRIALS", "MIB", "PROBE_STEPS", "PROBE_TIMEOUT_S",
           "RAY_RESOURCE_STEP", "LimitedTask", "ProbeResult", "auto_fraction", "check_packing", "fraction_for", "gib",
           "memory_worst_config", "packed_per_gpu", "plan_gpu", "probe", "standin_spec",
           "trials_per_gpu"]

_logger = logging.getLogger(__name__)


def plan_gpu(job: Any, pipeline: dict, space: Any, studies: Sequence[str | None],
             probe_fn: Callable[..., ProbeResult] = probe, log: Callable[[str], None] | None = None) -> float:
    """The GPU fraction each trial of a search asks Ray for, after a memory check (before Ray starts).

    ``resources.gpu: 0`` -> 0 without a dry run. Otherwise one trial per study is dry-run at the space's
    :func:`memory_worst_config`; a fixed fraction is checked (:func:`check_packing`) and ``auto`` is resolved
    (:func:`auto_fraction`).

    Args:
        job: The :class:`mlfd.search.JobSpec`.
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


