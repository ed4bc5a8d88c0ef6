"""Timing and memory of a stage's real task on a few batches: the measuring core of ``mlfd plan`` (what a pipeline
run costs) and ``mlfd tune --plan`` (what a search costs, :mod:`mlfd.tune.price`).

A *probe* is a stage context whose datasets are cut to a few batches (:class:`ProbeContext`, :func:`probe_data`) and
whose recipes train one epoch (:func:`probe_spec`), with untrained stand-in teachers in a throwaway store
(:func:`seed_teachers`), so that the stages' own code builds every upstream artifact in seconds. A stage's task is
then timed over a few optimizer steps (:func:`time_train_steps`) and an evaluation pass (:func:`time_eval`); its
peak memory is read with :class:`PeakMemory`.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from mlfd.config import DatasetSpec, PipelineSpec
from mlfd.data import DatasetSplits, ImageSet
from mlfd.engine import amp_dtype, autocast, build_optimizer
from mlfd.stages.common import Context, build_level_model, save_module
from mlfd.stages.teachers import KIND as TEACHER, teacher_key


def _probe_split(split: ImageSet, n: int) -> ImageSet:
    return split if len(split) <= n else split.subset(torch.arange(n))


def probe_data(data: DatasetSplits, n_train: int, n_eval: int) -> DatasetSplits:
    """The first ``n_train`` train and ``n_eval`` val/test images of a loaded dataset (same classes, statistics)."""
    return dataclasses.replace(data, train=_probe_split(data.train, n_train), val=_probe_split(data.val, n_eval),
                               test=_probe_split(data.test, n_eval))


def _vm(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the code run inside ``with``: on CUDA ``torch.cuda.max_memory_allocated`` above what was
    allocated at entry; on a CPU the growth of the process's peak resident set (``VmHWM``, reset at entry through
    ``/proc/self/clear_refs``). ``peak`` is None where neither can be read."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._base = device, None, 0

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "peak RSS growth (VmHWM, reset via /proc/self/clear_refs)"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()  # freed memory the allocator still holds would be reused without raising the resident set
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._base = _vm("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            hwm = _vm("VmHWM")
            self.peak = None if hwm is None or self._base is None else max(0, hwm - self._base)


class SavedBytes:
    """Bytes of the distinct tensors autograd saves for backward inside ``with``: the activation memory of a training
    step, counted from the tensors themselves (the same on every run, where a CPU's resident set depends on what the
    allocator kept from earlier work)."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self._seen[storage.data_ptr()] = storage.nbytes()  # alive until backward: no address is reused meanwhile
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_images(batch: Any) -> int:
    """Samples in one task batch: ``(x, y)``, ``(idx, x, y[, targets])``, a baseline's ``(dataset index, x, y)``, a
    list of such, or a joint teacher's ``(groups, inputs)`` whose groups are ``(dataset index, sample indices)``."""
    if isinstance(batch, list):
        return sum(batch_images(b) for b in batch)
    if isinstance(batch[0], list):  # JointTask: (groups, prefetched inputs or None)
        return sum(int(idx.numel()) for _, idx in batch[0])
    return int(next(t for t in batch if isinstance(t, torch.Tensor)).shape[0])  # skips a dataset index


def endless(task: Any) -> Iterator[Any]:
    """The task's training batches, epoch after epoch, without end."""
    epoch = 0
    while True:
        yield from task.train_batches(epoch)
        epoch += 1


def time_train_steps(task: Any, recipe: Any, device: torch.device, steps: int, warmup: int = 1) -> float:
    """Images per second of ``task``'s optimizer steps as ``fit`` runs them (autocast of the recipe, backward,
    optimizer step): samples per step over the median time of ``steps`` steps after ``warmup`` untimed ones (the
    median keeps one step slowed by a busy machine out of the figure; each step ends with a device sync)."""
    module = task.module
    module.train()
    opt = build_optimizer(module.parameters(), recipe)
    dtype = amp_dtype(device, recipe.amp)
    batches = endless(task)
    times, images = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        with autocast(device, dtype):
            loss = task.train_step(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            images.append(batch_images(batch))
    return statistics.median(images) / max(statistics.median(times), 1e-9)


def time_eval(task: Any, images: int, device: torch.device, recipe: Any) -> float:
    """Images per second of ``task.evaluate("val")`` over ``images`` val images (second of two passes)."""
    module = task.module
    module.eval()
    with torch.inference_mode(), autocast(device, amp_dtype(device, recipe.amp)):
        task.evaluate("val")
        sync(device)
        t0 = time.perf_counter()
        task.evaluate("val")
        sync(device)
    return images / max(time.perf_counter() - t0, 1e-9)


class ProbeContext(Context):
    """A stage context whose datasets are the probe's (cut or synthetic) splits."""

    probe: dict[str, DatasetSplits]

    def data(self, name: str) -> DatasetSplits:
        return self.probe[name]


def probe_spec(spec: PipelineSpec) -> PipelineSpec:
    """``spec`` with one epoch per recipe: what the probe trains where a stage needs a trained input (T*)."""
    s = copy.deepcopy(spec)
    for r in (s.teacher, s.joint.recipe, s.student.recipe, s.baselines.recipe):
        if r is not None:
            r.epochs = 1
    for d in s.datasets:  # per-dataset overrides of the epochs (a given teacher kept as is stays at 0)
        if d.teacher.get("epochs"):
            d.teacher["epochs"] = 1
        if (d.student.get("recipe") or {}).get("epochs"):
            d.student["recipe"]["epochs"] = 1
    return s


def seed_teachers(pctx: ProbeContext) -> None:
    """Untrained teachers in the probe store under their real keys: extraction and the stages downstream cost the same
    whatever the weights, and no teacher is trained."""
    for d in pctx.spec.datasets:
        spec = dataclasses.replace(d.model, checkpoint=None, pretrained=False)

        def build(tmp: Path, d: DatasetSpec = d, spec: Any = spec) -> dict:
            net = build_level_model(spec, pctx.data(d.name).num_classes, torch.device("cpu"), False)
            save_module(net.model, tmp / "model.pt")
            (tmp / "metrics.json").write_text("{}")
            return {"dataset": d.name, "arch": spec.arch, "probe": True}

        pctx.store.get_or_build(TEACHER, teacher_key(pctx, d.name), build)
