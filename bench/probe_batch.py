"""How far a plan's speed at ``--probe-batch`` is from the speed at the recipe's batch.

``mlfd plan --probe-batch N`` times a trained stage at batch N and takes its images/s for the whole stage. This
benchmark measures, for the architectures of the paper's T1 (ResNet-18, EfficientNet-B0, SEResNeXt-26D at 224 px,
plain timm + torch training steps, :class:`bench.common.RawLoop`), the images/s at the probe batch and at a larger
batch, and prints their ratio: above 1 the plan's time for that stage is too short, below 1 too long.

    python bench/probe_batch.py --quick     # CPU: probe batch 32 against 128 (the paper's batches do not fit a CPU step)
    python bench/probe_batch.py             # GPU: probe batch 32 against Table 1's batches (768, 240, 192)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, parse_args, raw_throughput, setup, table  # noqa: E402
from mlfd.config import RecipeSpec  # noqa: E402

# (arch, Table 1's batch size) of the paper's T1 teachers and students
T1 = [("resnet18", 768), ("efficientnet_b0", 240), ("seresnext26d_32x4d", 192)]
PX = 224
CLASSES = 100


def main(argv: list[str] | None = None) -> dict:
    def extra(p) -> None:
        p.add_argument("--probe", type=int, default=32, help="the probe batch (default 32)")
        p.add_argument("--full", type=int, default=None,
                       help="the batch to compare with (default: 128 with --quick, else each arch's Table 1 batch)")

    args = parse_args(__doc__, argv, extra=extra)
    device = setup(args)
    recipe = RecipeSpec(optimizer="adam", lr=1e-4, weight_decay=1e-3)
    archs = T1[:2] if args.quick else T1
    steps, warmup = (2, 1) if args.quick else (10, 3)
    rows = []
    for arch, paper_batch in archs:
        full = args.full or (128 if args.quick else paper_batch)
        probe = raw_throughput(arch, PX, args.probe, CLASSES, device, recipe, steps=steps, warmup=warmup)
        whole = raw_throughput(arch, PX, full, CLASSES, device, recipe, steps=steps, warmup=warmup)
        rows.append({"arch": arch, "probe_batch": args.probe, "batch": full, "probe_img_s": round(probe, 2),
                     "img_s": round(whole, 2), "probe_over_full": round(probe / whole, 3)})
        print(f"case {arch}: {probe:.1f} img/s at batch {args.probe}, {whole:.1f} at {full}", flush=True)
    print(table(rows))
    summary = ", ".join(f"{r['arch']} {r['probe_over_full']:.2f}x" for r in rows)
    return emit("probe_batch", args, device, {"rows": rows},
                f"img/s at batch {args.probe} over img/s at the larger batch: {summary}")


if __name__ == "__main__":
    main()
