"""Feature cache: frozen-teacher features per (teacher, dataset, split, level), extracted once into Arrow files.

Extraction streams: each batch of features is written as one Arrow record batch as soon as it is computed, so host
memory holds one batch, not a split. Readers either copy a cache whole to the training device (:func:`load_cache`)
or read it out of core (:class:`mlfd.store.FeatureFile`: rows gathered by positioned reads at the offsets of the
memory-mapped record batches, batches prefetched by :class:`Prefetcher`); :func:`place_caches` decides which for
``joint.cache_on_device``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from mlfd.data import make_loader
from mlfd.engine import autocast
from mlfd.stages.common import EVAL_BATCH, SPLITS, Context, dataset_key_spec, load_frozen
from mlfd.stages.teachers import teacher_key, train_teacher
from mlfd.store import Artifact, ArtifactStore, FeatureFile, FeatureWriter, features_to_torch

KIND = "features"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_logger = logging.getLogger(__name__)


def cache_key(ctx: Context, teacher: str, data: str, level: int) -> str:
    return ArtifactStore.key(KIND, {"data": dataset_key_spec(ctx.spec.dataset(data)), "level": level,
                                    "dtype": ctx.spec.joint.cache_dtype}, {"teacher": teacher_key(ctx, teacher)})


def build_cache(ctx: Context, teacher: str, data: str, level: int) -> Artifact:
    """Features at ``level`` of the frozen teacher of dataset ``teacher`` over every split of dataset ``data``.

    Images are un-augmented and preprocessed the teacher's way (its input size, its dataset's normalization). Each
    batch is written to its split's file as it comes out of the teacher (:class:`mlfd.store.FeatureWriter`), in
    ``joint.cache_dtype``; a float16 overflow stops the build with an error naming the teacher and the level.
    """
    t_art = train_teacher(ctx, teacher)
    dtype_name = ctx.spec.joint.cache_dtype

    def build(tmp: Path) -> dict:
        t_spec = ctx.spec.dataset(teacher)
        t_data = ctx.data(teacher)
        ds = ctx.data(data)
        net = load_frozen(t_art, t_spec.model, t_data.num_classes, ctx.device)
        net.check_levels([level], f"fusion level for datasets[{teacher}].model")
        tf = ctx.transform(t_data, t_spec.model, None)  # teacher's own input convention
        dtype = ctx.dtype(ctx.spec.teacher)
        meta, peak = {}, 0
        with torch.inference_mode():
            for split in SPLITS:
                s = getattr(ds, split)
                label = f"features of teacher {teacher} at level {level} on {data}/{split}"
                with FeatureWriter(tmp / f"{split}.arrow", dtype_name, {"teacher": teacher, "data": data,
                                                                        "level": level, "split": split}, label) as w:
                    for _, x, _ in make_loader(s.images, s.labels, EVAL_BATCH, False, 0, ctx.device):
                        with autocast(ctx.device, dtype):
                            w.write(net.forward_level(tf(x, train=False), level).float().cpu())
                    meta[split] = w.close()
                peak = max(peak, w.max_batch_bytes)
        row = meta["train"]["shape"][1:]
        return {"teacher": teacher, "data": data, "level": level, "shape": row, "dtype": dtype_name,
                "bytes_per_image": int(np.prod(row)) * (4 if dtype_name == "float32" else 2),
                "max_batch_bytes": peak}

    return ctx.store.get_or_build(KIND, cache_key(ctx, teacher, data, level), build)


def open_cache(art: Artifact, split: str, verify: bool = True) -> FeatureFile:
    """A cached split opened out of core (memory-mapped record batches; nothing read yet, beyond ``verify``)."""
    return FeatureFile(art.file(f"{split}.arrow"), verify=verify)


def resident(f: FeatureFile, device: torch.device) -> torch.Tensor:
    """The whole of ``f`` as a tensor of its storage type on ``device``: a copy (in RAM on a CPU)."""
    arr = f.array()
    t = features_to_torch(arr, f.dtype)
    out = t.to(device) if device.type != "cpu" else (t if arr.flags.writeable else t.clone())
    f.release()
    return out


def load_cache(art: Artifact, split: str, device: torch.device, verify: bool = True) -> torch.Tensor:
    """A cached split whole on ``device``, in its storage type (float16 unless ``joint.cache_dtype`` says else)."""
    return resident(open_cache(art, split, verify), device)


# --------------------------------------------------------------------------------------------------------------------
# Where the caches live while a stage reads them
# --------------------------------------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> int:
    """Free bytes of ``device``: the CUDA driver's free memory, or the host's MemAvailable on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * _PAGE)


def place_caches(setting: Any, nbytes: int, device: torch.device, fraction: float, what: str) -> dict:
    """Decide ``joint.cache_on_device``: whole on ``device`` or out of core, for caches of ``nbytes`` in all.

    Returns what was decided and why (logged, and written into the stage's metrics and artifact metadata):
    ``on_device``, ``setting``, ``cache_bytes``, and for ``auto`` ``free_bytes`` and ``budget_bytes``.
    """
    out: dict[str, Any] = {"setting": setting, "cache_bytes": int(nbytes)}
    if setting == "auto":
        free = free_memory(device)
        budget = int(free * fraction)
        out.update(on_device=nbytes <= budget, free_bytes=free, budget_bytes=budget)
        why = (f"{nbytes / 2**20:.1f} MiB of cache {'<=' if out['on_device'] else '>'} {fraction:g} x "
               f"{free / 2**20:.0f} MiB free on {device.type}")
    else:
        out["on_device"] = bool(setting)
        why = f"joint.cache_on_device: {str(setting).lower()}"
    # DEBUG: one line per stage that reads caches (26 in a smoke run); `mlfd run -v` shows them
    _logger.debug("%s: feature caches %s (%s)", what, "whole on the device" if out["on_device"] else "out of core", why)
    return out


class Prefetcher:
    """Run ``make(item)`` for each item of ``items`` in a background thread, ``depth`` items ahead of the consumer.

    ``make`` does the host-side work of a step (gathering rows from memory maps) and starts the copies to the device;
    on CUDA those go through pinned memory on a side stream, and the consumer's stream waits on each item's event, so
    the copy of step i+1 overlaps the compute of step i. Items come out in order; an exception in ``make`` re-raises
    in the consumer; stopping early (``close()`` on the iterator, an exception in the consumer) stops the thread.
    """

    def __init__(self, items: Iterable, make: Callable[[Any], Any], device: torch.device, depth: int = 2):
        self.items, self.make, self.device, self.depth = items, make, device, depth

    def __iter__(self) -> Iterator:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        end = object()

        def put(obj) -> bool:
            while not stop.is_set():
                try:
                    q.put(obj, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for item in self.items:
                    if cuda:
                        # what ``items`` produced on the default stream (a loader's indices) is ready before reading it
                        stream.wait_stream(torch.cuda.default_stream(self.device))
                        with torch.cuda.stream(stream):
                            out = self.make(item)
                            event = torch.cuda.Event()
                            event.record(stream)
                    else:
                        out, event = self.make(item), None
                    if not put((out, event, None)):
                        return
                put((end, None, None))
            except BaseException as e:  # handed to the consumer
                put((None, None, e))

        thread = threading.Thread(target=work, name="mlfd-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                out, event, err = q.get()
                if err is not None:
                    raise err
                if out is end:
                    return
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in _tensors(out):
                        t.record_stream(current)
                yield out
        finally:
            stop.set()
            thread.join()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through pinned memory, without blocking, on CUDA; as is on a CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
