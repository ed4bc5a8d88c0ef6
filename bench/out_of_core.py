"""Memory of the feature cache as the data grows 1x, 4x and 16x: cache build and one joint-teacher (T*) epoch, with
the caches read out of core or whole in memory.

Data: two datasets drawn from Fashion-MNIST (offline), ``base x scale`` train images each and a quarter of that for
val and for test, so every cache grows with the scale. Teachers: the offline default's test_resnet and
test_efficientnet as randomly initialised stand-ins (cost and shapes do not depend on weights), fusion level 4. Each
configuration runs in a fresh subprocess, so its peak RSS (``ru_maxrss``; on a GPU also the CUDA allocator's peak) is
its own:

* ``build``: :func:`mlfd.stages.cache.build_cache` of every (teacher, dataset) pair at 32 px (4x4 maps), record
  batches written as they are extracted (extraction batches of 64, so that even 1x fills them);
* ``collect`` (the yardstick for the build): the same extraction holding each split's features in memory before
  writing, as mlfd did before;
* ``joint/out_of_core`` and ``joint/in_memory``: one epoch of the real :class:`mlfd.stages.joint.JointTask` and its
  val evaluation with ``joint.cache_on_device`` false / true. Its caches have the teachers' real level-4 shapes at
  64 px (8x8 maps, 6 KiB + 4 KiB float16 per image) and ``--joint-base`` images at 1x (5x ``--base``), but random
  values, written by the streaming writer (``synth``): extracting them would cost the CPU minutes per scale and
  changes nothing a T* epoch's memory or speed depends on.

Targets (design.md section 6, issue 11): out of core, peak memory grows <= 1.2x from 1x to 16x while the cache grows
16x; out-of-core T* throughput >= 0.7x the in-memory path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import PIPELINE, emit, parse_args, setup, standin_context, table, tmpdir  # noqa: E402

SCALES = (1, 4, 16)
MEMORY_TARGET = 1.2
THROUGHPUT_TARGET = 0.7
LEVEL = 4
EXTRACT_BATCH = 64
MIB = 2**20


def bench_spec(scale: int, base: int, on_device: bool, input_size: int = 32):
    """Two Fashion-MNIST datasets of ``base * scale`` train images (val, test: a quarter each), level 4."""
    from mlfd.config import PipelineSpec, from_dict, load_pipeline, to_dict

    data = to_dict(load_pipeline(PIPELINE))
    n = base * scale
    data["datasets"] = [{"name": name, "source": "fashion_mnist", "max_train": n, "max_val": n // 4,
                         "max_test": n // 4, "model": {"arch": arch, "input_size": input_size}}
                        for name, arch in (("fa", "test_resnet"), ("fb", "test_efficientnet"))]
    data["fusion_levels"] = [LEVEL]
    data["joint"]["recipe"].update(epochs=1, batch_size=256)
    data["joint"]["cache_on_device"] = on_device
    return from_dict(PipelineSpec, data, path="bench pipeline")


def synth(ctx, plan) -> float:
    """Stand-in teacher artifacts and caches of the teachers' level shapes with random float16 values, written by
    :class:`mlfd.store.FeatureWriter` under the keys :func:`mlfd.stages.cache.build_cache` looks up; returns MiB."""
    import numpy as np

    from mlfd.models import LevelModel, create_model
    from mlfd.stages.cache import KIND, cache_key
    from mlfd.stages.common import SPLITS, save_module, write_metrics
    from mlfd.stages.teachers import KIND as TEACHER, teacher_key
    from mlfd.store import FeatureWriter

    rng = np.random.default_rng(0)
    shapes = {}
    for t in plan.teachers:
        m = ctx.spec.dataset(t).model
        net = LevelModel(create_model(m, ctx.data(t).num_classes), m.input_size)
        shapes[t] = net.level_shapes()[plan.level]

        def teacher(tmp: Path, net=net, t=t) -> dict:
            save_module(net.model, tmp / "model.pt")
            write_metrics(tmp, role="dataset_specific", dataset=t, val={}, test={}, best_epoch=0, epochs=0, seed=0)
            return {"dataset": t, "synthetic": True}

        ctx.store.get_or_build(TEACHER, teacher_key(ctx, t), teacher)
    total = 0
    for t in plan.teachers:
        for d in plan.datasets:
            def build(tmp: Path, t=t, d=d) -> dict:
                for split in SPLITS:
                    n = len(getattr(ctx.data(d), split))
                    with FeatureWriter(tmp / f"{split}.arrow") as w:
                        for s in range(0, n, 4096):
                            w.write(rng.standard_normal((min(4096, n - s), *shapes[t]), dtype=np.float32))
                return {"synthetic": True}

            art = ctx.store.get_or_build(KIND, cache_key(ctx, t, d, plan.level), build)
            total += sum(f.stat().st_size for f in art.path.glob("*.arrow"))
    return total / MIB


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _collect(ctx, plan) -> int:
    """The extraction of build_cache with each split's features held in memory (the old way); returns their bytes."""
    from mlfd.data import make_loader
    from mlfd.engine import autocast
    from mlfd.stages.common import EVAL_BATCH, SPLITS, load_frozen
    from mlfd.stages.teachers import train_teacher

    held = peak = 0
    for t in plan.teachers:
        net = load_frozen(train_teacher(ctx, t), ctx.spec.dataset(t).model, ctx.data(t).num_classes, ctx.device)
        tf = ctx.transform(ctx.data(t), ctx.spec.dataset(t).model, None)
        for d in plan.datasets:
            for split in SPLITS:
                s = getattr(ctx.data(d), split)
                chunks = []
                with torch.inference_mode():
                    for _, x, _ in make_loader(s.images, s.labels, EVAL_BATCH, False, 0, ctx.device):
                        with autocast(ctx.device, ctx.dtype(ctx.spec.teacher)):
                            chunks.append(net.forward_level(tf(x, train=False), plan.level).float().cpu())
                arr = torch.cat(chunks).half().numpy()
                held += arr.nbytes  # what the old build held at its peak: one split (plus its float32 chunks)
                del chunks, arr
                peak, held = max(peak, held), 0
    return peak


