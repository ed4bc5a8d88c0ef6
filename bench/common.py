"""What the benchmarks share: arguments, the environment record, the raw timm+torch yardstick, stand-in pipelines and
result output.

Every benchmark measures its own raw baseline in the same run on the same machine and prints a ratio against it
(design.md section 6). ``--quick`` sizes a run for a CPU (each under 2 minutes); without it, and on a GPU, the sizes
are the ones the targets refer to. ``--json PATH`` also writes the result as JSON (``bench/run_all.sh`` collects
them).

``python bench/common.py raw ARCH PX BATCH SECONDS THREADS DEVICE`` is one raw training process (used by
``bench/packing.py`` to pack raw processes on a device): it prints one JSON line with its img/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python bench/NAME.py` from anywhere
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local Ray clusters started by benchmarks run without token auth

import torch  # noqa: E402

from mlfd.config import (PipelineSpec, RecipeSpec, apply_overrides, from_dict, load_pipeline,  # noqa: E402
                         smoke_pipeline, to_dict)
from mlfd.engine import amp_dtype, autocast, build_optimizer, resolve_device, use_channels_last  # noqa: E402

PIPELINE = ROOT / "pipelines" / "offline_default.yaml"
RESULTS_DIR = ROOT / "bench" / "results"
PACKAGES = ("torch", "timm", "ray", "optuna", "mlflow", "pyarrow", "numpy")


# --------------------------------------------------------------------------------------------------------------------
# Arguments, environment, output
# --------------------------------------------------------------------------------------------------------------------


def parse_args(doc: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The arguments every benchmark takes: ``--quick``, ``--json PATH``, ``--device``."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--quick", action="store_true", help="CPU-sized run (under 2 minutes)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on a CPU, where more threads than free cores make OpenMP spin "
                        "and figures swing 10x on a shared machine; torch's default on a GPU)")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> torch.device:
    """The device of a run; sets the torch CPU threads (``--threads``)."""
    device = bench_device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return device


def versions() -> dict[str, str]:
    """Installed versions of the packages the figures depend on (without importing them)."""
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: torch.device) -> dict[str, Any]:
    """Where and when a figure was measured: host, date, machine, device, versions, load."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "commit": _git_commit(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def bench_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    return resolve_device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict[str, Any]], cols: Sequence[str] | None = None) -> str:
    """A plain fixed-width text table."""
    if not rows:
        return "(no rows)"
    cols = list(cols or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def emit(name: str, args: argparse.Namespace, device: torch.device, result: dict[str, Any], summary: str,
         command: str | None = None) -> dict[str, Any]:
    """Print the one-line summary and write ``--json``; returns the full record."""
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--json" and (i == 0 or sys.argv[i] != "--json")]
    record = {"bench": name, "command": command or " ".join([f"python bench/{name}.py"] + argv),
              "quick": bool(args.quick), "env": env_info(device), "summary": summary, **result}
    print(f"\n{name}: {summary}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=float))
    return record


# --------------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------------


def load_spec(quick: bool, overrides: Sequence[str] = ()) -> PipelineSpec:
    """The offline default pipeline (its smoke variant if quick: 300 train images per dataset, batch 32, 3 epochs),
    then ``overrides`` (``--set`` syntax), which win over the smoke variant's caps."""
    spec = load_pipeline(PIPELINE)
    if quick:
        spec = smoke_pipeline(spec)
    return from_dict(PipelineSpec, apply_overrides(to_dict(spec), list(overrides)), path="bench pipeline")


def standin_context(spec: PipelineSpec, stage: str, tmp: Path, device: torch.device):
    """A :class:`mlfd.stages.common.Context` over a fresh store in ``tmp`` with randomly initialised stand-in
    teachers (:func:`mlfd.tune.packing.standin_spec`): the upstream's shapes and costs without training teachers."""
    from mlfd.stages.common import Context
    from mlfd.store import ArtifactStore
    from mlfd.tune.packing import standin_spec

    (tmp / "weights").mkdir(parents=True, exist_ok=True)
    s = standin_spec(spec, tmp / "weights", stage)
    s.device = device.type
    return Context(spec=s, store=ArtifactStore(tmp / "store"), progress=False)


def recipe_flags(device: torch.device, recipe: RecipeSpec) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, channels_last) that a recipe gets on a device: what the raw baseline must use too."""
    return amp_dtype(device, recipe.amp), use_channels_last(device, recipe.channels_last)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------------
# The raw yardstick: plain timm + torch on random tensors already on the device
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RawLoop:
    """Plain timm+torch training: ``timm.create_model``, the recipe's optimizer, autocast and memory format, random
    normalized inputs and labels on the device, cross-entropy. No data pipeline, no bookkeeping: the ceiling."""

    arch: str
    px: int
    batch: int
    num_classes: int
    device: torch.device
    recipe: RecipeSpec = dataclasses.field(default_factory=RecipeSpec)

    def __post_init__(self) -> None:
        import timm

        self.dtype, self.channels_last = recipe_flags(self.device, self.recipe)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = timm.create_model(self.arch, num_classes=self.num_classes).to(self.device, memory_format=fmt)
        self.model.train()
        self.opt = build_optimizer(self.model.parameters(), self.recipe)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype is torch.float16 else None
        self.x = torch.randn(self.batch, 3, self.px, self.px, device=self.device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, self.num_classes, (self.batch,), device=self.device)

    def step(self) -> None:
        with autocast(self.device, self.dtype):
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def throughput(self, steps: int = 10, warmup: int = 3, seconds: float | None = None) -> float:
        """Training img/s over ``steps`` steps (or as many as fit in ``seconds``) after ``warmup`` steps."""
        for _ in range(warmup):
            self.step()
        sync(self.device)
        n, t0 = 0, time.perf_counter()
        while (n < steps) if seconds is None else (time.perf_counter() - t0 < seconds):
            self.step()
            n += 1
        sync(self.device)
        return n * self.batch / (time.perf_counter() - t0)


def raw_throughput(arch: str, px: int, batch: int, num_classes: int, device: torch.device, recipe: RecipeSpec,
                   steps: int = 10, warmup: int = 3, cudnn_benchmark: bool | None = None) -> float:
    """img/s of a :class:`RawLoop` (``cudnn_benchmark`` sets ``torch.backends.cudnn.benchmark`` for the run)."""
    old = torch.backends.cudnn.benchmark
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        loop = RawLoop(arch, px, batch, num_classes, device, recipe)
        return loop.throughput(steps=steps, warmup=warmup)
    finally:
        torch.backends.cudnn.benchmark = old


def spawn_raw(arch: str, px: int, batch: int, seconds: float, threads: int, device: str,
              cudnn_benchmark: bool = True) -> subprocess.Popen:
    """Start one raw training process (``python bench/common.py raw ...``).

    It warms up, prints ``ready`` and waits for a line on stdin before its timed window, so that the windows of
    processes started together overlap (:func:`collect_raw` releases them all at once); then it prints
    ``{"img_s": ...}``.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "raw", arch, str(px), str(batch), str(seconds), str(threads),
           device, "1" if cudnn_benchmark else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def collect_raw(procs: list[subprocess.Popen], timeout: float) -> list[float]:
    """Wait until every raw process is warm, start their timed windows together, return each one's img/s (0.0 for
    one that failed)."""
    ready = [p.stdout.readline().strip() == "ready" for p in procs]  # blocks until each is warm (or has died)
    for p, ok in zip(procs, ready):
        if ok:
            p.stdin.write("go\n")
            p.stdin.flush()
    out = []
    for p, ok in zip(procs, ready):
        try:
            stdout, _ = p.communicate(timeout=timeout)
            out.append(float(json.loads(stdout.strip().splitlines()[-1])["img_s"]) if ok else 0.0)
        except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError):
            p.kill()
            out.append(0.0)
        if out[-1] == 0.0:
            print(f"raw process failed: {(p.stderr.read() if p.stderr else '')[-300:]}", file=sys.stderr)
    return out


def _raw_main(argv: list[str]) -> None:
    arch, px, batch, seconds, threads, device, bench = argv
    torch.set_num_threads(int(threads))
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = bench == "1"
    loop = RawLoop(arch, int(px), int(batch), 10, dev, RecipeSpec())
    loop.throughput(steps=0, warmup=5)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent releases every process at once
    img_s = loop.throughput(warmup=0, seconds=float(seconds))
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    print(json.dumps({"img_s": img_s, "peak_bytes": peak}), flush=True)


def tmpdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"mlfd-bench-{prefix}-")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        _raw_main(sys.argv[2:])
    else:
        sys.exit("usage: python bench/common.py raw ARCH PX BATCH SECONDS THREADS DEVICE CUDNN_BENCHMARK(0|1)")
