"""The arithmetic of packing: how many trial processes fit on a GPU, the fraction that makes Ray place N of them,
the checks of a fixed fraction and the choice of ``gpu: auto``, and the corner of a search space where a trial needs
the most memory (where the dry run measures)."""

from __future__ import annotations

import copy
import math
from typing import Any

from mlfd.errors import SpecError

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
