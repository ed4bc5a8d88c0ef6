"""Loading a search-space file: each param name checked against the pipeline spec's dataclasses, each definition
(kind, bounds, choices, ``when``) validated, with one-line errors naming the file, the param and the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

from mlfd.config import MAX_LEVEL, DatasetSpec, PipelineSpec, StudentSpec, admits, is_number, read_yaml, type_name
from mlfd.errors import SpecError
from mlfd.tune.spaces.model import FUSION_LEVEL, OPS, Param, SearchSpace

KINDS = ("float", "int", "categorical", "fixed")
TOP_KEYS = ("description", "params")
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "float": ("type", "low", "high", "log", "step", "when"),
    "int": ("type", "low", "high", "log", "step", "when"),
    "categorical": ("type", "choices", "when"),
    "fixed": ("type", "value", "when"),
}
_ORDER_OPS = ("lt", "le", "gt", "ge")
_LIST_ITEMS: dict[tuple[type, str], type] = {(PipelineSpec, "datasets"): DatasetSpec}


# --------------------------------------------------------------------------------------------------------------------
# Name validation against the spec dataclasses
# --------------------------------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    """``Optional[X]`` -> X for dataclasses (so ``datasets.x.student_model.arch`` walks into ModelSpec)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return tp


def _is_container(tp: Any, kind: type) -> bool:
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_container(a, kind) for a in typing.get_args(tp))
    return tp is kind or typing.get_origin(tp) is kind


def _field_names(cls: type) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls))


