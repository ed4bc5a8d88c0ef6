"""Collect the JSON results of a benchmark run into one file and append a section to bench/RESULTS.md.

    python bench/collect.py RUN_DIR OUT.json RESULTS.md [--label TEXT]

RUN_DIR holds one ``<bench>.json`` per benchmark (written with ``--json``) and, for a benchmark that failed, a
``<bench>.log`` whose tail is recorded instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["trial_throughput", "packing", "cache", "overhead", "memory", "scaling"]


def load_run(run_dir: Path) -> dict[str, dict]:
    """Bench name -> its JSON record, or ``{"error": <log tail>}`` for one that left only a log."""
    out: dict[str, dict] = {}
    names = sorted({p.stem for p in run_dir.glob("*.json")} | {p.stem for p in run_dir.glob("*.log")},
                   key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    for name in names:
        j = run_dir / f"{name}.json"
        if j.is_file():
            out[name] = json.loads(j.read_text())
        else:
            log = (run_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
            out[name] = {"bench": name, "error": " | ".join(log[-5:])[-600:] or "no output"}
    return out


def markdown(results: dict[str, dict], label: str) -> str:
    """A RESULTS.md section: the machine and versions, then one entry per benchmark with its command."""
    env = next((r["env"] for r in results.values() if "env" in r), {})
    v = env.get("versions", {})
    lines = [f"## {label}", "",
             f"- date: {env.get('date', '?')}; host: {env.get('host', '?')}; machine: {env.get('machine', '?')}; "
             f"device: {env.get('gpu', env.get('device', '?'))}; torch threads: {env.get('torch_threads', '?')}; "
             f"1-min load average at start: {env.get('loadavg_1m', '?')}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; commit {env.get('commit')}", ""]
    for name, r in results.items():
        if "error" in r:
            lines += [f"### {name}", "", f"FAILED: `{r['error']}`", ""]
            continue
        lines += [f"### {name}", "", f"`{r['command']}`", "", f"**{r['summary']}**", ""]
        rows = r.get("rows")
        if rows:
            cols = [c for c in rows[0] if not isinstance(rows[0][c], (list, dict))]
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for row in rows:
                lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("out_json")
    p.add_argument("results_md")
    p.add_argument("--label", default="Benchmark run")
    a = p.parse_args(argv)
    results = load_run(Path(a.run_dir))
    Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out_json).write_text(json.dumps(results, indent=1))
    md = Path(a.results_md)
    head = md.read_text() if md.is_file() else "# Benchmark results\n\n"
    md.write_text(head.rstrip("\n") + "\n\n" + markdown(results, a.label))
    print(f"wrote {a.out_json} and appended to {md}")


if __name__ == "__main__":
    main()
