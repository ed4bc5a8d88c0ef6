"""``mlfd`` command line: run | plan | tune | export | report | ui.

What the user sees: results and the paths written on stdout; progress and library messages (Python ``logging``,
``mlfd.*`` loggers) on stderr, one compact line each, at the level ``-q`` / ``-v`` set (:func:`configure_logging`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from mlfd.errors import SpecError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
PRICE_ENV = "MLFD_TUNE_PRICE"
"""``0`` turns off the price estimate ``mlfd tune`` measures at launch (the default of ``--price/--no-price``)."""
EXIT_TERMINATED = 143  # 128 + SIGTERM: what Kubernetes and Slurm expect of a job stopped with SIGTERM


def _cmd_run(args: argparse.Namespace) -> int:
    from mlfd.config import load_pipeline, parse_seeds, smoke_pipeline

    seeds = [f"seeds={parse_seeds(args.seeds)}"] if args.seeds is not None else []
    spec = load_pipeline(args.pipeline, args.set + seeds)  # before importing torch: a bad file fails in a fraction of a second
    if args.smoke:
        spec = smoke_pipeline(spec)
    from mlfd.stages.pipeline import preflight, results_table, run_pipeline

    out = Path(args.out).resolve()
    uri = None
    if not args.no_tracking:
        from mlfd.tracking import Tracker, default_uri

        uri = args.tracking_uri or default_uri(out)
        Tracker.check_reachable(uri, hint="--tracking-uri URI, or --no-tracking")
    preflight(spec)  # datasets, models and levels checked before any training
    tracking = None
    if uri is not None:
        from mlfd.tracking import PipelineTracking

        out.mkdir(parents=True, exist_ok=True)
        tracking = PipelineTracking(uri, spec, out)
    try:
        df = run_pipeline(spec, out, store=Path(args.store).resolve() if args.store else None,
                          progress=not args.quiet, log=tracking.log_stage if tracking else None)
    except BaseException as e:
        if tracking is not None:  # Ctrl-C is KILLED in MLflow's terms, an error FAILED
            tracking.finish(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    from mlfd.report import write_report

    files = write_report(out)
    if tracking is not None:
        tracking.finish(files)
    print(results_table(df))
    print(f"\nwrote {out / 'results.parquet'}, {out / 'results.md'} and {files['report']}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from mlfd.search import load_job

    if args.connect_timeout <= 0:
        raise SpecError(f"--connect-timeout: must be > 0 seconds, got {args.connect_timeout:g}")
    if args.lost_node_timeout < 0:
        raise SpecError(f"--lost-node-timeout: must be >= 0 seconds (0: wait for ever), got {args.lost_node_timeout:g}")
    load_job(args.job, smoke=args.smoke, overrides=args.set)  # before importing Ray and torch: a bad file fails fast
    if args.json and not args.plan:
        raise SpecError("--json: writes the estimate of --plan; add --plan")
    if args.plan:
        return _tune_plan(args)
    from mlfd.tracking import SearchTracking
    from mlfd.tune.cluster import handle_sigterm
    from mlfd.tune.launch import check_search_args, run_search

    check_search_args(Path(args.out), args.resume, args.extend, args.warm_start)

    handle_sigterm()  # SIGTERM stops the search like Ctrl-C from here on (exit 143)
    out = Path(args.out).resolve()
    df = run_search(args.job, out, smoke=args.smoke, resume=args.resume, address=args.address, overrides=args.set,
                    tracking=SearchTracking(out, register=args.register), connect_timeout=args.connect_timeout,
                    lost_node_timeout=args.lost_node_timeout, verbose=args.verbose, extend=args.extend,
                    warm_start=args.warm_start, price=args.price)
    print(search_summary(df, out))
    return 0


def _tune_plan(args: argparse.Namespace) -> int:
    """``mlfd tune JOB --plan``: the search's estimated cost, measured here; no trial runs, Ray does not start."""
    if args.resume or args.address:
        raise SpecError(f"--plan: prices a new local search; drop {'--resume' if args.resume else '--address'}")
    import importlib

    from mlfd.tune.launch import prepare
    from mlfd.tune.trials import trial_threads
    from mlfd.tune.price import price_prepared, price_table, process_age, write_price

    importlib.import_module("ray")  # a search's driver imports it before preparing: part of the measured start
    plan = prepare(args.job, Path(args.out).resolve(), args.smoke, args.set)  # reads, checks; writes nothing
    price = price_prepared(plan, trial_threads(plan.job), process_age())
    print(price_table(price))
    if args.json:
        write_price(price, Path(args.json))
        print(f"\nwrote {args.json}")
    return 0