def child(mode: str, scale: int, base: int, store: Path, device: torch.device) -> dict:
    """One configuration, measured in this (fresh) process."""
    from mlfd.engine import fit
    from mlfd.stages import cache as cache_mod
    from mlfd.stages.cache import build_cache
    from mlfd.stages.joint import JointTask, plan_for
    from mlfd.stages.teachers import train_teacher

    joint = mode.startswith("joint") or mode == "synth"
    from mlfd.stages import common, joint as joint_mod

    for m in (cache_mod, common, joint_mod):  # every batch full at 1x too: batch activations do not grow with scale
        m.EVAL_BATCH = EXTRACT_BATCH
    spec = bench_spec(scale, base, mode == "joint/in_memory", 64 if joint else 32)
    ctx = standin_context(spec, "joint", store, device)
    plan = plan_for(ctx, LEVEL)
    for d in plan.datasets:
        ctx.data(d)
    if mode == "synth":
        return {"mode": mode, "scale": scale, "cache_mib": synth(ctx, plan)}
    for t in plan.teachers:  # stand-ins: loaded and evaluated once, before anything is measured
        train_teacher(ctx, t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_rss = _rss_now()
    out: dict = {"mode": mode, "scale": scale}
    t0 = time.perf_counter()
    if mode == "build":
        arts = [build_cache(ctx, t, d, LEVEL) for t in plan.teachers for d in plan.datasets]
        out["cache_mib"] = sum(f.stat().st_size for a in arts for f in a.path.glob("*.arrow")) / MIB
    elif mode == "collect":
        out["held_mib"] = _collect(ctx, plan) / MIB
    else:
        task = JointTask(ctx, plan)
        assert task.feats.on_device is (mode == "joint/in_memory"), task.feats.placement
        res = fit(task, task.recipe, device, progress=False)
        out["epoch_s"] = res.history[-1]["train/time_s"]
        out["samples_per_s"] = task.ds_id.numel() / out["epoch_s"]
        out["cache_mib"] = task.feats.placement["cache_bytes"] / MIB
    out["seconds"] = time.perf_counter() - t0
    out["start_rss_mib"] = start_rss / MIB
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return out


def run_child(mode: str, scale: int, base: int, store: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--scale", str(scale), "--base", str(base),
           "--store", str(store), "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} x{scale} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(rows: list[dict], mode: str, key: str) -> float:
    by = {r["scale"]: r[key] for r in rows if r["mode"] == mode}
    return by[max(by)] / by[min(by)]


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--base", type=int, default=None,
                   help="train images per dataset at 1x for the build (default 200 with --quick, 1000)")
    p.add_argument("--joint-base", type=int, default=None, help="... for the T* epoch (default 5x --base)")
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(__doc__, argv, _extra)
    device = setup(args)
    base = args.base or (200 if args.quick else 1000)
    joint_base = args.joint_base or 5 * base
    if args.child:
        print(json.dumps(child(args.child, args.scale, base, Path(args.store), device)), flush=True)
        return None
    rows = []
    with tmpdir("out_of_core") as tmp:
        for s in SCALES:
            for mode in ("build", "collect", "synth", "joint/out_of_core", "joint/in_memory"):
                print(f"out_of_core: {s}x {mode} ...", flush=True)
                joint = mode.startswith("joint") or mode == "synth"
                store = Path(tmp) / (f"joint-x{s}" if joint else f"build-x{s}")
                rows.append(run_child(mode, s, joint_base if joint else base, store, args))
            shutil.rmtree(Path(tmp) / f"joint-x{s}", ignore_errors=True)
    cols = ["mode", "scale", "cache_mib", "held_mib", "peak_rss_mib", "start_rss_mib", "seconds", "epoch_s",
            "samples_per_s"] + (["peak_gpu_mib"] if device.type == "cuda" else [])
    print(table([{c: r.get(c, "") for c in cols} for r in rows], cols))
    cache_growth = ratio(rows, "build", "cache_mib")
    joint_growth = ratio(rows, "synth", "cache_mib")
    mem = {m: ratio(rows, m, "peak_rss_mib") for m in ("build", "collect", "joint/out_of_core", "joint/in_memory")}
    speed = {r["scale"]: r["samples_per_s"] for r in rows if r["mode"] == "joint/out_of_core"}
    speed = {s: v / next(r["samples_per_s"] for r in rows if r["mode"] == "joint/in_memory" and r["scale"] == s)
             for s, v in speed.items()}
    result = {"rows": rows, "base_train_per_dataset": base, "joint_base_train_per_dataset": joint_base,
              "cache_growth": cache_growth, "joint_cache_growth": joint_growth, "peak_rss_growth": mem,
              "throughput_ratio_by_scale": speed, "ratio": mem["joint/out_of_core"],
              "targets": {"peak_growth_max": MEMORY_TARGET, "throughput_min": THROUGHPUT_TARGET}}
    if device.type == "cuda":
        result["peak_gpu_growth"] = {m: ratio(rows, m, "peak_gpu_mib") for m in mem}
    worst_speed = min(speed.values())
    ok_mem = max(mem["build"], mem["joint/out_of_core"]) <= MEMORY_TARGET
    big = max(r["cache_mib"] for r in rows if r["mode"] == "synth")
    summary = (f"from 1x to 16x the build's cache grows {cache_growth:.1f}x and its peak RSS {mem['build']:.2f}x "
               f"(streamed; {mem['collect']:.2f}x holding each split); the T* caches grow {joint_growth:.1f}x (to "
               f"{big:.0f} MiB) and an epoch's peak RSS {mem['joint/out_of_core']:.2f}x out of core vs "
               f"{mem['joint/in_memory']:.2f}x in memory [target <= {MEMORY_TARGET}x: "
               f"{'met' if ok_mem else 'NOT met'}]; out-of-core T* throughput {worst_speed:.2f}x in-memory at worst "
               f"[target >= {THROUGHPUT_TARGET}x: {'met' if worst_speed >= THROUGHPUT_TARGET else 'NOT met'}]; "
               f"{device.type}")
    return emit("out_of_core", args, device, result, summary)


if __name__ == "__main__":
    main()
