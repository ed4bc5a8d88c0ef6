"""Declarative search spaces (``search_spaces/*.yaml``) turned into Optuna define-by-run functions.

A space file is YAML data, never code::

    description: Per-student MLFD search
    params:
      fusion_level: {type: categorical, choices: [1, 2, 3, 4]}
      student.temperature: {type: float, low: 1.0, high: 8.0, log: true}
      student.betas.3: {type: float, low: 0.0, high: 1.0, when: {fusion_level: {ge: 3}}}

Each param name is a dotted path into :class:`mlfd.config.PipelineSpec` (checked against the dataclass type hints),
``datasets.<dataset_name>.<field...>`` for per-dataset fields, ``student.betas.<level>`` for beta_c, or the special
``fusion_level`` (one level k, applied as ``fusion_levels: [k]``). Param kinds are ``float``, ``int``,
``categorical`` and ``fixed``; ``when`` makes a param exist only when conditions on earlier params hold.

Optuna and Ray are imported lazily, so loading and sampling a space stays cheap.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

from mlfd.config import MAX_LEVEL, DatasetSpec, PipelineSpec, StudentSpec, read_yaml, set_path
from mlfd.errors import SpecError

FUSION_LEVEL = "fusion_level"
"""The special param name: one fusion level k, applied to a pipeline as ``fusion_levels: [k]``."""

LEVEL_STAGES = ("students", "joint")
"""Stages whose trial trains one fusion level (``fusion_levels[0]`` of the trial's pipeline)."""
COVER_LIMIT = 4096
"""Most combinations of condition branches :meth:`SearchSpace.cover` enumerates."""

KINDS = ("float", "int", "categorical", "fixed")
TOP_KEYS = ("description", "params")
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "float": ("type", "low", "high", "log", "step", "when"),
    "int": ("type", "low", "high", "log", "step", "when"),
    "categorical": ("type", "choices", "when"),
    "fixed": ("type", "value", "when"),
}
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "in": lambda a, b: a in b,
}
_ORDER_OPS = ("lt", "le", "gt", "ge")
_LIST_ITEMS: dict[tuple[type, str], type] = {(PipelineSpec, "datasets"): DatasetSpec}
_ANY = object()
"""Leaf type of free-form mapping entries (``options.<key>``, ``kwargs.<key>``): any value is accepted."""