def search_summary(df, out: Path) -> str:
    """The final table of ``mlfd tune`` (one row per trial, in Ray's creation order), what it wrote, and the next
    commands with this search's paths."""
    import shlex

    metric = next((c for c in df.columns if c.startswith("best/")), None)
    costs = [c for c in df.columns if c.startswith("best/student/")]  # a students search: what each student costs
    cols = [c for c in ("study", "trial_index", "trial_id", "status", "epochs", metric, *costs, "feasible", "is_pareto",
                        "error") if c in df.columns]
    lines = []
    if len(df):
        table = df[cols].copy()
        if "trial_index" in table:  # the studies in the order they ran, each in Ray's creation order
            order = {s: i for i, s in enumerate(dict.fromkeys(table["study"]))}
            table = table.iloc[sorted(range(len(table)), key=lambda i: (order[table["study"].iloc[i]],
                                                                        table["trial_index"].fillna(0).iloc[i]))]
        if "trial_index" in table:
            table["trial_index"] = [str(int(i)) if i == i and i is not None else "-" for i in table["trial_index"]]
        if "error" in table:
            if (table["error"] != "").any():
                table["error"] = table["error"].str.slice(0, 60)
            else:
                table = table.drop(columns="error")
        lines += [table.rename(columns={"trial_index": "#"}).to_string(index=False, na_rep="-"), ""]
    o = shlex.quote(str(out))
    studies = list(dict.fromkeys(df["study"])) if "study" in df.columns else []
    steps = [(f"mlfd report {o}", "report.md and plots"),
             *[(f"mlfd export {o} --study {s} --out best-{s}.yaml", "the best trial as a pipeline YAML")
               for s in studies],
             *[(f"mlfd export {o} --study {s} --pick pareto:{n} --out pareto{n}-{s}.yaml",
                f"point {n} of {n} on the Pareto front (1 = best first objective)")
               for s, n in front_sizes(df).items() if n >= 2],
             (f"mlfd ui --out {o}", "the MLflow UI of this search")]
    url = _optuna_storage(out)
    if url:
        steps.append((f"optuna-dashboard {shlex.quote(url)}", "the Optuna studies"))
    width = max(len(c) for c, _ in steps)
    lines += [f"wrote {out / 'trials.parquet'} and {out / 'best'}/<study>.yaml", "next:",
              *[f"  {c:<{width}}  # {why}" for c, why in steps]]
    return "\n".join(lines)


def front_sizes(df) -> dict:
    """Study -> number of trials on its Pareto front (none for a single-objective search)."""
    if "is_pareto" not in df.columns:
        return {}
    return {s: int(df.loc[df["study"] == s, "is_pareto"].astype(bool).sum()) for s in dict.fromkeys(df["study"])}

def _optuna_storage(out: Path) -> str | None:
    """The Optuna storage of the search in ``out`` (None when it has none, or no readable search.json)."""
    from mlfd.search import SearchPlan
    from mlfd.tune.study import search_storage

    try:
        return search_storage(out, SearchPlan.load(out).optuna_storage)
    except SpecError:
        return None


def _cmd_export(args: argparse.Namespace) -> int:
    from mlfd.tune.trials import export_best

    path = export_best(Path(args.dir), args.study, Path(args.out), pick=args.pick)
    print(f"wrote {path}")
    return 0


# --- mlfd plan -------------------------------------------------------------------------------------------------------


def _exit_on_sigterm(command: str) -> None:
    """SIGTERM raises ``SystemExit(143)`` in the main thread, so ``finally`` blocks run before the process ends."""
    import signal

    def stop(signum: int, frame: object) -> None:
        print(f"{command}: stopped by SIGTERM", file=sys.stderr)
        raise SystemExit(EXIT_TERMINATED)

    signal.signal(signal.SIGTERM, stop)


