"""Persistent Optuna studies: one per study of a search, in an Optuna RDB storage.

Every study of ``mlfd tune JOB --out OUT`` (one per student dataset) is kept as an Optuna study named
``<job.name>-<study>`` in ``sqlite:///OUT/optuna.db``, or in the database the job's ``optuna_storage`` names (a
PostgreSQL/MySQL URL for a cluster: SQLite's file locks are unsafe on NFS). ``optuna-dashboard sqlite:///OUT/optuna.db``
shows them; ``mlfd report`` reads them (:func:`read_study`).

How a search uses it. The sampler's own study stays in memory, inside Ray Tune's searcher, because Ray saves and
restores that searcher with the experiment state: after a killed driver and ``--resume`` the sampler is back exactly
where the saved state is (a study the searcher asked from directly in the database would keep the trials it had asked
after the last snapshot, never to be told). Each trial the searcher has been told about is written through to the
persistent study (:class:`StudyRecord`), keyed by its Ray trial id (user attribute :data:`RAY_TRIAL_ATTR`), so a
trial that ends again after ``--resume`` is not recorded twice.

``--extend N`` and ``--warm-start DIR`` seed the sampler's in-memory study with earlier trials read from a persistent
study (:func:`seed_trials`, :func:`seeded_storage`): TPE then models them like trials of its own. Seeded trials carry
:data:`SEEDED_ATTR` and are never written back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mlfd.errors import SpecError

_logger = logging.getLogger(__name__)

STUDY_DB = "optuna.db"
"""The default storage of a search's studies: ``sqlite:///OUT/optuna.db``."""
RAY_TRIAL_ATTR = "ray_trial_id"
"""User attribute of every recorded trial: the Ray Tune trial id (trials.parquet's ``trial_id``)."""
SEEDED_ATTR = "mlfd_seeded_from"
"""User attribute of a trial copied into a sampler's study from an earlier search (its Optuna storage and study)."""


def default_storage(out: Path) -> str:
    """The persistent studies' storage of a search written to ``out`` when the job names none."""
    return f"sqlite:///{Path(out).resolve() / STUDY_DB}"


def search_storage(out: Path, url: str | None) -> str | None:
    """The storage of the studies of the search in ``out`` whose ``search.json`` records ``url`` (None: a search made
    before mlfd kept its studies): ``OUT/optuna.db`` when the recorded SQLite file is gone but ``out`` holds one (the
    directory was moved or copied), None when there is no storage to read."""
    local = Path(out) / STUDY_DB
    if url is None or (url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file()):
        return default_storage(out) if local.is_file() else None
    return url


def study_name(job_name: str, study: str) -> str:
    """The persistent study of one mlfd study (``study`` is the dataset, or the stage for a single study)."""
    return f"{job_name}-{study}"


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


_STORAGES: dict[str, Any] = {}


def storage(url: str) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url``, one per process (creating the tables on first use).

    Raises:
        SpecError: The database cannot be opened (bad URL, server away, driver missing).
    """
    if url not in _STORAGES:
        import optuna

        _quiet()
        try:
            _STORAGES[url] = optuna.storages.RDBStorage(url)
        except Exception as e:  # noqa: BLE001  (SQLAlchemy raises many types for a bad URL or an absent server)
            raise SpecError(f"optuna_storage: cannot open {redact_url(url)} "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
    return _STORAGES[url]


def redact_url(url: str) -> str:
    """A database URL without its password (``user:***@host``)."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    cred, _, host = rest.partition("@")
    return f"{head}://{cred.split(':', 1)[0]}:***@{host}"


def open_study(url: str, name: str, direction: str | list[str]) -> Any:
    """The persistent study ``name`` in ``url``, created if it does not exist (``direction``: maximize/minimize, or
    one per objective of a multi-objective search)."""
    import optuna

    return optuna.create_study(storage=storage(url), study_name=name, directions=_as_list(direction),
                               load_if_exists=True)


def _as_list(direction: str | list[str]) -> list[str]:
    return [direction] if isinstance(direction, str) else list(direction)


def load_study(url: str, name: str) -> Any | None:
    """The persistent study ``name`` in ``url``, or None if the storage has no such study."""
    import optuna

    if name not in study_names(url):
        return None
    return optuna.load_study(storage=storage(url), study_name=name)


def study_names(url: str) -> list[str]:
    """Names of the studies in a storage."""
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage(url), include_best_trial=False)]


def direction(mode: str) -> str:
    return "minimize" if mode == "min" else "maximize"


