"""A student trial's training throughput against plain timm+torch for the same model, resolution and batch.

Ours: a real StudentTask (cached joint-teacher targets, the uint8 dataset resident on the device, batched augmentation
there, Eq. (3) with feature adaptors) trained by mlfd.engine.fit, each epoch cut to N full batches; the epochs after
the first are timed (fit's train/time_s), so warm-up (cuDNN autotuning, lazy initialisation) is left out. Also timed:
the bare loop over the task's train_step (no fit bookkeeping), which splits a gap between fit and the task.
Raw: timm.create_model, the same optimizer, autocast dtype and memory format as the recipe gets on this device, random
tensors already on the device, cross-entropy (bench/common.py RawLoop). On CUDA the raw loop is timed with
torch.backends.cudnn.benchmark on (as timm's train.py and reference/gpu_ceilings.py) and off (the engine's setting).

The upstream (teachers, feature cache, joint teacher, its targets) is built from randomly initialised stand-in
teachers in a temporary store: throughput does not depend on the teachers' weights.

Target (design.md section 6): ratio >= 0.8 on a GPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (RawLoop, emit, load_spec, parse_args,  # noqa: E402
                          setup, standin_context, sync, table, timed, tmpdir)
from mlfd.engine import amp_dtype, autocast, build_optimizer, fit  # noqa: E402

TARGET = 0.8


@dataclasses.dataclass
class Case:
    """One measured configuration: the student of ``dataset`` as ``arch`` at ``px``, batch ``batch``."""

    dataset: str
    arch: str
    px: int
    batch: int
    steps: int
    """Full batches per timed epoch."""
    epochs: int = 2
    """Epochs of each fit call; all but the first are timed."""
    rounds: int = 3
    """Interleaved rounds of (fit, step loop, raw); each is reported by its best round (the least disturbed by other
    load, as timeit does) and its median."""

    @property
    def label(self) -> str:
        return f"{self.arch}@{self.px} bs{self.batch}"

    def overrides(self, quick: bool) -> list[str]:
        """Pipeline overrides: the student model, its batch, fusion level 2 (levels 1 and 2 distilled)."""
        out = [f"datasets.{self.dataset}.student_model={{arch: {self.arch}, input_size: {self.px}}}",
               f"student.recipe.batch_size={self.batch}", "fusion_levels=[2]"]
        if not quick:
            out.append(f"datasets.{self.dataset}.max_train=null")  # enough full batches on a GPU
        return out


def cases(quick: bool, device: torch.device) -> list[Case]:
    """What to measure: small on a CPU; on a GPU ResNet-18 at native 32 px and at the paper's 224 px."""
    if device.type == "cuda":
        return [Case("fashion", "resnet18", 32, 256, steps=60), Case("fashion", "resnet18", 224, 256, steps=25)]
    if quick:
        return [Case("mnist", "test_resnet", 32, 32, steps=8, rounds=5)]
    return [Case("fashion", "resnet18", 32, 128, steps=8)]


def img_per_s(history: list[dict], steps: int, batch: int) -> float:
    """Training img/s of fit's epochs after the first (median of their train/time_s)."""
    times = [h["train/time_s"] for h in history[1:]] or [history[0]["train/time_s"]]
    return steps * batch / statistics.median(times)


class StepLoop:
    """The task's own train_step + backward + optimizer step, without fit's bookkeeping (one epoch per call)."""

    def __init__(self, task, recipe, device: torch.device, steps: int):
        from mlfd.tune.packing import LimitedTask

        self.task, self.device, self.batch = task, device, recipe.batch_size
        self.limited = LimitedTask(task, steps)
        self.opt = build_optimizer(task.module.parameters(), recipe)
        self.dtype = amp_dtype(device, recipe.amp)
        self.epoch = 0

    def throughput(self) -> float:
        self.task.module.train()
        sync(self.device)

        def run() -> None:
            for batch in self.limited.train_batches(self.epoch):
                with autocast(self.device, self.dtype):
                    loss = self.task.train_step(batch)["loss"]
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            sync(self.device)

        _, dt = timed(run)
        self.epoch += 1
        return self.limited.steps * self.batch / dt