def _cmd_plan(args: argparse.Namespace) -> int:
    from mlfd.config import load_pipeline, smoke_pipeline

    spec = load_pipeline(args.pipeline, args.set)  # before the stages import: a bad file fails in a second
    if args.smoke:
        spec = smoke_pipeline(spec)
    from mlfd.plan import check_probe_batch, make_plan, parse_counts, parse_memory, plan_table, write_json

    counts = parse_counts(args.count)
    memory = parse_memory(args.memory) if args.memory is not None else None
    if counts and not args.synthetic:
        raise SpecError("--count: image counts are for --synthetic; a real run counts its data")
    if args.steps < 1:
        raise SpecError(f"--steps: must be >= 1, got {args.steps}")
    check_probe_batch(args.probe_batch)
    if not args.synthetic:
        from mlfd.stages.pipeline import preflight

        preflight(spec)  # datasets readable, models buildable, levels available: as `mlfd run` checks them
    _exit_on_sigterm("mlfd plan")  # unwinds like Ctrl-C: the probe's throwaway store (GBs at 224 px) is removed
    plan = make_plan(spec, store=Path(args.store).resolve() if args.store else None, synthetic=args.synthetic,
                     counts=counts, steps=args.steps, name=Path(args.pipeline).name, memory=memory,
                     probe_batch=args.probe_batch)
    print(plan_table(plan))
    if args.json:
        write_json(plan, Path(args.json))
        print(f"\nwrote {args.json}")
    return 0


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what a run would build and cost (cache sizes, memory, time), without training")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--store", default=None, help="artifact store to look in for what is already built")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, as in run")
    p.add_argument("--smoke", action="store_true", help="plan the --smoke variant of the pipeline")
    p.add_argument("--synthetic", action="store_true",
                   help="read no data: random images of each dataset's known size and count (see --count)")
    p.add_argument("--count", action="append", default=[], metavar="NAME=KEY:N,...",
                   help="image counts of a dataset for --synthetic, e.g. sketch=train:50889,classes:1000 "
                        "(keys: train, val, test, classes, image_size, channels)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage after one warm-up step (default 3)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory each stage must fit, e.g. 24GiB to plan for the paper's 24 GB GPU on a bigger one "
                        "(default: the GPU's total, or the host memory available now on a CPU); a batch predicted "
                        "not to fit is measured smaller and its peak extrapolated")
    p.add_argument("--probe-batch", type=int, default=None, metavar="N",
                   help="measure each trained stage at batch N at most: images/s as measured there, peak memory "
                        "extrapolated to the stage's batch (a quick plan on a CPU; on a GPU a small batch understates "
                        "the speed)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    p.set_defaults(func=_cmd_plan)


# ----------------------------------------------------------------------------------------------------------------------


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no progress)")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="debug messages too; mlfd tune also shows Ray's own output (kept in OUT/logs/ray.log)")


