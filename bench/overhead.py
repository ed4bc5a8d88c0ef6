"""Overhead of a search through `mlfd tune` (Ray Tune + Optuna + MLflow) against the same trials as a plain loop.

1. A warm store: the search's teachers (one epoch: their quality does not matter here), trained once in this process;
   both runs start from a copy of it, so the teachers' training, which the search does as parallel Ray tasks, is not
   part of either run.
2. The search: `python -m mlfd.cli tune tune_jobs/quickstart.yaml --smoke` for one study with N trials, one at a time
   (max_concurrent_trials 1), no early stopping (scheduler none), MLflow tracking on; its wall time.
3. The plain loop: a fresh process runs the same N sampled configurations (read from trials.parquet) one after the
   other through the stage functions (mlfd.stages: joint teacher targets, then train_student), no Ray, no Optuna, no
   MLflow; its wall time and each trial's time.

Overhead of a search of N trials = search wall - plain wall: Ray start-up, Optuna, trial actors, per-epoch
checkpoints and reports, MLflow runs, the summary files. Steps 2-3 run at two sizes N1 < N2, which splits it into a
fixed part paid once per search and a part per trial: per trial = (overhead(N2) - overhead(N1)) / (N2 - N1). The
per-trial part is the headline, as % of a 60 s trial (the per-epoch part grows with epochs, so this holds for a trial
of a similar number of epochs); the fixed part and the all-included overhead per trial at N2 are printed beside it.

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


def warm_store(plan, store: Path) -> None:
    """Train the teachers of a prepared search (a :class:`mlfd.search.SearchPlan`) once into ``store``."""
    from mlfd.stages.common import Context
    from mlfd.stages.teachers import train_teacher
    from mlfd.store import ArtifactStore

    ctx = Context(spec=plan.spec, store=ArtifactStore(store), progress=False)
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

    from mlfd.search import SearchPlan

    context = {"pipeline": SearchPlan.load(search_out).pipeline}
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


def measure(n: int, tmp: Path, warm: Path, env: dict, reuse: bool, gpu: float) -> dict:
    """One search of ``n`` trials through `mlfd tune` and the same trials as a plain loop, both from a copy of the
    warm store; their wall times, the plain loop's trial times and the time Ray measured inside the trainables."""
    run = tmp / f"n{n}"
    shutil.copytree(warm, run / "store-search")
    shutil.copytree(warm, run / "store-plain")
    cmd = [sys.executable, "-m", "mlfd.cli", "tune", str(JOB), "--smoke", "--out", str(run / "search")]
    for o in search_overrides(n, run / "store-search", gpu) + [f"reuse_actors={str(reuse).lower()}"]:
        cmd += ["--set", o]
    print(f"overhead: search of {n} trials through mlfd tune ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    search_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mlfd tune failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print(f"overhead: the same {n} trials as a plain loop ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--plain-child", str(run / "search"),
                           str(run / "store-plain"), str(run / "plain.json")], env=env, capture_output=True, text=True)
    plain_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed ({proc.returncode}): {proc.stderr[-2000:]}")
    trial_s = json.loads((run / "plain.json").read_text())["trial_s"]
    return {"search_s": search_s, "plain_s": plain_s, "trial_s": trial_s,
            "inside_s": in_trainable_seconds(run / "search")}


def split_overhead(small: dict, large: dict) -> dict:
    """Overhead = fixed start-up + n x per-trial cost: both from two searches of different sizes."""
    n1, n2 = len(small["trial_s"]), len(large["trial_s"])
    ov1, ov2 = small["search_s"] - small["plain_s"], large["search_s"] - large["plain_s"]
    per_trial = (ov2 - ov1) / (n2 - n1)
    return {"marginal_overhead_per_trial_s": per_trial, "fixed_overhead_s": ov1 - n1 * per_trial,
            "marginal_fraction_60s_trial": per_trial / REFERENCE_TRIAL_S}


def main(argv: list[str] | None = None) -> dict:
    def extra(p) -> None:
        p.add_argument("--trials", type=int, nargs=2, default=None, metavar=("N1", "N2"),
                       help="sizes of the two searches (default: 2 4 with --quick, 3 6 otherwise)")
        p.add_argument("--no-reuse", action="store_true", help="run the searches with reuse_actors=false")

    args = parse_args(__doc__, argv, extra=extra)
    device = setup(args)
    n1, n2 = args.trials or ((2, 4) if args.quick else (3, 6))
    with tmpdir("overhead") as tmp:
        tmp = Path(tmp)
        from mlfd.tune.launch import prepare

        # Only the pipeline is needed here: gpu 0 skips the packing dry run, which the search itself does run.
        plan = prepare(str(JOB), tmp / "plan", smoke=True, overrides=search_overrides(n1, tmp / "store-warm", 0.0))
        print("overhead: warm store (the search's teachers, once) ...", flush=True)
        warm_store(plan, tmp / "store-warm")
        env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
               "OMP_NUM_THREADS": str(args.threads or 1) if device.type == "cpu" else "4"}
        gpu = 1.0 if device.type == "cuda" else 0.0
        runs = [measure(n, tmp, tmp / "store-warm", env, not args.no_reuse, gpu) for n in (n1, n2)]
    rows = []
    for r in runs:
        fig = overhead_figures(r["search_s"], r["plain_s"], r["trial_s"])
        # Of the overhead, the part inside the trainables (per-epoch reports and checkpoints, Ray's session) grows
        # with a trial's epochs; the rest (Ray and MLflow start-up, trial actors, summaries) does not.
        fig["in_trainable_overhead_per_trial_s"] = (r["inside_s"] - sum(r["trial_s"])) / len(r["trial_s"])
        rows.append(fig)
    print(table(rows))
    split = split_overhead(*runs)
    last = rows[-1]
    summary = (f"{split['marginal_overhead_per_trial_s']:.1f} s overhead per additional trial = "
               f"{split['marginal_fraction_60s_trial']:.1%} of a 60 s trial (target <= {TARGET:.0%}), plus "
               f"{split['fixed_overhead_s']:.0f} s once per search (Ray, MLflow, teacher check, summaries); "
               f"a search of {len(runs[-1]['trial_s'])} {last['mean_trial_s']:.1f} s trials: "
               f"{last['overhead_per_trial_s']:.1f} s per trial all included; reuse_actors={not args.no_reuse}")
    return emit("overhead", args, device, {**split, "runs": rows, "ratio": split["marginal_fraction_60s_trial"],
                                            "target": TARGET, "reuse_actors": not args.no_reuse}, summary)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-child":
        plain_loop(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
