"""The package's layers, read from the source (AST, nothing imported): no import cycle, and dependencies point down.

Layers, lowest first. A module may import from its own layer or a lower one; function-level (lazy) imports count
the same as top-level ones.

    0  mlfd, mlfd.errors, mlfd.fileio, mlfd.config,  error types, atomic writes, typed specs and YAML; a search's
       mlfd.search                                   job file and its prepared plan (OUT/search.json)
    1  mlfd.losses                                   the terms of Eq. (3)
    2  mlfd.data                                     sources, splits, transforms, loaders
    3  mlfd.models                                   levels of timm models, adaptors, joint teacher, student
    4  mlfd.store                                    content-addressed artifacts, feature cache
    5  mlfd.engine                                   the train/eval loop, optimizers, schedules
    6  mlfd.stages                                   teachers, caches, joint, students, baselines, pipeline
    7  mlfd.tracking                                 MLflow runs
    8  mlfd.tune                                     Ray Tune + Optuna search
    9  mlfd.report                                   tables, plots, search analysis
   10  mlfd.cli, mlfd.ui, mlfd.plan                  entry points (ui launches MLflow's UI; plan, when it comes,
                                                     describes what a command will run, for the CLI)

Third-party frameworks stay in their layer: only ``mlfd.tune`` imports ray and optuna; only ``mlfd.tracking`` and
``mlfd.tune.mlflow_callback`` import mlflow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mlfd"

LAYERS: list[tuple[str, ...]] = [
    ("mlfd", "mlfd.errors", "mlfd.fileio", "mlfd.config", "mlfd.search"),
    ("mlfd.losses",),
    ("mlfd.data",),
    ("mlfd.models",),
    ("mlfd.store",),
    ("mlfd.engine",),
    ("mlfd.stages",),
    ("mlfd.tracking",),
    ("mlfd.tune",),
    ("mlfd.report",),
    ("mlfd.cli", "mlfd.ui", "mlfd.plan"),
]

FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "ray": ("mlfd.tune",),
    "optuna": ("mlfd.tune",),
    "mlflow": ("mlfd.tracking", "mlfd.tune.mlflow_callback"),
}
"""Third-party package -> the only mlfd modules (or packages) allowed to import it."""


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = modules()


def imported_names(name: str) -> set[str]:
    """Absolute dotted names module ``name`` imports, at any depth of its source."""
    f = MODULES[name]
    return imports_of(f.read_text(), name if f.name == "__init__.py" else name.rpartition(".")[0])


def imports_of(source: str, package: str) -> set[str]:
    """Absolute dotted names a source imports anywhere (in functions too); ``from a import b`` gives ``a`` and
    ``a.b``; relative imports are resolved against ``package``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def internal_edges(name: str) -> set[str]:
    """The mlfd modules ``name`` imports (longest known prefix of each imported name), itself excluded."""
    out = set()
    for n in imported_names(name):
        while n and n not in MODULES:
            n = n.rpartition(".")[0]
        if n and n != name:
            out.add(n)
    return out


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> int:
    """Index of the layer of a module: its longest matching prefix in :data:`LAYERS`."""
    best, depth = None, -1
    for i, members in enumerate(LAYERS):
        for m in members:
            if within(name, m) and m.count(".") > depth and (m != "mlfd" or name == "mlfd"):
                best, depth = i, m.count(".")
    assert best is not None, f"{name} is in no layer: add it to LAYERS in {__file__} (and to the table above)"
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def test_every_module_is_in_a_layer() -> None:
    for name in MODULES:
        layer(name)


def test_no_import_cycles() -> None:
    found = cycles({m: internal_edges(m) for m in MODULES})
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_layers() -> None:
    bad = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
           for m in MODULES for t in sorted(internal_edges(m)) if layer(t) > layer(m)]
    assert bad == [], "imports against the layer order:\n" + "\n".join(bad)


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_frameworks_stay_in_their_layer(framework: str) -> None:
    allowed = FRAMEWORKS[framework]
    bad = [m for m in MODULES if not any(within(m, a) for a in allowed)
           and any(within(n, framework) for n in imported_names(m))]
    assert bad == [], f"only {', '.join(allowed)} may import {framework}; also imported by: {', '.join(bad)}"


def test_the_checker_sees_lazy_relative_and_upward_imports() -> None:
    """The reader itself: function-level, nested and relative imports are found, and so is a cycle."""
    src = ("def f():\n    if True:\n        from mlfd.tune import spaces\n    import optuna.samplers\n"
           "from . import engine\nfrom ..store import ArtifactStore\n")
    assert imports_of(src, "mlfd.stages") == {"mlfd.tune", "mlfd.tune.spaces", "optuna.samplers", "mlfd.stages",
                                              "mlfd.stages.engine", "mlfd.store", "mlfd.store.ArtifactStore"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("mlfd.tune.spaces") > layer("mlfd.stages.joint") > layer("mlfd.config")
    assert layer("mlfd") == 0 and layer("mlfd.ui") == layer("mlfd.cli")