# --------------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Param:
    """One searched (or fixed) parameter of a space, in declaration order.

    Attributes:
        name: Dotted path into the pipeline spec, or ``fusion_level``.
        kind: One of ``float``, ``int``, ``categorical``, ``fixed``.
        low: Lower bound (float/int kinds), else None.
        high: Upper bound, inclusive (float/int kinds), else None.
        log: Sample on a log scale (float/int kinds).
        step: Discretization step (float: None for continuous; int: 1 by default).
        choices: The candidate values (categorical kind), else None.
        value: The constant (fixed kind), else None.
        when: Conditions ``{earlier_param: {op: value, ...}}``; all must hold for this param to exist.
    """

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None
    value: Any = None
    when: dict = field(default_factory=dict)

    def active(self, values: dict) -> bool:
        """Whether this param exists given the values of earlier params (a missing reference fails the condition).

        Args:
            values: Flat mapping of already decided param names to values.

        Returns:
            True when every condition in ``when`` holds.
        """
        for ref, conds in self.when.items():
            if ref not in values:
                return False
            for op, target in conds.items():
                if not OPS[op](values[ref], target):
                    return False
        return True

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial (or Ray's wrapper of one) for this param's value; not for the fixed kind.

        Args:
            trial: An ``optuna.trial.Trial``-like object with ``suggest_float/int/categorical``.

        Returns:
            The suggested value.
        """
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        raise ValueError(f"param {self.name}: a fixed param is not suggested")

    def draw(self, rng: random.Random) -> Any:
        """Draw a value without Optuna (uniform, log-uniform or stepped, like Optuna's distributions).

        Args:
            rng: The random source.

        Returns:
            A value inside this param's domain.
        """
        if self.kind == "fixed":
            return copy.deepcopy(self.value)
        if self.kind == "categorical":
            return rng.choice(self.choices)
        if self.kind == "int":
            step = self.step or 1
            if self.log:
                x = math.exp(rng.uniform(math.log(self.low - 0.5), math.log(self.high + 0.5)))
                return int(min(self.high, max(self.low, round(x))))
            return self.low + step * rng.randint(0, (self.high - self.low) // step)
        if self.log:
            return float(min(self.high, max(self.low, math.exp(rng.uniform(math.log(self.low), math.log(self.high))))))
        if self.step:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            return float(min(self.high, self.low + self.step * rng.randint(0, n)))
        return rng.uniform(self.low, self.high)


@dataclass
class SearchSpace:
    """A loaded, validated search space (see :func:`load_space`).

    Attributes:
        path: The file it was loaded from (used in error messages).
        description: Free text from the file.
        params: The params in declaration order (conditions only refer to earlier params).
    """

    path: str
    description: str
    params: list[Param]

    def names(self) -> list[str]:
        """All param names, in declaration order (conditional ones included)."""
        return [p.name for p in self.params]

    def define_by_run(self, trial: Any) -> dict | None:
        """Optuna define-by-run function for ``ray.tune.search.optuna.OptunaSearch(space=...)``.

        Suggests, in order, only the params whose condition holds, and returns the active fixed params as constants
        (Ray merges them into the trial config).

        Args:
            trial: An Optuna trial (or Ray's suggest-capturing wrapper of one).

        Returns:
            The active fixed params (possibly empty).
        """
        values: dict = {}
        constants: dict = {}
        for p in self.params:
            if not p.active(values):
                continue
            if p.kind == "fixed":
                values[p.name] = constants[p.name] = copy.deepcopy(p.value)
            else:
                values[p.name] = p.suggest(trial)
        return constants

    def sample(self, rng: random.Random | None = None, trial: Any = None) -> dict:
        """A valid flat config (conditions respected), without Ray.

        Args:
            rng: Random source used when no ``trial`` is given (a fresh unseeded one if None).
            trial: Optional Optuna trial; when given, values are suggested by it instead of drawn from ``rng``.

        Returns:
            Flat mapping param name -> value, active params only, fixed params included.
        """
        if trial is not None:
            values: dict = {}
            for p in self.params:
                if p.active(values):
                    values[p.name] = copy.deepcopy(p.value) if p.kind == "fixed" else p.suggest(trial)
            return values
        rng = rng if rng is not None else random.Random()
        values = {}
        for p in self.params:
            if p.active(values):
                values[p.name] = p.draw(rng)
        return values

    def cover(self, limit: int = COVER_LIMIT) -> list[dict]:
        """Flat configs that together take every branch of the space, deterministically (no random draws).

        Every param referenced by a ``when`` condition (a "driver") is enumerated jointly over its representative
        values (see :func:`representatives`): each choice of a categorical, and for a range its bounds, every
        condition threshold on it and a value between (or next to) consecutive thresholds. A condition is a
        conjunction of comparisons of drivers against those thresholds, so its truth value is constant between
        consecutive representatives: every combination of condition outcomes that some sample can reach is
        reached by one of these configs. Every other param takes its first representative there, and each of its
        other representatives (range bounds, every choice) once more in a config where it is active.

        Args:
            limit: Most driver combinations to enumerate.

        Returns:
            Flat configs (active params only, fixed params included), in a fixed order.

        Raises:
            SpecError: The conditions have more than ``limit`` branch combinations.
        """
        thresholds: dict[str, list] = {}
        for p in self.params:
            for ref, conds in p.when.items():
                for op, v in conds.items():
                    thresholds.setdefault(ref, []).extend(v if op == "in" else [v])
        reps = {p.name: representatives(p, thresholds.get(p.name, [])) for p in self.params}
        configs: list[dict] = [{}]
        for p in self.params:
            values = reps[p.name] if p.name in thresholds else reps[p.name][:1]
            branched: list[dict] = []
            for c in configs:
                branched.extend([{**c, p.name: copy.deepcopy(v)} for v in values] if p.active(c) else [c])
            configs = branched
            if len(configs) > limit:
                raise SpecError(f"{self.path}: params: the when-conditions make more than {limit} branch "
                                f"combinations to check (at {p.name}); condition on fewer params")
        extra = []
        for p in self.params:
            base = next((c for c in configs if p.name in c), None)
            if p.name not in thresholds and base is not None:
                extra.extend({**base, p.name: copy.deepcopy(v)} for v in reps[p.name][1:])
        return configs + extra

    def dataset_names(self) -> set[str]:
        """Dataset names the params address through ``datasets.<name>.…``."""
        return {p.name.split(".")[1] for p in self.params if p.name.startswith("datasets.")}

    def check_pipeline(self, pipeline: dict) -> None:
        """Check that every dataset a param addresses exists in a pipeline dict.

        Args:
            pipeline: A pipeline as a plain dict (as read from YAML).

        Raises:
            SpecError: A param names a dataset the pipeline does not have.
        """
        known = [d.get("name") for d in pipeline.get("datasets") or [] if isinstance(d, dict)]
        for p in self.params:
            parts = p.name.split(".")
            if parts[0] == "datasets" and not parts[1].lstrip("-").isdigit() and parts[1] not in known:
                raise SpecError(f"{self.path}: params.{p.name}: unknown dataset {parts[1]!r}; allowed: {known}")


def representatives(p: Param, thresholds: list) -> list:
    """Values of ``p`` that take every outcome of comparisons against ``thresholds`` that its domain allows.

    A fixed param gives its value, a categorical every choice. A range gives its bounds and every threshold inside
    it; when there are thresholds, a continuous one also the midpoint between each two consecutive such values, a
    discrete one (int, or float with a step) the grid values next to each threshold instead (both grid neighbours
    of one off the grid).

    Args:
        p: The param.
        thresholds: Values that conditions compare ``p`` with (any type: non-numbers are ignored for ranges).

    Returns:
        Distinct values inside the domain, in a fixed order (the first is the domain's first choice or its low).
    """
    if p.kind == "fixed":
        return [p.value]
    if p.kind == "categorical":
        return list(p.choices)
    low, high = p.low, p.high
    numbers = [t for t in thresholds if _is_number(t)]
    step = p.step if p.kind == "float" else (p.step or 1)
    if step:  # grid index k of the grid value at or below t: k - 1, k, k + 1 around t on the grid, k, k + 1 off it
        near = {math.floor((t - low) / step + 1e-9) + d for t in numbers for d in (-1, 0, 1, 2)}
        points = {low, high} | {round(low + k * step, 12) for k in near if low <= low + k * step <= high}
    else:
        points = {low, high} | {t for t in numbers if low <= t <= high}
        if len(points) > 2:
            points |= {(a + b) / 2 for a, b in zip(sorted(points), sorted(points)[1:])}
    cast = int if p.kind == "int" else float
    return [cast(v) for v in sorted(points, key=lambda v: (v != low, v))]


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
        The leaf's type hint (``int`` for ``fusion_level``; an internal "any" marker for free-form mapping entries).

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
            return _ANY
        if not last:
            raise SpecError(f"{name}: {where} is a scalar field and has no field {parts[i + 1]!r}")
        if _is_container(tp, list):
            hint = f"; search {FUSION_LEVEL!r} instead" if where == "fusion_levels" else ""
            raise SpecError(f"{name}: is a list field; a search param must name a scalar field{hint}")
        return tp
    return tp  # pragma: no cover - the loop always returns or raises


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _admits(tp: Any, v: Any) -> bool:
    """Whether a field of type ``tp`` accepts the scalar value ``v`` (mirrors ``mlfd.config.from_dict``)."""
    if tp is _ANY or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_admits(a, v) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return _is_number(v)
    if tp is str:
        return isinstance(v, str)
    return False


def _type_name(tp: Any) -> str:
    if tp is _ANY:
        return "any value"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


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
            if not _admits(leaf, c):
                raise SpecError(f"{at}.choices: {name} expects {_type_name(leaf)}, got {c!r}")
        if len({(type(c), c) for c in choices}) != len(choices):
            raise SpecError(f"{at}.choices: has duplicates: {choices}")
        p.choices = list(choices)
    else:
        if "value" not in raw:
            raise SpecError(f"{at}.value: required for type fixed")
        if not _admits(leaf, raw["value"]):
            raise SpecError(f"{at}.value: {name} expects {_type_name(leaf)}, got {raw['value']!r}")
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
        ok = isinstance(v, int) and not isinstance(v, bool) if is_int else _is_number(v)
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
        ok = isinstance(step, int) and not isinstance(step, bool) if is_int else _is_number(step)
        if not ok or step <= 0:
            raise SpecError(f"{at}.step: expected a positive {'integer' if is_int else 'number'}, got {step!r}")
        if log and (not is_int or step != 1):
            raise SpecError(f"{at}.step: cannot be combined with log: true")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9:
            raise SpecError(f"{at}.step: high - low ({high} - {low}) must be a multiple of step {step}")
    if is_int:
        if not _admits(leaf, 1):
            raise SpecError(f"{at}.type: {p.name} expects {_type_name(leaf)}, not an integer range")
    elif not _admits(leaf, 0.5):
        hint = "; use type: int" if _admits(leaf, 1) else ""
        raise SpecError(f"{at}.type: {p.name} expects {_type_name(leaf)}, not a float range{hint}")
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
    return all(_is_number(v) for v in values)


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
                if not _is_number(v):
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


# --------------------------------------------------------------------------------------------------------------------
# Applying a trial config, and the Ray searcher
# --------------------------------------------------------------------------------------------------------------------


def check_levels(space: SearchSpace, configs: list[dict], levels: list, stage: str) -> None:
    """Refuse a space whose trials would silently train only the first of several pipeline fusion levels.

    A trial of a stage in :data:`LEVEL_STAGES` trains one fusion level: ``fusion_level`` when the trial has one,
    else the pipeline's ``fusion_levels`` must name exactly one.

    Args:
        space: The job's space.
        configs: Configs covering every branch of the space (:meth:`SearchSpace.cover`).
        levels: The pipeline's ``fusion_levels``.
        stage: The job's stage.

    Raises:
        SpecError: One line naming both fixes.
    """
    if stage not in LEVEL_STAGES or len(levels) == 1 or all(FUSION_LEVEL in c for c in configs):
        return
    where = "does not search it" if FUSION_LEVEL not in space.names() else "leaves it unset in some branch"
    raise SpecError(f"{space.path}: params.{FUSION_LEVEL}: a {stage} trial trains one fusion level, but the pipeline "
                    f"has fusion_levels {list(levels)} and the space {where}; add "
                    f"`{FUSION_LEVEL}: {{type: categorical, choices: {list(levels)}}}` to the space, or set the "
                    f"pipeline's fusion_levels to one level")


def _beta_level(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 3 and parts[:2] == ["student", "betas"] and parts[2].isdigit():
        return int(parts[2])
    return None


def apply_config(pipeline: dict, config: dict) -> dict:
    """Apply a flat trial config to a pipeline dict.

    ``fusion_level`` k sets ``fusion_levels: [k]`` and drops ``student.betas`` entries above k (betas not in the
    config keep their pipeline values). ``student.betas.<level>`` is stored under the integer key ``level``
    (replacing a string key of the same level). Other names are set with :func:`mlfd.config.set_path`;
    ``datasets.<name>.…`` addresses the dataset with that name.

    Args:
        pipeline: A pipeline as a plain dict (not modified).
        config: Flat mapping of param name -> value, as sampled by a :class:`SearchSpace` or suggested by Ray.

    Returns:
        A deep copy of ``pipeline`` with the config applied.

    Raises:
        SpecError: A name is not a field of the pipeline spec, or a dataset name is not in the pipeline.
    """
    out = copy.deepcopy(pipeline)
    for name, value in config.items():
        try:
            resolve_name(name)
        except SpecError as e:
            raise SpecError(f"trial config: {e}") from None
        if name == FUSION_LEVEL:
            out["fusion_levels"] = [int(value)]
            continue
        lvl = _beta_level(name)
        if lvl is not None:
            if not isinstance(out.get("student"), dict):
                out["student"] = {}
            student = out["student"]
            betas = student.get("betas") or {}
            betas = {k: v for k, v in betas.items() if str(k) != str(lvl)}
            betas[lvl] = value
            student["betas"] = betas
            continue
        try:
            set_path(out, name, copy.deepcopy(value))
        except SpecError as e:
            raise SpecError(f"trial config: {str(e).removeprefix('--set ')}") from None
    if FUSION_LEVEL in config:
        k = int(config[FUSION_LEVEL])
        student = out.get("student")
        if isinstance(student, dict) and isinstance(student.get("betas"), dict):
            student["betas"] = {lv: b for lv, b in student["betas"].items() if not _above(lv, k)}
    return out


def _above(level: Any, k: int) -> bool:
    try:
        return int(level) > k
    except (TypeError, ValueError):
        return False  # not a level: left for PipelineSpec validation to report


def make_searcher(space: SearchSpace, metric: str, mode: str, seed: int,
                  points_to_evaluate: list[dict] | None = None) -> Any:
    """A seeded Optuna TPE searcher for Ray Tune over a space (define-by-run).

    Args:
        space: The search space.
        metric: Metric to optimize, e.g. ``val/acc1``.
        mode: ``max`` or ``min``.
        seed: Seed of the TPE sampler.
        points_to_evaluate: Flat configs to try first (names of the space; fixed params may be omitted).

    Returns:
        A ``ray.tune.search.optuna.OptunaSearch``.

    Raises:
        SpecError: A point names a param the space does not have, or ``mode`` is not max/min.
    """
    import optuna

    if mode not in ("max", "min"):
        raise SpecError(f"mode: got {mode!r}; allowed: max, min")
    fixed = {p.name for p in space.params if p.kind == "fixed"}
    points = []
    for i, point in enumerate(points_to_evaluate or []):
        if not isinstance(point, dict):
            raise SpecError(f"points_to_evaluate[{i}]: expected a mapping of param name -> value, got {point!r}")
        for k in point:
            if k not in space.names():
                raise SpecError(f"points_to_evaluate[{i}].{k}: not a param of {space.path}; "
                                f"allowed: {', '.join(space.names())}")
        points.append({k: v for k, v in point.items() if k not in fixed})
    from mlfd.tune.searcher import FailureAwareOptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed)  # failed trials are infeasible through Trial.set_constraint
    return FailureAwareOptunaSearch(space=space.define_by_run, metric=metric, mode=mode, sampler=sampler,
                                    points_to_evaluate=points or None)
