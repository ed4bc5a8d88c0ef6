"""Overhead of a search through `mlfd tune` (Ray Tune + Optuna + MLflow) against the same trials as a plain loop.

1. A warm store: the search's teachers (one epoch: their quality does not matter here), trained once in this process;
   both runs start from a copy of it, so the teachers' training, which the search does as parallel Ray tasks, is not
   part of either run.
2. The search: `python -m mlfd.cli tune tune_jobs/quickstart.yaml --smoke` for one study with N trials, one at a time
   (max_concurrent_trials 1), no early stopping (scheduler none), MLflow tracking on; its wall time.
3. The plain loop: a fresh process runs the same N sampled configurations (read from trials.parquet) one after the
   other through the stage functions (mlfd.stages: joint teacher targets, then train_student), no Ray, no Optuna, no
   MLflow; its wall time and each trial's time.

Overhead per trial = (search wall - plain wall) / N: Ray start-up, Optuna, trial actors, per-epoch checkpoints and
reports, MLflow runs, the summary files; the search's fixed start-up is spread over its N trials, so the figure falls
as N grows. Printed as seconds and as % of the mean plain trial time, and extrapolated to a 60 s trial (the per-epoch
part of the overhead grows with epochs, so this extrapolation holds for a trial of a similar number of epochs).

Target (design.md section 6): small against the trial; <= 5% of a 60 s trial.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, emit, parse_args, setup, table, tmpdir  # noqa: E402

JOB = ROOT / "tune_jobs" / "quickstart.yaml"
STUDY = "mnist"
TARGET = 0.05
REFERENCE_TRIAL_S = 60.0


def search_overrides(n: int, store: Path, gpu: float) -> list[str]:
    """`mlfd tune` overrides: one study, n sequential full-length trials, the shared warm store."""
    return [f"studies=[{STUDY}]", f"num_samples={n}", "max_concurrent_trials=1", "scheduler={type: none}",
            f"store={store}", f"resources.gpu={gpu:g}", "pipeline.teacher.epochs=1"]


def overhead_figures(search_s: float, plain_s: float, trial_s: list[float]) -> dict:
    """Per-trial overhead in seconds and as a fraction of the mean trial, and extrapolated to a 60 s trial."""
    n = len(trial_s)
    per_trial = (search_s - plain_s) / n
    mean_trial = sum(trial_s) / n
    return {"n_trials": n, "search_wall_s": search_s, "plain_wall_s": plain_s, "mean_trial_s": mean_trial,
            "overhead_per_trial_s": per_trial, "overhead_fraction": per_trial / mean_trial,
            "overhead_fraction_60s_trial": per_trial / REFERENCE_TRIAL_S}


def in_trainable_seconds(search_out: Path) -> float:
    """Sum over the search's trials of the time Ray measured inside the trainable (last ``time_total_s``)."""
    total = 0.0
    for f in (search_out / "ray").glob("*/*/result.json"):
        lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
        if lines:
            total += float(json.loads(lines[-1]).get("time_total_s", 0.0))
    return total


def warm_store(plan: dict, store: Path) -> None:
    """Train the search's teachers once into ``store``."""
    from mlfd.config import PipelineSpec, from_dict
    from mlfd.stages.common import Context
    from mlfd.stages.teachers import train_teacher
    from mlfd.store import ArtifactStore

    ctx = Context(spec=from_dict(PipelineSpec, plan["pipeline"], validate=False), store=ArtifactStore(store),
                  progress=False)
    for d in ctx.spec.datasets:
        train_teacher(ctx, d.name)


def plain_loop(search_out: Path, store: Path, result: Path) -> None:
    """The child of step 3: the search's trials, one after the other, through the stage functions."""
    import pandas as pd

    from mlfd.stages.common import Context
    from mlfd.stages.joint import joint_targets, plan_for
    from mlfd.stages.students import train_student
    from mlfd.store import ArtifactStore
    from mlfd.tune.launch import trial_config
    from mlfd.tune.trainable import trial_spec

    plan = json.loads((search_out / "search.json").read_text())
    context = {"pipeline": plan["pipeline"]}
    rows = pd.read_parquet(search_out / "trials.parquet")
    times = []
    for _, row in rows.iterrows():
        t0 = time.perf_counter()
        spec = trial_spec(trial_config(row), context)
        ctx = Context(spec=spec, store=ArtifactStore(store), progress=False)
        level = spec.fusion_levels[0]
        joint_targets(ctx, plan_for(ctx, level, STUDY), STUDY)
        train_student(ctx, STUDY, level)
        times.append(time.perf_counter() - t0)
    result.write_text(json.dumps({"trial_s": times}))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, extra=lambda p: p.add_argument("--trials", type=int, default=None))
    device = setup(args)
    n = args.trials or (2 if args.quick else 3)
    gpu = 1.0 if device.type == "cuda" else 0.0
    with tmpdir("overhead") as tmp:
        tmp = Path(tmp)
        from mlfd.tune.launch import prepare

        overrides = search_overrides(n, tmp / "store-search", gpu)
        # Only the pipeline is needed here: gpu 0 skips the packing dry run, which the search itself does run.
        plan = prepare(str(JOB), tmp / "search", smoke=True, overrides=search_overrides(n, tmp / "store-search", 0.0))
        print("overhead: warm store (the search's teachers, once) ...", flush=True)
        warm_store(plan, tmp / "store-warm")
        shutil.copytree(tmp / "store-warm", tmp / "store-search")
        shutil.copytree(tmp / "store-warm", tmp / "store-plain")
        env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
               "OMP_NUM_THREADS": str(args.threads or 1) if device.type == "cpu" else "4"}
        cmd = [sys.executable, "-m", "mlfd.cli", "tune", str(JOB), "--smoke", "--out", str(tmp / "search")]
        for o in overrides:
            cmd += ["--set", o]
        print(f"overhead: search of {n} trials through mlfd tune ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        search_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"mlfd tune failed ({proc.returncode}): {proc.stderr[-2000:]}")
        print(f"overhead: the same {n} trials as a plain loop ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--plain-child", str(tmp / "search"),
                               str(tmp / "store-plain"), str(tmp / "plain.json")], env=env, capture_output=True,
                              text=True)
        plain_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"plain loop failed ({proc.returncode}): {proc.stderr[-2000:]}")
        trial_s = json.loads((tmp / "plain.json").read_text())["trial_s"]
        inside_s = in_trainable_seconds(tmp / "search")
    fig = overhead_figures(search_s, plain_s, trial_s)
    # Of the overhead, the part inside the trainables (per-epoch reports and checkpoints, Ray's session) grows with a
    # trial's epochs; the rest (Ray and MLflow start-up, trial actors, teacher prebuild tasks, summaries) does not.
    fig["in_trainable_overhead_per_trial_s"] = (inside_s - sum(trial_s)) / len(trial_s)
    print(table([fig]))
    summary = (f"{fig['overhead_per_trial_s']:.1f} s overhead per trial = {fig['overhead_fraction']:.0%} of a "
               f"{fig['mean_trial_s']:.1f} s trial here; {fig['overhead_fraction_60s_trial']:.1%} of a 60 s trial "
               f"(target <= {TARGET:.0%}); of it {fig['in_trainable_overhead_per_trial_s']:.1f} s inside the "
               f"trainable (worker imports, per-epoch reports and checkpoints); {n} sequential smoke trials, search "
               "start-up included")
    return emit("overhead", args, device, {**fig, "ratio": fig["overhead_fraction_60s_trial"], "target": TARGET,
                                            "trial_s": trial_s}, summary)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-child":
        plain_loop(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