def measure(case: Case, quick: bool, device: torch.device) -> dict:
    """Ours (fit and bare step loop) and raw img/s for one case, interleaved over rounds, so a change of load on a
    shared machine hits all of them alike; each is reported by its best round (and its median)."""
    from mlfd.stages.joint import joint_targets, plan_for
    from mlfd.stages.students import StudentTask, student_variant
    from mlfd.tune.packing import LimitedTask

    spec = load_spec(quick, case.overrides(quick))
    cuda = device.type == "cuda"
    fit_rates, loop_rates, raw_rates, bench_rates = [], [], [], []
    with tmpdir("throughput") as tmp:
        ctx = standin_context(spec, "students", Path(tmp), device)
        plan = plan_for(ctx, ctx.spec.fusion_levels[0], case.dataset)
        _, upstream_s = timed(lambda: joint_targets(ctx, plan, case.dataset))
        task = StudentTask(ctx, case.dataset, plan, student_variant(ctx, None, case.dataset))
        recipe = dataclasses.replace(task.recipe, epochs=case.epochs)
        assert recipe.batch_size == case.batch, (recipe.batch_size, case.batch)
        full = len(task.ds.train) // case.batch
        if full < case.steps:
            raise SystemExit(f"{case.label}: only {full} full batches per epoch, need {case.steps}")
        raw = RawLoop(case.arch, case.px, case.batch, task.ds.num_classes, device, recipe)
        loop = StepLoop(task, recipe, device, case.steps)
        for r in range(case.rounds):
            torch.backends.cudnn.benchmark = False  # the engine's setting: whatever fit does itself is measured
            res = fit(LimitedTask(task, case.steps), recipe, device, progress=False)
            fit_rates.append(img_per_s(res.history, case.steps, case.batch))
            loop_rates.append(loop.throughput())
            raw_rates.append(raw.throughput(steps=case.steps, warmup=2 if r == 0 else 1))
            if cuda:
                torch.backends.cudnn.benchmark = True
                bench_rates.append(raw.throughput(steps=case.steps, warmup=3))
                torch.backends.cudnn.benchmark = False
        del task, loop, raw
    ours, bare, base = (max(x) for x in (fit_rates, loop_rates, raw_rates))
    row = {"case": case.label, "dataset": case.dataset, "ours_fit_img_s": ours, "ours_step_loop_img_s": bare,
           "raw_img_s": base, "ratio_fit": ours / base, "ratio_step_loop": bare / base,
           "ratio_fit_median": statistics.median(fit_rates) / statistics.median(raw_rates), "upstream_s": upstream_s,
           "rounds": case.rounds, "fit_img_s_rounds": fit_rates, "step_loop_img_s_rounds": loop_rates,
           "raw_img_s_rounds": raw_rates}
    if cuda:
        row["raw_cudnn_benchmark_img_s"] = max(bench_rates)
        row["ratio_fit_vs_cudnn_benchmark"] = ours / row["raw_cudnn_benchmark_img_s"]
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    device = setup(args)
    rows = []
    for case in cases(args.quick, device):
        print(f"trial_throughput: {case.label} on {device} ...", flush=True)
        rows.append(measure(case, args.quick, device))
    cols = ["case", "ours_fit_img_s", "ours_step_loop_img_s", "raw_img_s", "ratio_fit", "ratio_step_loop",
            "ratio_fit_median"]
    if device.type == "cuda":
        cols += ["raw_cudnn_benchmark_img_s", "ratio_fit_vs_cudnn_benchmark"]
    print(table(rows, cols))
    ratio = min(r["ratio_fit"] for r in rows)
    where = "GPU" if device.type == "cuda" else "CPU (the target is for a GPU)"
    summary = (f"student trial / raw timm+torch train img/s = {ratio:.2f} (worst case; target >= {TARGET} on a GPU); "
               f"{where}")
    return emit("trial_throughput", args, device, {"rows": rows, "ratio": ratio, "target": TARGET}, summary)


if __name__ == "__main__":
    main()