def directions(mode: str | list[str]) -> list[str]:
    """Optuna's directions of a job's ``mode``: one, or one per objective."""
    return [direction(m) for m in ([mode] if isinstance(mode, str) else mode)]


@dataclass
class StudyRecord:
    """Where a searcher writes the trials it has been told about: study ``name`` in storage ``url``.

    Holds only the URL and the name (Ray pickles the searcher with the experiment); the storage is opened per process.
    """

    url: str
    name: str
    direction: Union[str, list] = "maximize"
    """Optuna's direction, or one per objective (multi-objective)."""
    _known: Optional[set] = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {"url": self.url, "name": self.name, "direction": self.direction, "_known": None}

    def study(self) -> Any:
        return open_study(self.url, self.name, self.direction)

    def known(self) -> set[str]:
        """Ray trial ids already in the persistent study (read once per process, then kept up to date)."""
        if self._known is None:
            self._known = {str(t.user_attrs[RAY_TRIAL_ATTR]) for t in self.study().get_trials(deepcopy=False)
                           if RAY_TRIAL_ATTR in t.user_attrs}
        return self._known

    def add(self, trials: list) -> int:
        """Write finished trials of a sampler's study that the persistent study lacks; returns how many were written.

        Trials without a Ray trial id, seeded ones (:data:`SEEDED_ATTR`) and unfinished ones are left out.
        """
        todo = [t for t in trials if t.state.is_finished() and RAY_TRIAL_ATTR in t.user_attrs
                and SEEDED_ATTR not in t.user_attrs and str(t.user_attrs[RAY_TRIAL_ATTR]) not in self.known()]
        if todo:
            self.study().add_trials(todo)
            self.known().update(str(t.user_attrs[RAY_TRIAL_ATTR]) for t in todo)
        return len(todo)


# --------------------------------------------------------------------------------------------------------------------
# Seeding a sampler with earlier trials (--extend, --warm-start)
# --------------------------------------------------------------------------------------------------------------------


class _Missing(Exception):
    pass


class _Replay:
    """An Optuna-trial stand-in that answers a space's ``suggest_*`` calls with an earlier trial's values and records
    the distributions the space asks them with."""

    def __init__(self, params: dict):
        self.params = params
        self.asked: dict[str, Any] = {}

    def _answer(self, name: str, dist: Any) -> Any:
        if name not in self.params:
            raise _Missing(name)
        self.asked[name] = dist
        return self.params[name]

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> Any:
        from optuna.distributions import FloatDistribution

        return self._answer(name, FloatDistribution(low, high, step=step, log=log))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> Any:
        from optuna.distributions import IntDistribution

        return self._answer(name, IntDistribution(low, high, step=step, log=log))

    def suggest_categorical(self, name: str, choices: list) -> Any:
        from optuna.distributions import CategoricalDistribution

        return self._answer(name, CategoricalDistribution(choices))


def fit_trial(trial: Any, space: Any) -> tuple[Any | None, str]:
    """An earlier trial re-expressed in ``space`` (its distributions), or None and why it does not fit.

    A trial fits when it ended (complete, or pruned: stopped early or failed), the space asks, given its values, for
    exactly the params it sampled (conditions included), and each value lies in the new distribution.
    """
    import optuna

    from mlfd.tune._private import distribution_contains

    state = trial.state
    if state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return None, f"state {state.name} (only complete and pruned trials are used)"
    replay = _Replay(dict(trial.params))
    try:
        space.define_by_run(replay)
    except _Missing as e:
        return None, f"has no value for {e.args[0]}, which the new space samples"
    extra = sorted(set(trial.params) - set(replay.asked))
    if extra:
        return None, f"sampled {', '.join(extra)}, which the new space does not"
    for name, dist in replay.asked.items():
        value = trial.params[name]
        if not distribution_contains(dist, value):
            return None, f"{name}={value!r} is outside the new space's {_describe(dist)}"
    return optuna.trial.create_trial(state=state, values=trial.values, params=dict(trial.params),
                                     distributions=replay.asked, user_attrs=dict(trial.user_attrs),
                                     system_attrs=dict(trial.system_attrs),
                                     intermediate_values=dict(trial.intermediate_values)), ""


def _describe(dist: Any) -> str:
    if hasattr(dist, "choices"):
        return f"choices {list(dist.choices)}"
    return f"range [{dist.low}, {dist.high}]"


