"""Joint-teacher (T*) epoch time on the feature cache against through the frozen teachers.

Cached: the real JointTask of mlfd.stages.joint (mixed batches over the union of the datasets, one head per dataset)
reading float16 features from the cache, trained by mlfd.engine.fit; a whole epoch is timed (the second, after
warm-up). Through the teachers: the same task and T*, but each step's features come from the frozen teachers run on
the batch's images (each teacher's own input size and normalization, inference mode, the recipe's autocast): what
every epoch would cost without the cache. It is timed over a few steps and scaled to the epoch's step count.
Also printed: the one-off cost of building the cache, and after how many epochs it has paid for itself.

The teachers are randomly initialised stand-ins (cost does not depend on their weights). On a GPU: ResNet-18,
EfficientNet-B0 and SEResNeXt-26D at 224 px (level 1, the authors' setting), T* batch 256 (the default recipe) and
2048. On a CPU (--quick): the offline default's small teachers at 32 px, level 2.

Target (design.md section 6): cached >= 100x faster per epoch on a GPU.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit, load_spec, parse_args, setup, standin_context, table, timed, tmpdir  # noqa: E402
from mlfd.engine import fit  # noqa: E402
from mlfd.stages.joint import JointTask  # noqa: E402

TARGET = 100.0


def settings(quick: bool, device: torch.device) -> dict:
    if device.type == "cuda":
        models = {"mnist": "resnet18", "fashion": "efficientnet_b0", "digits": "seresnext26d_32x4d"}
        return {"overrides": [f"datasets.{d}.model={{arch: {a}, input_size: 224}}" for d, a in models.items()]
                + ["datasets.fashion.max_train=10000", "fusion_levels=[1]"],
                "batches": [256, 2048], "through_steps": 6, "label": "3 teachers at 224 px, level 1"}
    return {"overrides": ["fusion_levels=[2]"], "batches": [64], "through_steps": 3,
            "label": "offline default teachers at 32 px, level 2"}


class ThroughTeachers(JointTask):
    """The same T* and batches as :class:`JointTask`, with features computed by the frozen teachers every step."""

    def __init__(self, ctx, plan):
        from mlfd.stages.common import load_frozen
        from mlfd.stages.teachers import train_teacher

        super().__init__(ctx, plan)
        self.teachers = []
        for t in plan.teachers:
            t_spec, t_data = ctx.spec.dataset(t), ctx.data(t)
            net = load_frozen(train_teacher(ctx, t), t_spec.model, t_data.num_classes, ctx.device)
            self.teachers.append((net, ctx.transform(t_data, t_spec.model, None)))
        self.images = {(d, s): getattr(ctx.data(d), s).images.to(ctx.device) for d in plan.datasets
                       for s in ("train", "val")}

    def _inputs(self, d: str, split: str, idx: torch.Tensor) -> list[torch.Tensor]:
        x = self.images[d, split][idx.to(self.ctx.device)]
        with torch.no_grad():
            return [net.forward_level(tf(x, train=False), self.plan.level).float() for net, tf in self.teachers]


def epoch_seconds(task, recipe, device: torch.device, steps: int | None) -> float:
    """Seconds of one training epoch of ``task`` (the second of two; ``steps``: time that many and scale up)."""
    from mlfd.tune.packing import LimitedTask

    full = task.steps_per_epoch()
    run = LimitedTask(task, steps) if steps else task
    res = fit(run, dataclasses.replace(recipe, epochs=2), device, progress=False)
    return res.history[-1]["train/time_s"] * full / run.steps_per_epoch()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    device = setup(args)
    cfg = settings(args.quick, device)
    spec = load_spec(args.quick, cfg["overrides"])
    rows = []
    with tmpdir("cache") as tmp:
        ctx = standin_context(spec, "joint", Path(tmp), device)
        from mlfd.stages.cache import build_cache
        from mlfd.stages.joint import plan_for

        plan = plan_for(ctx, ctx.spec.fusion_levels[0])
        for t in plan.teachers:  # stand-in teachers "trained" (loaded) before the cache is timed
            from mlfd.stages.teachers import train_teacher

            train_teacher(ctx, t)
        _, cache_s = timed(lambda: [build_cache(ctx, t, d, plan.level) for t in plan.teachers for d in plan.datasets])
        base = ctx.spec.joint.recipe
        through = ThroughTeachers(ctx, dataclasses.replace(plan))
        samples = through.ds_id.numel()
        for bs in cfg["batches"]:
            recipe = dataclasses.replace(base, batch_size=bs)
            through.recipe = recipe
            print(f"cache: T* batch {bs}: through the teachers ...", flush=True)
            t_through = epoch_seconds(through, recipe, device, cfg["through_steps"])
            cached = JointTask(ctx, plan)
            cached.recipe = recipe
            print(f"cache: T* batch {bs}: on the cache ...", flush=True)
            t_cached = epoch_seconds(cached, recipe, device, None)
            rows.append({"joint_batch": bs, "samples_per_epoch": samples, "through_teachers_epoch_s": t_through,
                         "cached_epoch_s": t_cached, "speedup": t_through / t_cached,
                         "cached_img_s": samples / t_cached, "through_img_s": samples / t_through,
                         "cache_build_s": cache_s,
                         "break_even_epochs": cache_s / max(t_through - t_cached, 1e-9)})
            del cached
    print(table(rows, ["joint_batch", "samples_per_epoch", "through_teachers_epoch_s", "cached_epoch_s", "speedup",
                       "cache_build_s", "break_even_epochs"]))
    best = max(rows, key=lambda r: r["speedup"])
    first = rows[0]
    where = "GPU" if device.type == "cuda" else "CPU (the target is for a GPU)"
    summary = (f"T* epoch on the cache is {first['speedup']:.0f}x faster than through the frozen teachers at batch "
               f"{first['joint_batch']}" + (f", {best['speedup']:.0f}x at batch {best['joint_batch']}"
                                             if best is not first else "")
               + f" ({cfg['label']}; target >= {TARGET:.0f}x on a GPU); cache built once in {cache_s:.1f} s; {where}")
    return emit("cache", args, device, {"rows": rows, "ratio": first["speedup"], "target": TARGET,
                                         "setting": cfg["label"]}, summary)


if __name__ == "__main__":
    main()
