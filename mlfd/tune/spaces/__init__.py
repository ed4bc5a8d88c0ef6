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

The package: :mod:`~mlfd.tune.spaces.model` (params, spaces, sampling and branch cover),
:mod:`~mlfd.tune.spaces.parsing` (names checked against the spec, loading a file), :mod:`~mlfd.tune.spaces.applying`
(a trial config applied to a pipeline, the level check, the Ray searcher).
"""

from mlfd.tune.spaces.applying import apply_config, check_levels, make_searcher
from mlfd.tune.spaces.model import COVER_LIMIT, FUSION_LEVEL, LEVEL_STAGES, OPS, Param, SearchSpace, representatives
from mlfd.tune.spaces.parsing import KINDS, load_space, resolve_name

__all__ = ["COVER_LIMIT", "FUSION_LEVEL", "KINDS", "LEVEL_STAGES", "OPS", "Param", "SearchSpace", "apply_config",
           "check_levels", "load_space", "make_searcher", "representatives", "resolve_name"]
