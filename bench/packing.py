"""Packing k trials on one device: the aggregate throughput of k concurrent student trials run by Ray Tune with our
trainable (mlfd.tune.trainable.run_stage, resources gpu: 1/k) against k concurrent raw timm+torch processes.

Ours: k trials of the same student stage (each with its own seed, so each trains instead of reusing another's
artifact), started together by a Ray Tune Tuner (FIFO, max_concurrent_trials k) over a store whose upstream (stand-in
teachers, feature cache, joint teacher, targets) is built beforehand, as a search's upstream is built once and shared.
A trial's img/s = train images per epoch / its median train/time_s over the epochs after the first; the aggregate is
the sum over trials. Raw: k processes of bench/common.py RawLoop (same model, resolution, batch, recipe) for a fixed
time, started together; the aggregate is the sum of their img/s (on a CPU the best of two rounds over all k).

Printed: the packing gain of each (aggregate at k / aggregate at 1) and the fraction of the raw gain ours keeps
(ours gain / raw gain; target >= 0.9, design.md section 6), and the stricter (ours gain - 1) / (raw gain - 1).

On a GPU: ResNet-18 at 32 px, batch 256, k = 1, 2, 4, 8, gpu: 1/k. On a CPU (--quick): k = 1, 2 with cpu: 1 per trial
and per raw process (one torch thread each) instead of GPU fractions: it measures how the trial runner packs on
cores, not GPU sharing.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (collect_raw, emit, load_spec, parse_args, setup, spawn_raw, standin_context,  # noqa: E402
                          table, timed, tmpdir)
from mlfd.config import to_dict  # noqa: E402

TARGET = 0.9


def settings(quick: bool, device: torch.device) -> dict:
    """Model, data and sizes of the run."""
    if device.type == "cuda":
        return {"dataset": "fashion", "arch": "resnet18", "px": 32, "batch": 256, "epochs": 3, "ks": [1, 2, 4, 8],
                "raw_seconds": 6.0, "max_train": 20000, "raw_rounds": 1}
    if quick:
        return {"dataset": "mnist", "arch": "test_resnet", "px": 32, "batch": 32, "epochs": 3, "ks": [1, 2],
                "raw_seconds": 6.0, "max_train": 300, "raw_rounds": 2}
    return {"dataset": "fashion", "arch": "resnet18", "px": 32, "batch": 64, "epochs": 3, "ks": [1, 2],
            "raw_seconds": 10.0, "max_train": 1000, "raw_rounds": 2}


def gains(agg: dict[int, float]) -> dict[int, float]:
    """Aggregate throughput at k over the aggregate at k = 1."""
    return {k: v / agg[1] for k, v in agg.items()}


def kept(ours_gain: float, raw_gain: float) -> tuple[float, float]:
    """(ours gain / raw gain, (ours gain - 1) / (raw gain - 1)); the second is nan when raw gains nothing."""
    strict = (ours_gain - 1) / (raw_gain - 1) if abs(raw_gain - 1) > 1e-9 else float("nan")
    return ours_gain / raw_gain, strict


def trial_img_per_s(times: list[float], images_per_epoch: int) -> float:
    """One trial's training img/s from its per-epoch train/time_s (median of the epochs after the first)."""
    rest = times[1:] or times
    return images_per_epoch / statistics.median(rest)


