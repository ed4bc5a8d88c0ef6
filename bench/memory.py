"""Memory: peak per trial (RSS; on a GPU also the CUDA caching allocator's peaks) and feature-cache bytes per image.

1. Per trial: mlfd.tune.packing.probe dry-runs a student trial of the offline default pipeline in a child process
   (stand-in teachers, the real data resident on the device, two training steps and a val evaluation) and reports
   each phase's peak: a teacher's training (prebuilt with the same resources), the shared upstream build (cache,
   joint teacher, targets: paid by the first trial that needs it) and the trial itself. On a GPU it also says how
   many such trials fit on the GPU (the arithmetic `mlfd tune` uses for gpu: auto).
2. Cache bytes per image per level, float16, from LevelModel.level_shapes of the offline default's teachers at their
   input size (and, for scale, of the paper's backbones at 224 px), with the cache size of the whole pipeline
   (every teacher over every split of every dataset: m^2 (teacher, dataset) pairs).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit, load_spec, parse_args, setup, table  # noqa: E402

PAPER_BACKBONES = [("resnet18", 224), ("efficientnet_b0", 224), ("seresnext26d_32x4d", 224), ("convnextv2_tiny", 224)]
MIB = 2**20


def level_bytes(arch: str, input_size: int, num_classes: int = 10) -> dict[int, tuple[tuple[int, ...], int]]:
    """Level -> (per-image feature shape, float16 bytes per image) of a timm model at ``input_size``."""
    from mlfd.config import ModelSpec
    from mlfd.models import LevelModel, create_model

    net = LevelModel(create_model(ModelSpec(arch=arch, input_size=input_size), num_classes), input_size)
    return {lvl: (shape, 2 * math.prod(shape)) for lvl, shape in net.level_shapes().items()}


def cache_rows(spec) -> tuple[list[dict], dict[int, int]]:
    """Per teacher and level: shape and bytes/image; and per level the whole cache's bytes (all m^2 pairs)."""
    from mlfd.data import load_dataset

    images = sum(len(s) for d in spec.datasets for s in (lambda x: (x.train, x.val, x.test))(load_dataset(d)))
    rows, totals = [], {}
    for d in spec.datasets:
        for lvl, (shape, nbytes) in level_bytes(d.model.arch, d.model.input_size, load_dataset(d).num_classes).items():
            rows.append({"teacher": d.name, "arch": f"{d.model.arch}@{d.model.input_size}", "level": lvl,
                         "shape": "x".join(map(str, shape)), "bytes_per_image": nbytes})
            totals[lvl] = totals.get(lvl, 0) + nbytes * images  # this teacher over every image of every dataset
    return rows, totals


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    device = setup(args)
    from mlfd.tune.packing import probe, trials_per_gpu

    spec = load_spec(args.quick)
    studies = ["mnist"] if args.quick else [d.name for d in spec.datasets]
    print(f"memory: dry run of a student trial per study {studies} on {device} ...", flush=True)
    res = probe(spec, "students", studies, device.type, threads=torch.get_num_threads())
    trial_rows = []
    for phase, p in res.phases.items():
        row = {"phase": phase, "peak_rss_mib": p["peak_rss_bytes"] / MIB, "seconds": p["seconds"]}
        if device.type == "cuda":
            row.update(gpu_reserved_mib=p["peak_reserved_bytes"] / MIB,
                       gpu_allocated_mib=p["peak_allocated_bytes"] / MIB)
        trial_rows.append(row)
    print(table(trial_rows))
    rows, totals = cache_rows(load_spec(False))  # the full pipeline's datasets, whatever --quick
    print(table(rows))
    paper = []
    for arch, px in PAPER_BACKBONES:
        for lvl, (shape, nbytes) in level_bytes(arch, px, 1000).items():
            paper.append({"arch": f"{arch}@{px}", "level": lvl, "shape": "x".join(map(str, shape)),
                          "bytes_per_image": nbytes})
    print(table(paper))
    cache_mib = {lvl: b / MIB for lvl, b in totals.items()}
    print("whole cache of the pipeline per level (MiB): " + ", ".join(f"L{k}: {v:.1f}" for k, v in cache_mib.items()))
    result = {"trial_phases": trial_rows, "cache_levels": rows, "cache_total_mib_per_level": cache_mib,
              "paper_backbone_levels": paper, "studies": studies}
    if device.type == "cuda":
        peak = res.peak_bytes
        fit = trials_per_gpu(peak, res.total_bytes)
        result.update(gpu_peak_bytes=peak, gpu_total_bytes=res.total_bytes, trials_per_gpu=fit)
        summary = (f"a student trial peaks at {peak / MIB:.0f} MiB of GPU memory ({res.peak_phase}); {fit} fit on the "
                   f"{res.total_bytes / 2**30:.0f} GiB {res.device_name}; cache L1-L{max(cache_mib)}: "
                   + ", ".join(f"{v:.1f}" for v in cache_mib.values()) + " MiB")
    else:
        peak = max(r["peak_rss_mib"] for r in trial_rows)
        result.update(peak_rss_mib=peak)
        summary = (f"a student trial process peaks at {peak:.0f} MiB RSS on CPU ({res.peak_phase}); whole feature "
                   "cache of the pipeline per level: " + ", ".join(f"L{k} {v:.1f}" for k, v in cache_mib.items())
                   + " MiB (float16)")
    result["ratio"] = None
    return emit("memory", args, device, result, summary)


if __name__ == "__main__":
    main()