def resolve_name(name: str) -> Any:
    """Check a dotted param name against the pipeline spec and return the type of the field it sets.

    Args:
        name: ``fusion_level``, a dotted path such as ``student.recipe.lr`` or ``datasets.mnist.model.arch``, or
            ``student.betas.<level>``.

    Returns:
        The leaf's type hint (``int`` for ``fusion_level``; ``typing.Any`` for free-form mapping entries).

    Raises:
        SpecError: Message ``<name>: ...`` saying which part is unknown and what is allowed there.
    """
    if name == FUSION_LEVEL:
        return int
    parts = name.split(".")
    if any(not p for p in parts):
        raise SpecError(f"{name}: empty part in dotted name")
    top = sorted(_field_names(PipelineSpec) + [FUSION_LEVEL])
    cls: type = PipelineSpec
    tp: Any = PipelineSpec
    i = 0
    while i < len(parts):
        part = parts[i]
        where = ".".join(parts[: i + 1])
        hints = typing.get_type_hints(cls)
        if part not in hints:
            allowed = top if cls is PipelineSpec else _field_names(cls)
            raise SpecError(f"{name}: unknown field {part!r} at {where}; allowed: {', '.join(allowed)}")
        tp = _unwrap_optional(hints[part])
        item_cls = _LIST_ITEMS.get((cls, part))
        last = i == len(parts) - 1
        if item_cls is not None:
            if last or i + 1 == len(parts) - 1:
                raise SpecError(f"{name}: name a field of one dataset, as datasets.<dataset_name>.<field>; "
                                f"allowed fields: {', '.join(_field_names(item_cls))}")
            if parts[i + 2] == "name":
                raise SpecError(f"{name}: a dataset's name cannot be searched (params address datasets by name)")
            cls, tp, i = item_cls, item_cls, i + 2
            continue
        if cls is StudentSpec and part == "betas":
            if last:
                raise SpecError(f"{name}: name one level, as student.betas.<level> with level in 1..{MAX_LEVEL}")
            lvl = parts[i + 1]
            if not (lvl.isdigit() and str(int(lvl)) == lvl and 1 <= int(lvl) <= MAX_LEVEL) or i + 2 != len(parts):
                raise SpecError(f"{name}: unknown beta level {'.'.join(parts[i + 1:])!r}; allowed: 1..{MAX_LEVEL}")
            return float
        if dataclasses.is_dataclass(tp):
            if last:
                raise SpecError(f"{name}: is a mapping; name one of its fields: {', '.join(_field_names(tp))}")
            cls, i = tp, i + 1
            continue
        if _is_container(tp, dict):
            if last:
                raise SpecError(f"{name}: is a free-form mapping; name one of its keys, as {name}.<key>")
            return Any
        if not last:
            raise SpecError(f"{name}: {where} is a scalar field and has no field {parts[i + 1]!r}")
        if _is_container(tp, list):
            hint = f"; search {FUSION_LEVEL!r} instead" if where == "fusion_levels" else ""
            raise SpecError(f"{name}: is a list field; a search param must name a scalar field{hint}")
        return tp
    return tp  # pragma: no cover - the loop always returns or raises


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _parse_param(name: Any, raw: Any, earlier: dict[str, Param], where: str) -> Param:
    """Validate one param definition. ``where`` is ``<file>: params`` and prefixes every message."""
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}: param names must be non-empty strings, got {name!r}")
    at = f"{where}.{name}"
    if not isinstance(raw, dict):
        raise SpecError(f"{at}: expected a mapping such as {{type: float, low: 0.0, high: 1.0}}, got {raw!r}")
    try:
        leaf = resolve_name(name)
    except SpecError as e:
        raise SpecError(f"{where}.{e}") from None
    if name in earlier:
        raise SpecError(f"{at}: declared twice")
    kind = raw.get("type")
    if kind not in KINDS:
        raise SpecError(f"{at}.type: {'required' if kind is None else f'unknown type {kind!r}'}; "
                        f"allowed: {', '.join(KINDS)}")
    allowed = _KIND_KEYS[kind]
    for key in raw:
        if key not in allowed:
            raise SpecError(f"{at}.{key}: unknown key for type {kind}; allowed: {', '.join(allowed)}")
    p = Param(name=name, kind=kind)
    if kind in ("float", "int"):
        _parse_range(p, raw, leaf, at)
    elif kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{at}.choices: required non-empty list of scalars, got {choices!r}")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise SpecError(f"{at}.choices: choices must be scalars (number, string, bool, null), got {c!r}")
            if not admits(leaf, c):
                raise SpecError(f"{at}.choices: {name} expects {type_name(leaf)}, got {c!r}")
        if len({(type(c), c) for c in choices}) != len(choices):
            raise SpecError(f"{at}.choices: has duplicates: {choices}")
        p.choices = list(choices)
    else:
        if "value" not in raw:
            raise SpecError(f"{at}.value: required for type fixed")
        if not admits(leaf, raw["value"]):
            raise SpecError(f"{at}.value: {name} expects {type_name(leaf)}, got {raw['value']!r}")
        p.value = raw["value"]
    if name == FUSION_LEVEL:
        _check_fusion_domain(p, at)
    p.when = _parse_when(raw.get("when", {}), earlier, f"{at}.when")
    return p


def _parse_range(p: Param, raw: dict, leaf: Any, at: str) -> None:
    """Fill low/high/log/step of a float or int param, checking types, order, log and step."""
    is_int = p.kind == "int"
    for key in ("low", "high"):
        if key not in raw:
            raise SpecError(f"{at}.{key}: required for type {p.kind}")
        v = raw[key]
        ok = isinstance(v, int) and not isinstance(v, bool) if is_int else is_number(v)
        if not ok:
            raise SpecError(f"{at}.{key}: expected {'an integer' if is_int else 'a number'}, got {v!r}")
    low, high = raw["low"], raw["high"]
    if not low < high:
        raise SpecError(f"{at}.low: must be < high, got low={low}, high={high}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{at}.log: expected true/false, got {log!r}")
    if log and low <= 0:
        raise SpecError(f"{at}.log: a log scale needs low > 0, got low={low}")
    step = raw.get("step")
    if step is not None:
        ok = isinstance(step, int) and not isinstance(step, bool) if is_int else is_number(step)
        if not ok or step <= 0:
            raise SpecError(f"{at}.step: expected a positive {'integer' if is_int else 'number'}, got {step!r}")
        if log and (not is_int or step != 1):
            raise SpecError(f"{at}.step: cannot be combined with log: true")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9:
            raise SpecError(f"{at}.step: high - low ({high} - {low}) must be a multiple of step {step}")
    if is_int:
        if not admits(leaf, 1):
            raise SpecError(f"{at}.type: {p.name} expects {type_name(leaf)}, not an integer range")
    elif not admits(leaf, 0.5):
        hint = "; use type: int" if admits(leaf, 1) else ""
        raise SpecError(f"{at}.type: {p.name} expects {type_name(leaf)}, not a float range{hint}")
    p.low, p.high, p.log = (low, high, log) if is_int else (float(low), float(high), log)
    p.step = (step or 1) if is_int else (None if step is None else float(step))


