"""Applying a trial's flat config to a pipeline, refusing spaces that would train only one of several fusion
levels, and the seeded Optuna searcher for Ray Tune."""

from __future__ import annotations

import copy
from typing import Any

from mlfd.config import set_path
from mlfd.errors import SpecError
from mlfd.tune.spaces.model import FUSION_LEVEL, LEVEL_STAGES, SearchSpace
from mlfd.tune.spaces.parsing import resolve_name


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


def make_searcher(space: SearchSpace, metric: str | list[str], mode: str | list[str], seed: int,
                  points_to_evaluate: list[dict] | None = None,
                  constraints: dict[str, dict[str, float]] | None = None, startup_trials: int = 10,
                  study_name: str | None = None, seeds: list | None = None, record: Any = None) -> Any:
    """A seeded Optuna TPE searcher for Ray Tune over a space (define-by-run).

    Args:
        space: The search space.
        metric: Metric to optimize, e.g. ``val/acc1``, or a list of them (multi-objective TPE: Optuna's TPESampler
            ranks trials by non-domination).
        mode: ``max`` or ``min``, or one per metric.
        seed: Seed of the TPE sampler.
        points_to_evaluate: Flat configs to try first (names of the space; fixed params may be omitted).
        constraints: ``{metric: {le|ge: bound}}``: set on every completed trial as Optuna constraints
            (:class:`mlfd.tune.searcher.FailureAwareOptunaSearch`), so infeasible trials rank last.
        startup_trials: Trials TPE samples at random before it models the results (``n_startup_trials``; seeded
            trials count).
        study_name: Name of the sampler's (in-memory) Optuna study.
        seeds: Earlier trials (``optuna.trial.FrozenTrial``, in this space's distributions) the sampler's study starts
            with (``--extend``, ``--warm-start``; see :func:`mlfd.tune.study.seed_trials`).
        record: A :class:`mlfd.tune.study.StudyRecord` the searcher writes every told trial to, or None.

    Returns:
        A ``ray.tune.search.optuna.OptunaSearch``.

    Raises:
        SpecError: A point names a param the space does not have, or ``mode`` is not max/min.
    """
    import optuna

    for m in [mode] if isinstance(mode, str) else mode:
        if m not in ("max", "min"):
            raise SpecError(f"mode: got {m!r}; allowed: max, min")
    if not isinstance(metric, str) and len(metric) == 1:  # one objective: Optuna's single-objective study
        metric, mode = metric[0], mode[0]
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
    from mlfd.tune.study import directions, seeded_storage

    # failed trials are infeasible through Trial.set_constraint
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    name = study_name or "optuna"
    # OptunaSearch creates its study with load_if_exists: a storage that already holds it seeds the sampler.
    return FailureAwareOptunaSearch(space=space.define_by_run, metric=metric, mode=mode, sampler=sampler,
                                    points_to_evaluate=points or None, constraints=constraints, study_name=name,
                                    storage=seeded_storage(name, directions(mode), list(seeds or [])), record=record)
