"""How a search's cost grows with the number of datasets m, the fusion level k and the number of trials.

Measured at small sizes (200 train images per dataset, one epoch per stage, the offline default's small models at
32 px), with the real stage functions over a fresh artifact store per m:

* teachers: one per dataset, trained once: grows with m;
* feature cache: every teacher over every dataset at level k: m^2 (teacher, dataset) pairs, each costing one
  inference pass and level-k bytes per image;
* joint teacher T* per level, trained on the cache only;
* trials: student trials at level 2 on top of that upstream, n = 1, 2, 4: the cost per trial is constant, so a
  search's cost is the upstream (paid once) plus a linear term in n;
* reuse: asking for the whole upstream again in the same store costs ~0 (content-addressed artifacts).

Prints a table and the fits (cache seconds per pair, seconds per trial) and writes a PNG (bench/results/).
On a GPU it runs the same small sizes on the GPU; the shape of the growth is the point, not the absolute times.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, emit, load_spec, parse_args, setup, table, timed, tmpdir  # noqa: E402

NAMES = ["mnist", "fashion", "digits"]
SMALL = ["teacher.epochs=1", "joint.recipe.epochs=1", "student.recipe.epochs=1", "teacher.batch_size=32",
         "student.recipe.batch_size=32", "joint.recipe.batch_size=64"]


def small_overrides(m: int, levels: list[int], n_train: int) -> list[str]:
    """A pipeline over the first m datasets, tiny sizes, fusion levels ``levels``."""
    out = [f"fusion_levels={levels}"] + SMALL
    for d in NAMES:
        out += [f"datasets.{d}.max_train={n_train}", f"datasets.{d}.max_val=50", f"datasets.{d}.max_test=50"]
    return out


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y = slope * x + intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return slope, my - slope * mx


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_m(m: int, levels: list[int], n_train: int, quick: bool, device, tmp: Path) -> tuple[list[dict], object]:
    """Upstream costs for the first m datasets at every level; returns rows and the context (for trials)."""
    from mlfd.stages.cache import build_cache
    from mlfd.stages.common import Context
    from mlfd.stages.joint import plan_for, train_joint
    from mlfd.stages.teachers import train_teacher
    from mlfd.store import ArtifactStore

    spec = load_spec(False, small_overrides(m, levels, n_train))
    spec.datasets = spec.datasets[:m]
    spec.device = device.type
    ctx = Context(spec=spec, store=ArtifactStore(tmp / f"store-m{m}"), progress=False)
    for d in spec.datasets:
        ctx.data(d.name)  # data loading is not a stage cost
    _, teachers_s = timed(lambda: [train_teacher(ctx, d.name) for d in spec.datasets])
    rows = []
    for k in levels:
        t0 = time.perf_counter()
        arts = [build_cache(ctx, t.name, d.name, k) for t in spec.datasets for d in spec.datasets]
        cache_s = time.perf_counter() - t0
        nbytes = sum(dir_bytes(a.path) for a in arts)
        _, joint_s = timed(lambda: train_joint(ctx, plan_for(ctx, k)))
        rows.append({"m": m, "level": k, "teachers_s": teachers_s, "cache_pairs": len(arts), "cache_s": cache_s,
                     "cache_s_per_pair": cache_s / len(arts), "cache_mib": nbytes / 2**20, "joint_s": joint_s})
    return rows, ctx


def measure_trials(ctx, level: int, counts: list[int]) -> list[dict]:
    """Student trials (distinct seeds) at ``level`` on the built upstream; cumulative cost for each count."""
    from mlfd.stages.joint import joint_targets, plan_for
    from mlfd.stages.students import train_student

    name = ctx.spec.datasets[0].name
    _, targets_s = timed(lambda: joint_targets(ctx, plan_for(ctx, level, name), name))
    times = []
    for i in range(max(counts)):
        ctx.spec.student.recipe = dataclasses.replace(ctx.spec.student.recipe, seed=1000 + i)
        _, dt = timed(lambda: train_student(ctx, name, level))
        times.append(dt)
    return [{"trials": n, "trials_s": sum(times[:n]), "per_trial_s": sum(times[:n]) / n, "targets_s": targets_s}
            for n in counts]


def plot(rows: list[dict], trial_rows: list[dict], upstream_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for m in sorted({r["m"] for r in rows}):
        rs = [r for r in rows if r["m"] == m]
        ax[0].plot([r["level"] for r in rs], [r["cache_s"] for r in rs], "o-", label=f"m={m} ({m * m} pairs)")
        ax[1].plot([r["level"] for r in rs], [r["cache_mib"] for r in rs], "o-", label=f"m={m}")
    ax[0].set(xlabel="fusion level k", ylabel="feature cache build (s)", title="cache cost: m^2 pairs x level")
    ax[1].set(xlabel="fusion level k", ylabel="feature cache (MiB, float16)", title="cache size")
    n = [r["trials"] for r in trial_rows]
    ax[2].plot(n, [upstream_s + r["trials_s"] for r in trial_rows], "o-", label="search = upstream + trials")
    ax[2].axhline(upstream_s, color="gray", ls="--", label="upstream, paid once")
    ax[2].set(xlabel="trials", ylabel="seconds", title="search cost vs trials (m=3, level 2)")
    ax[0].set_xticks(sorted({r["level"] for r in rows}))
    ax[1].set_xticks(sorted({r["level"] for r in rows}))
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, extra=lambda p: p.add_argument("--png", default=None, help="where the PNG goes"))
    device = setup(args)
    levels = [1, 2, 3, 4]
    n_train = 200 if args.quick else 1000
    counts = [1, 2, 4] if args.quick else [1, 2, 4, 8]
    rows: list[dict] = []
    with tmpdir("scaling") as tmp:
        tmp = Path(tmp)
        measure_m(2, [1], n_train, args.quick, device, tmp / "warm-up")  # first-use costs (imports, allocator) out
        for m in (2, 3):
            print(f"scaling: m={m} datasets, levels {levels} ...", flush=True)
            m_rows, ctx = measure_m(m, levels, n_train, args.quick, device, tmp)
            rows += m_rows
        print(f"scaling: {max(counts)} student trials at level 2 ...", flush=True)
        trial_rows = measure_trials(ctx, 2, counts)
        from mlfd.stages.cache import build_cache
        from mlfd.stages.joint import plan_for, train_joint

        def again() -> None:
            for k in levels:
                [build_cache(ctx, t.name, d.name, k) for t in ctx.spec.datasets for d in ctx.spec.datasets]
                train_joint(ctx, plan_for(ctx, k))

        _, reuse_s = timed(again)
    print(table(rows))
    print(table(trial_rows))
    m3 = [r for r in rows if r["m"] == 3]
    m2 = {r["level"]: r for r in rows if r["m"] == 2}
    upstream_s = m3[0]["teachers_s"] + sum(r["cache_s"] + r["joint_s"] for r in m3 if r["level"] == 2)
    per_pair = {r["level"]: (m2[r["level"]]["cache_s_per_pair"], r["cache_s_per_pair"]) for r in m3}
    slope, intercept = linear_fit([r["trials"] for r in trial_rows], [r["trials_s"] for r in trial_rows])
    growth = {k: r["cache_s"] / m2[k]["cache_s"] for k, r in ((r["level"], r) for r in m3)}
    print("cache seconds per (teacher, dataset) pair, m=2 vs m=3: "
          + ", ".join(f"L{k}: {a:.2f} / {b:.2f}" for k, (a, b) in per_pair.items()))
    print(f"cache time m=3 / m=2 per level (m^2 predicts {9 / 4:.2f}): "
          + ", ".join(f"L{k}: {g:.2f}" for k, g in growth.items()))
    print(f"trials: {slope:.2f} s per trial + {intercept:.2f} s (linear fit); upstream paid once: {upstream_s:.1f} s; "
          f"asking for the whole upstream again: {reuse_s:.2f} s")
    png = Path(args.png) if args.png else RESULTS_DIR / f"scaling-{device.type}{'-quick' if args.quick else ''}.png"
    plot(rows, trial_rows, upstream_s, png)
    print(f"wrote {png}")
    summary = (f"cache time grows {sum(growth.values()) / len(growth):.2f}x from m=2 to m=3 (m^2 predicts 2.25x) and "
               f"with the level's size; trials cost {slope:.1f} s each on top of a {upstream_s:.0f} s upstream paid "
               f"once (re-asking it: {reuse_s:.2f} s); {n_train} train images per dataset, one epoch per stage")
    return emit("scaling", args, device, {"rows": rows, "trials": trial_rows, "per_trial_s": slope,
                                           "upstream_s": upstream_s, "reuse_s": reuse_s, "cache_growth_m3_m2": growth,
                                           "png": str(png), "ratio": None}, summary)


if __name__ == "__main__":
    main()