def _check_fusion_domain(p: Param, at: str) -> None:
    """``fusion_level`` must only take integer levels in 1..MAX_LEVEL."""
    if p.kind == "float":
        raise SpecError(f"{at}.type: {FUSION_LEVEL} is an integer level; use int or categorical")
    values = p.choices if p.kind == "categorical" else [p.value] if p.kind == "fixed" else [p.low, p.high]
    for v in values:
        if not 1 <= v <= MAX_LEVEL:
            key = {"categorical": "choices", "fixed": "value"}.get(p.kind, "low" if v == p.low else "high")
            raise SpecError(f"{at}.{key}: fusion levels must be in 1..{MAX_LEVEL}, got {v}")


def _domain_numeric(p: Param) -> bool:
    if p.kind in ("float", "int"):
        return True
    values = p.choices if p.kind == "categorical" else [p.value]
    return all(is_number(v) for v in values)


def _parse_when(raw: Any, earlier: dict[str, Param], at: str) -> dict:
    """Validate a ``when`` mapping: only earlier params, known ops, comparable values."""
    if not isinstance(raw, dict):
        raise SpecError(f"{at}: expected a mapping {{earlier_param: {{op: value}}}}, got {raw!r}")
    out: dict = {}
    for ref, conds in raw.items():
        if ref not in earlier:
            declared = ", ".join(earlier) or "none"
            raise SpecError(f"{at}.{ref}: a condition may only refer to a param declared earlier; "
                            f"declared so far: {declared}")
        if not isinstance(conds, dict) or not conds:
            raise SpecError(f"{at}.{ref}: expected a mapping {{op: value}} with op in {', '.join(OPS)}, got {conds!r}")
        for op, v in conds.items():
            if op not in OPS:
                raise SpecError(f"{at}.{ref}.{op}: unknown op; allowed: {', '.join(OPS)}")
            if op == "in":
                if not isinstance(v, list) or not v:
                    raise SpecError(f"{at}.{ref}.in: expected a non-empty list, got {v!r}")
            elif op in _ORDER_OPS:
                if not is_number(v):
                    raise SpecError(f"{at}.{ref}.{op}: expected a number, got {v!r}")
                if not _domain_numeric(earlier[ref]):
                    raise SpecError(f"{at}.{ref}.{op}: {ref} is not numeric; use eq, ne or in")
            elif isinstance(v, (list, dict)):
                raise SpecError(f"{at}.{ref}.{op}: expected a scalar, got {v!r}")
        out[ref] = dict(conds)
    return out


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space file.

    Args:
        path: A YAML file with ``description`` (optional) and ``params``.

    Returns:
        The validated space.

    Raises:
        SpecError: One line ``<file>: params.<name>.<key>: ...`` naming what is wrong and what is allowed.
    """
    data = read_yaml(path)
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError(f"{path}: {key}: unknown top-level key; allowed: {', '.join(TOP_KEYS)}")
    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise SpecError(f"{path}: description: expected a string, got {description!r}")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SpecError(f"{path}: params: required non-empty mapping of param name -> definition")
    earlier: dict[str, Param] = {}
    for name, raw in raw_params.items():
        earlier[name] = _parse_param(name, raw, earlier, f"{path}: params")
    return SearchSpace(path=str(path), description=description, params=list(earlier.values()))
