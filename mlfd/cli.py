"""``mlfd`` command line: run | tune | export | report | ui."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlfd.config import SpecError

EXIT_BAD_INPUT = 2


def _cmd_run(args: argparse.Namespace) -> int:
    from mlfd.config import load_pipeline

    spec = load_pipeline(args.pipeline, args.set)
    if args.smoke:
        from mlfd.config import smoke_pipeline

        spec = smoke_pipeline(spec)
    from mlfd.data import load_dataset

    for d in spec.datasets:  # read every dataset up front: a bad path fails before any training
        load_dataset(d)
    out = Path(args.out).resolve()
    from mlfd.stages.pipeline import run_pipeline

    df = run_pipeline(spec, out, store=Path(args.store).resolve() if args.store else None,
                      progress=not args.quiet)
    from mlfd.stages.pipeline import results_table

    print(results_table(df))
    print(f"\nwrote {out / 'results.parquet'} and {out / 'results.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlfd", description="Multi-Level Feature Distillation: run and search.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a pipeline YAML (stages that are already in the store are reused)")
    r.add_argument("pipeline", help="pipeline YAML file")
    r.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    r.add_argument("--store", default=None, help="artifact store directory (default: OUT/store)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set student.alpha=0.5 --set datasets.mnist.model.arch=test_vit")
    r.add_argument("--smoke", action="store_true", help="tiny data and 1-2 epochs: finishes in under 2 minutes")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=_cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"mlfd: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mlfd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
