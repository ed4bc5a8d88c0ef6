"""The data model of a search space: params (with their ``when`` conditions), sampling without Ray, the Optuna
define-by-run function, and a deterministic cover of every condition branch."""

from __future__ import annotations

import copy
import math
import operator
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from mlfd.config import is_number
from mlfd.errors import SpecError

FUSION_LEVEL = "fusion_level"
"""The special param name: one fusion level k, applied to a pipeline as ``fusion_levels: [k]``."""
LEVEL_STAGES = ("students", "joint")
"""Stages whose trial trains one fusion level (``fusion_levels[0]`` of the trial's pipeline)."""
COVER_LIMIT = 4096
"""Most combinations of condition branches :meth:`SearchSpace.cover` enumerates."""
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "in": lambda a, b: a in b,
}


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
    numbers = [t for t in thresholds if is_number(t)]
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