def seed_trials(url: str, name: str, space: Any, source: str) -> list:
    """The trials of persistent study ``name`` in ``url`` that fit ``space``, ready to seed a sampler's study.

    Each trial that does not fit is named in one log line and skipped. The seeded copies carry :data:`SEEDED_ATTR`
    (``source``).

    Returns:
        The fitting trials, in the order they were created (empty when the storage has no such study).
    """
    st = load_study(url, name)
    if st is None:
        _logger.warning("mlfd tune: %s holds no study %r: nothing to seed it with", redact_url(url), name)
        return []
    out = []
    for t in st.get_trials(deepcopy=False):
        fit, why = fit_trial(t, space)
        if fit is None:
            rid = t.user_attrs.get(RAY_TRIAL_ATTR, "?")
            _logger.info("mlfd tune: %s: earlier trial %d (%s) skipped: %s", name, t.number, rid, why)
            continue
        fit.set_user_attr(SEEDED_ATTR, source)
        out.append(fit)
    return out


def seeded_storage(name: str, direction_: str | list[str], trials: list) -> Any:
    """An in-memory Optuna storage holding study ``name`` with ``trials``: what Ray's ``OptunaSearch(storage=,
    study_name=)`` loads (``load_if_exists``), so its sampler starts from those trials."""
    import optuna

    _quiet()
    mem = optuna.storages.InMemoryStorage()
    st = optuna.create_study(storage=mem, study_name=name, directions=_as_list(direction_))
    st.add_trials(trials)
    return mem


# --------------------------------------------------------------------------------------------------------------------
# Reading a study back (mlfd report)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StudyView:
    """What ``mlfd report`` shows of a persistent study.

    Attributes:
        name: The study name.
        storage: Its storage URL (password hidden).
        counts: Trials per state (``COMPLETE``, ``PRUNED``, ...).
        importances: fANOVA importances of the searched params, high to low (None when skipped).
        note: How the importances were computed, or why they were skipped.
        trials: One row per trial: number, Ray trial id, state, value.
    """

    name: str
    storage: str
    counts: dict[str, int]
    importances: dict[str, float] | None
    note: str
    trials: list[dict]


MIN_IMPORTANCE_TRIALS = 3
MIN_VARYING_PARAMS = 2


def read_study(url: str, name: str) -> StudyView | None:
    """The persistent study ``name`` of a search, with its parameter importances (None if the storage lacks it).

    Importances: Optuna's fANOVA (seed 0) over the completed trials with a finite value and the params that every
    one of them sampled and that vary (conditional params, absent in some trials, are left out).
    """
    import optuna

    st = load_study(url, name)
    if st is None:
        return None
    trials = st.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    rows = [{"number": t.number, "trial_id": t.user_attrs.get(RAY_TRIAL_ATTR), "state": t.state.name,
             "value": t.values[0] if t.values else None} for t in trials]
    # Importances of the first objective (the only one of a single-objective study).
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values
            and math.isfinite(t.values[0])]
    imp, note = None, ""
    if len(done) < MIN_IMPORTANCE_TRIALS:
        note = (f"skipped: {len(done)} completed trial(s) with a value; importances need at least "
                f"{MIN_IMPORTANCE_TRIALS}")
    else:
        common = set.intersection(*(set(t.params) for t in done))
        varying = sorted(p for p in common if len({repr(t.params[p]) for t in done}) > 1
                         and len({repr(t.distributions[p]) for t in done}) == 1)
        if len(varying) < MIN_VARYING_PARAMS:
            note = (f"skipped: {len(varying)} param(s) vary across all {len(done)} completed trials; importances "
                    f"need at least {MIN_VARYING_PARAMS}")
        else:
            try:
                ev = optuna.importance.FanovaImportanceEvaluator(seed=0)
                first = (lambda t: t.values[0]) if len(st.directions) > 1 else None
                raw = optuna.importance.get_param_importances(st, evaluator=ev, params=varying, target=first)
                imp = dict(sorted(((k, float(v)) for k, v in raw.items()), key=lambda kv: -kv[1]))
                note = (f"from {len(done)} completed trials, {len(varying)} varying params; values as the sampler "
                        "was told them: the metric of each trial's last epoch")
            except Exception as e:  # noqa: BLE001  (an evaluator that cannot cope: say why instead of failing)
                note = f"skipped: Optuna could not assess importances ({type(e).__name__}: {e})"
    return StudyView(name=name, storage=redact_url(url), counts=counts, importances=imp, note=note, trials=rows)