def configure_logging(quiet: bool = False, verbose: bool = False) -> Callable[[], None]:
    """Library messages (``mlfd.*`` loggers) to stderr, one line each: ``mlfd: warning: ...`` for warnings,
    the message alone for progress; ``quiet``: warnings and errors only; ``verbose``: debug messages too.

    The records stop at the ``mlfd`` logger (a handler that a library adds to the root logger would print them
    twice). Returns the function that puts the ``mlfd`` logger back as it was (``main`` calls it at the end, so that
    in-process callers, pytest's log capture among them, find it unchanged)."""
    log = logging.getLogger("mlfd")
    before = (list(log.handlers), log.level, log.propagate)
    for h in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_CliFormatter())
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False

    def restore() -> None:
        log.handlers[:] = before[0]
        log.setLevel(before[1])
        log.propagate = before[2]

    return restore


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record comes (pytest's capture replaces it per test)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = ("mlfd: error: " if record.levelno >= logging.ERROR else
                  "mlfd: warning: " if record.levelno >= logging.WARNING else "")
        text = prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlfd", description="Multi-Level Feature Distillation: run and search.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a pipeline YAML (stages that are already in the store are reused)")
    r.add_argument("pipeline", help="pipeline YAML file")
    r.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    r.add_argument("--store", default=None, help="artifact store directory (default: OUT/store)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set student.alpha=0.5 --set datasets.mnist.model.arch=test_vit")
    r.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="run seeds, e.g. 0,1,2: every stage is trained once per seed and the tables give mean ± std "
                        "(n) (overrides the pipeline's seeds:; the data splits stay the same)")
    r.add_argument("--smoke", action="store_true", help="tiny data and 1-2 epochs: finishes in under 2 minutes")
    r.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db); http://host:port for a server")
    r.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    r.set_defaults(func=_cmd_run)

    t = sub.add_parser("tune", help="search a stage with Ray Tune + Optuna (one study per student dataset)")
    t.add_argument("job", help="tune job YAML (tune_jobs/*.yaml)")
    t.add_argument("--out", default="runs/search", help="output directory (default: runs/search)")
    t.add_argument("--smoke", action="store_true", help="apply the job's smoke: block (minutes on a CPU)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted search in --out")
    t.add_argument("--extend", type=int, default=None, metavar="N",
                   help="run N more trials per study of the finished search in --out, the sampler seeded with every "
                        "earlier trial (same Optuna studies, same MLflow parent runs)")
    t.add_argument("--warm-start", default=None, metavar="DIR",
                   help="seed this new search's samplers with the trials of the search in DIR that fit its space")
    t.add_argument("--address", default=None,
                   help="join an existing Ray cluster: HEAD_IP:6379, ray://HEAD_IP:10001 or auto (see README, "
                        "Running on a cluster)")
    t.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up joining the --address cluster after SECONDS (default: 60); exit 2")
    t.add_argument("--lost-node-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="stop the search (state saved, exit 2) when trials have waited SECONDS for resources that no "
                        "live node has, e.g. after losing a node (default: 30; 0: wait for ever, e.g. for an "
                        "autoscaler)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field (num_samples=4, resources.gpu=0) or a pipeline field "
                        "(pipeline.student.recipe.epochs=3)")
    t.add_argument("--plan", action="store_true",
                   help="print what the search would cost (stages stored or to build, seconds per epoch measured on "
                        "a few batches, expected trial-epochs, concurrency, wall time, device-hours); run no trial")
    t.add_argument("--json", default=None, metavar="FILE", help="with --plan: also write the estimate as JSON")
    t.add_argument("--price", action=argparse.BooleanOptionalAction,
                   default=os.environ.get(PRICE_ENV, "1") != "0",
                   help="measure the --plan estimate at launch (10-30 s on a CPU) and keep it in OUT/price.json, "
                        "where `mlfd report` puts it beside the measured time (default: on; off with "
                        f"--no-price or {PRICE_ENV}=0)")
    t.add_argument("--register", default=None, metavar="NAME",
                   help="register each study's best model in the MLflow model registry under NAME")
    t.set_defaults(func=_cmd_tune)

    e = sub.add_parser("export", help="write a search's best trial as a standalone pipeline YAML")
    e.add_argument("dir", help="search output directory")
    e.add_argument("--study", default=None, help="study (dataset) to export; default: the first")
    e.add_argument("--out", default="best.yaml", help="destination YAML (default: best.yaml)")
    e.add_argument("--pick", default=None, metavar="WHICH",
                   help="export another trial than the best: pareto:K, the K-th point of a multi-objective study's "
                        "Pareto front (K=1: best first objective; the order of mlfd report's table), or conditions "
                        "such as 'student/params<=1e6' (joined with ','; ops <=, >=, <, >): the best first objective "
                        "among the trials that meet them")
    e.set_defaults(func=_cmd_export)

    _add_plan_parser(sub)

    from mlfd.report import add_report_parser
    from mlfd.ui import add_ui_parser

    add_report_parser(sub)
    add_ui_parser(sub)
    for command in sub.choices.values():
        _add_verbosity(command)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_logging = configure_logging(args.quiet, args.verbose)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"mlfd: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # StorageError and friends: disk full, permissions; earlier outputs are untouched
        print(f"mlfd: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from mlfd.engine import is_out_of_memory, out_of_memory

        if not is_out_of_memory(e):
            raise
        print(f"mlfd: error: {out_of_memory(e, 'mlfd ' + args.command)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        cluster = sys.modules.get("mlfd.tune.cluster")  # loaded by `mlfd tune`, which alone handles SIGTERM
        term = cluster is not None and cluster.stopped_by_sigterm()
        print(f"mlfd: {'stopped by SIGTERM' if term else 'interrupted'}{': ' + str(e) if str(e) else ''}",
              file=sys.stderr)
        return EXIT_TERMINATED if term else EXIT_INTERRUPTED
    finally:
        restore_logging()


if __name__ == "__main__":
    sys.exit(main())
