"""Enforced GPU memory per trial, and the one retry of a trial that runs out of it.

Ray's fractional GPUs are labels: a trial with ``gpu: 0.25`` may take the whole GPU and starve the trials packed next
to it. So a trial of ``mlfd tune`` on a CUDA device caps its own caching allocator at its share
(:func:`apply_memory_cap`, ``torch.cuda.set_per_process_memory_fraction``): an allocation beyond the cap raises
``torch.OutOfMemoryError`` in that trial alone, while its neighbours keep their memory.

The cap is the trial's fraction of the GPU less :data:`~mlfd.tune.packing.CONTEXT_RESERVE_BYTES` (512 MiB): the CUDA
context, cuBLAS/cuDNN workspaces and kernel images of a process live outside the allocator and outside its cap, so
``k`` trials of ``1/k`` each, capped at ``1/k`` of the memory, could together still ask for more than the GPU has. The
packing check (:mod:`mlfd.tune.packing`) admits a fraction only when one trial's measured peak plus that reserve fits
in it, so a trial that fit in the dry run fits under its cap. The reserve is never more than half the share (a tiny
fraction of a small GPU keeps half of its share for the allocator). Whole GPUs (``gpu >= 1``) and CPU trials set no cap.

A trial that runs out of memory while it trains (its upstream built, its own task running) is retried once, in the
same trial process, with a smaller batch and gradient accumulation over the same effective batch
(:func:`micro_batch`): half the batch and twice the accumulation steps when the batch is even. What the first attempt
held is freed first (:func:`free_memory`). The retry's recipe is part of the trial's artifact key
(:func:`mlfd.stages.trial.micro_batched`): micro-batches give close to, not exactly, the full batch's weights
(BatchNorm sees the micro-batches; see :func:`mlfd.engine.fit`). A second out-of-memory fails the trial alone, with
one line saying so.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from mlfd.tune.packing.arithmetic import CONTEXT_RESERVE_BYTES, gib

_logger = logging.getLogger(__name__)

MAX_SPLIT = 8
"""The largest number of micro-batches a batch is split into to keep its effective size exact (see
:func:`micro_batch`)."""
MIN_MICRO_BATCH = 2
"""The smallest micro-batch of a retry: BatchNorm cannot normalize one sample in training mode."""


def memory_cap(fraction: float, total_bytes: int, reserve_bytes: int = CONTEXT_RESERVE_BYTES) -> float | None:
    """The fraction of the GPU's memory a trial's allocator may hold, for a trial of ``fraction`` of a GPU.

    Args:
        fraction: The trial's GPU fraction (``resources.gpu``, or ``auto`` resolved by packing).
        total_bytes: The GPU's total memory.
        reserve_bytes: Per-process memory outside the allocator (CUDA context, workspaces), subtracted from the share.

    Returns:
        ``fraction - reserve_bytes / total_bytes``, at least ``fraction / 2``; None (no cap) for ``fraction <= 0``
        (a CPU trial) or ``fraction >= 1`` (whole GPUs).
    """
    if total_bytes <= 0 or reserve_bytes < 0:
        raise ValueError(f"memory_cap: need total_bytes > 0 and reserve_bytes >= 0, got {total_bytes}, {reserve_bytes}")
    if fraction <= 0 or fraction >= 1:
        return None
    return max(fraction - reserve_bytes / total_bytes, fraction / 2)


def apply_memory_cap(fraction: float, device: torch.device) -> float | None:
    """Cap this process's CUDA caching allocator on ``device`` at :func:`memory_cap` of its GPU; returns the cap
    (None: not a CUDA device, or a whole GPU)."""
    if device.type != "cuda" or not 0 < fraction < 1:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    cap = memory_cap(fraction, total)
    torch.cuda.set_per_process_memory_fraction(cap, index)
    _logger.info("trial memory cap: %.4f of cuda:%d (%s GiB of %s GiB) for gpu %g", cap, index, gib(cap * total),
                 gib(total), fraction)
    return cap


@dataclass(frozen=True)
class MicroBatch:
    """The recipe change of an out-of-memory retry: ``batch_size`` samples per micro-batch, ``grad_accum`` of them
    per optimizer step, for a recipe of ``batch`` x ``accum`` before."""

    batch_size: int
    grad_accum: int
    batch: int
    """The batch size before the retry."""
    accum: int
    """The accumulation steps before the retry."""

    @property
    def split(self) -> int:
        """Micro-batches per batch of before."""
        return self.grad_accum // self.accum

    @property
    def effective(self) -> int:
        """Samples per optimizer step after the retry (before: ``batch * accum``)."""
        return self.batch_size * self.grad_accum

    def describe(self) -> str:
        """``batch 128 -> micro-batch 64 x 2 accumulation steps (effective batch 128, as before)``."""
        same = self.effective == self.batch * self.accum
        return (f"batch {self.batch} -> micro-batch {self.batch_size} x {self.grad_accum} accumulation steps "
                f"(effective batch {self.effective}{', as before' if same else f', was {self.batch * self.accum}'})")


def micro_batch(batch_size: int, grad_accum: int = 1) -> MicroBatch | None:
    """The smaller batch and longer accumulation of an out-of-memory retry, over the same effective batch.

    The batch is split into ``k`` equal micro-batches, ``k`` the smallest divisor of ``batch_size`` from 2 to
    :data:`MAX_SPLIT` that leaves at least :data:`MIN_MICRO_BATCH` samples: an even batch is halved (128 -> 64 x 2),
    129 -> 43 x 3, 125 -> 25 x 5. A batch with no such divisor (a prime like 127, or 11 x 13) is halved rounding up
    (127 -> 64 x 2: effective batch 128, one sample more; :meth:`MicroBatch.describe` says so). Accumulation steps
    multiply: ``grad_accum * k``.

    Returns:
        The :class:`MicroBatch`, or None when the batch is too small to split (under ``2 * MIN_MICRO_BATCH``).
    """
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch: need batch_size >= 1 and grad_accum >= 1, got {batch_size}, {grad_accum}")
    if batch_size < 2 * MIN_MICRO_BATCH:
        return None
    for k in range(2, MAX_SPLIT + 1):
        if batch_size % k == 0 and batch_size // k >= MIN_MICRO_BATCH:
            return MicroBatch(batch_size // k, grad_accum * k, batch_size, grad_accum)
    return MicroBatch(-(-batch_size // 2), grad_accum * 2, batch_size, grad_accum)


def free_memory() -> None:
    """Return what a finished (or failed) attempt held: collect its objects, release the allocator's cached blocks.

    Call it outside the ``except`` block that caught the attempt's error: the error's traceback keeps the attempt's
    frames (model, optimizer, batches) alive until the block ends.
    """
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


__all__ = ["MAX_SPLIT", "MIN_MICRO_BATCH", "MicroBatch", "apply_memory_cap", "free_memory", "memory_cap",
           "micro_batch"]