def run_trials(k: int, context: dict, device: torch.device, epochs: int, storage: Path) -> list[list[float]]:
    """k concurrent trials through Ray Tune with run_stage; returns each trial's train/time_s per epoch."""
    from ray import tune

    from mlfd.tune.trainable import run_stage

    resources = {"cpu": 1, "gpu": 1.0 / k} if device.type == "cuda" else {"cpu": 1}
    trainable = tune.with_resources(tune.with_parameters(run_stage, context=context), resources)
    tuner = tune.Tuner(trainable, param_space={"student.recipe.seed": tune.grid_search(list(range(100, 100 + k)))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=k, reuse_actors=False),
                       run_config=tune.RunConfig(name=f"packing-k{k}", storage_path=str(storage), verbose=0))
    results = tuner.fit()
    out = []
    for r in results:
        if r.error is not None:
            raise RuntimeError(f"trial failed: {r.error}")
        df = r.metrics_dataframe
        out.append([float(t) for t in df["train/time_s"].dropna()][:epochs])
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    device = setup(args)
    cfg = settings(args.quick, device)
    name, px, batch = cfg["dataset"], cfg["px"], cfg["batch"]
    overrides = [f"datasets.{name}.student_model={{arch: {cfg['arch']}, input_size: {px}}}",
                 f"student.recipe.batch_size={batch}", f"student.recipe.epochs={cfg['epochs']}",
                 f"datasets.{name}.max_train={cfg['max_train']}", "fusion_levels=[1]"]
    spec = load_spec(args.quick, overrides)
    import ray

    rows = []
    with tmpdir("packing") as tmp:
        tmp = Path(tmp)
        ctx = standin_context(spec, "students", tmp, device)
        from mlfd.stages.joint import joint_targets, plan_for

        _, upstream_s = timed(lambda: joint_targets(ctx, plan_for(ctx, 1, name), name))
        n_train = len(ctx.data(name).train)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the driver keeps only its CUDA context while the trials run
        context = {"pipeline": to_dict(ctx.spec), "stage": "students", "study": name, "store": str(tmp / "store"),
                   "threads": 1}
        ncpu = max(cfg["ks"]) if device.type == "cuda" else 2
        ray.init(num_cpus=ncpu, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
        try:
            ours: dict[int, float] = {}
            per_trial: dict[int, list[float]] = {}
            for k in cfg["ks"]:
                print(f"packing: {k} trial(s) through Ray Tune ...", flush=True)
                times, wall = timed(lambda: run_trials(k, context, device, cfg["epochs"], tmp / "ray"))
                print(f"packing: {k} trial(s) done in {wall:.0f} s (wall, Ray start-up of the trials included)",
                      flush=True)
                per_trial[k] = [trial_img_per_s(t, n_train) for t in times]
                ours[k] = sum(per_trial[k])
        finally:
            ray.shutdown()
    raw: dict[int, float] = {}
    for r in range(cfg["raw_rounds"]):  # rounds over all k: a burst of other load hits one round, not one k
        for k in cfg["ks"]:
            print(f"packing: {k} raw process(es), round {r + 1} ...", flush=True)
            procs = [spawn_raw(cfg["arch"], px, batch, cfg["raw_seconds"], 1 if device.type == "cpu" else 2,
                               str(device)) for _ in range(k)]
            raw[k] = max(raw.get(k, 0.0), sum(collect_raw(procs, timeout=cfg["raw_seconds"] + 300)))
    g_ours, g_raw = gains(ours), gains(raw)
    for k in cfg["ks"]:
        frac, strict = kept(g_ours[k], g_raw[k])
        rows.append({"k": k, "ours_agg_img_s": ours[k], "raw_agg_img_s": raw[k], "ours_gain": g_ours[k],
                     "raw_gain": g_raw[k], "kept": frac, "kept_strict": strict,
                     "ours_per_trial_img_s": [round(v, 1) for v in per_trial[k]]})
    print(table(rows, ["k", "ours_agg_img_s", "raw_agg_img_s", "ours_gain", "raw_gain", "kept", "kept_strict"]))
    top = rows[-1]
    mode = (f"gpu: 1/k on {device}" if device.type == "cuda" else
            "CPU: cpu: 1 per trial and per raw process, no GPU fractions")
    summary = (f"k={top['k']} keeps {top['kept']:.2f} of the raw packing gain (ours {top['ours_gain']:.2f}x vs raw "
               f"{top['raw_gain']:.2f}x; strict (g-1) ratio {top['kept_strict']:.2f}; target >= {TARGET}); {mode}")
    if top["raw_gain"] < 1.05:
        summary += ("; NOT MEANINGFUL HERE: the raw processes gained nothing from packing (the cores were busy with "
                    "other load), so there is no gain to keep")
    result = {"rows": rows, "ratio": top["kept"], "target": TARGET, "settings": cfg, "mode": mode,
              "upstream_s": upstream_s}
    return emit("packing", args, device, result, summary)


if __name__ == "__main__":
    main()
