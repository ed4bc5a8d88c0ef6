"""MLflow tracking: one experiment per job, one parent run per search study (or pipeline run), one child per trial/stage.

The only module that imports mlflow. All calls go through one :class:`MlflowClient` bound to the job's tracking URI
(no process-wide state), and every call that fails because the server went away is kept in a local JSONL journal
and retried later, with a warning, so a search never dies because tracking did.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from mlfd.config import to_dict
from mlfd.errors import SpecError

_logger = logging.getLogger(__name__)

TAG_TRIAL = "mlfd.trial_id"
TAG_STUDY = "mlfd.study"
TAG_STAGE = "mlfd.stage"
TAG_ROLE = "mlfd.role"
TAG_DATASET = "mlfd.dataset"
TAG_LEVEL = "mlfd.fusion_level"
TAG_SEED = "mlfd.seed"
TAG_PARENT = "mlflow.parentRunId"
TAG_NODE = "mlfd.node"
"""Ray node id a trial ran on (of its latest report); ``mlfd.node_ip`` and ``mlfd.hostname`` go with it."""
SECRET_WORDS = ("password", "token", "secret", "credential", "api_key", "apikey")
STATE_FILE = "tracking.json"
PENDING_PREFIX = "pending-"
"""Run ids handed out while the server is unreachable; the journal replay maps them to the real ids."""
RETRY_AFTER_S = 15.0
"""After a failed call, later calls go straight to the journal for this long (no network wait per call)."""
DRAIN_S = 120.0
"""At the end of a study or search, how long the driver waits for an unreachable server to replay the journal."""
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) block each call for minutes when a server is
down; with these a call fails within seconds and is journalled. Variables already set in the environment win."""


def default_uri(out: Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"name": "x", "c": 2}]}`` -> ``{"a.b": 1, "l.x.c": 2}`` (list items by name or index)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{v.get('name', i)}."))
    else:
        out[prefix[:-1]] = d
    return out


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Hide values whose key names a secret, and user:password@ in URIs (tracking credentials never end up in
    params, e.g. through the job's ``tracking_uri``)."""
    return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) else
                safe_uri(v) if isinstance(v, str) and "://" in v else v) for k, v in params.items()}


_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_LINE = re.compile(r"^(\s*-?\s*[\w.-]*(?:" + "|".join(SECRET_WORDS) + r")[\w.-]*\s*[:=]\s*)\S.*$",
                          re.IGNORECASE | re.MULTILINE)


def redact_text(text: str) -> str:
    """A YAML file's text without credentials: user:password@ of URIs and the values of keys naming a secret."""
    return _SECRET_LINE.sub(r"\1'***'", _URI_USERINFO.sub(r"\1***@", text))


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def safe_uri(uri: str) -> str:
    """A tracking URI without user:password@ (for logs and tags)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


class Tracker:
    """A tracking URI and one experiment, with a local journal for calls that could not reach the server.

    Args:
        tracking_uri: ``sqlite:///...`` (default for local runs) or ``http(s)://host:port`` of a ``mlflow server``.
        experiment: experiment name (the job's name).
        journal: JSONL file where failed calls wait for a retry.
    """

    def __init__(self, tracking_uri: str, experiment: str, journal: Path, experiment_id: str | None = None):
        from mlflow.tracking import MlflowClient

        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_name = experiment
        self.journal = Path(journal)
        self._warned = False
        self._down_until = 0.0
        self._drain_gave_up = False  # a drain already waited its full time: later ones try once, without waiting
        self._ids: dict[str, str] = {}
        self.experiment_id = experiment_id or self._experiment(experiment)

    # -- connection ----------------------------------------------------------------------------------------------

    @staticmethod
    def check_reachable(uri: str, timeout: float = 10.0, hint: str = "--set tracking_uri=URI") -> None:
        """Fail fast, before any compute, when a remote tracking server does not answer (``hint``: how the command
        that asks takes another URI)."""
        if uri.startswith("file:"):
            raise SpecError(f"tracking_uri: {uri!r}: MLflow 3 refuses the file store; use sqlite:///PATH/mlflow.db "
                            "or http://host:port")
        if not uri.startswith(("http://", "https://")):
            return
        import urllib.request

        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except OSError as e:
            raise SpecError(f"tracking_uri: cannot reach the MLflow server at {safe_uri(uri)} ({e}); start it or "
                            f"pass {hint}") from None

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        loc = None
        if self.uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd
            loc = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=loc)

    def call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        """``client.fn(*args)``; if the server is unreachable, journal the call, warn once, and go on.

        While calls wait in the journal, new ones are appended after them (replayed in order), so a run never gets
        its end before its metrics.
        """
        args, kwargs = self._resolve(args), self._resolve(kwargs)
        if self._pending() or _mentions_pending((args, kwargs)):
            self._journal(fn, args, kwargs)
            return None
        try:
            return getattr(self.client, fn)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any transport error must not kill a search
            if not _transient(e):
                raise
            self._down_until = time.monotonic() + RETRY_AFTER_S
            self._journal(fn, args, kwargs, e)
            return None

    def _pending(self) -> bool:
        """Whether calls wait in the journal (replays it first, unless the server failed moments ago)."""
        if not self.journal.is_file():
            return False
        if time.monotonic() < self._down_until:
            return True
        return self.flush() > 0

    def _journal(self, fn: str, args: tuple, kwargs: dict, err: Exception | None = None,
                 placeholder: str | None = None) -> None:
        if not self._warned:
            why = f" ({type(err).__name__})" if err is not None else ""
            warnings.warn(f"MLflow server at {safe_uri(self.uri)} unreachable{why}; tracking calls "
                          f"are kept in {self.journal} and retried", RuntimeWarning, stacklevel=3)
            _logger.warning("MLflow unreachable; tracking calls kept in %s and retried", self.journal)
            self._warned = True
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        entry = {"fn": fn, "args": _jsonable(args), "kwargs": _jsonable(kwargs)}
        if placeholder:
            entry["placeholder"] = placeholder
        with open(self.journal, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def flush(self) -> int:
        """Replay journalled calls; returns how many are still pending."""
        if not self.journal.is_file():
            return 0
        lines = [ln for ln in self.journal.read_text().splitlines() if ln.strip()]
        done = 0
        for line in lines:
            c = json.loads(line)
            args = self._resolve(_from_jsonable(c["fn"], c["args"]))
            kwargs = self._resolve(_from_jsonable(c["fn"], c["kwargs"]))
            try:
                res = getattr(self.client, c["fn"])(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if _transient(e):
                    self._down_until = time.monotonic() + RETRY_AFTER_S
                    break
                warnings.warn(f"dropping journalled MLflow call {c['fn']} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''})", RuntimeWarning, stacklevel=2)
            else:
                if c.get("placeholder"):
                    self._remember(c["placeholder"], res.info.run_id)
            done += 1
        rest = lines[done:]
        if rest:
            self.journal.write_text("\n".join(rest) + "\n")
        else:
            self.journal.unlink()
        return len(rest)

    def drain(self, timeout: float = DRAIN_S, poll: float = 3.0) -> int:
        """Replay the journal, retrying for up to ``timeout`` seconds while the server is away; returns how many
        calls are still pending (0: everything reached the server). Once a drain has waited its full time in vain,
        later ones only try once: a server that stays away costs the search one wait, not one per study."""
        if not self.journal.is_file():
            return 0
        if self._drain_gave_up:
            timeout = 0.0
        deadline = time.monotonic() + timeout
        _logger.info("mlfd: MLflow calls are waiting in %s; replaying them (waiting up to %.0f s for %s)", self.journal,
                     timeout, safe_uri(self.uri))
        while True:
            left = self.flush()
            if not left or time.monotonic() >= deadline:
                self._drain_gave_up = bool(left)
                return left
            time.sleep(poll)

    # -- run ids handed out while the server was away ------------------------------------------------------------

    @property
    def _ids_file(self) -> Path:
        return self.journal.with_name(self.journal.stem + ".ids.json")

    def _remember(self, placeholder: str, run_id: str) -> None:
        from mlfd.store import atomic_write_text

        self._ids[placeholder] = run_id
        ids = json.loads(self._ids_file.read_text()) if self._ids_file.is_file() else {}
        ids[placeholder] = run_id
        atomic_write_text(self._ids_file, json.dumps(ids, indent=1))

    def resolve_id(self, run_id: str) -> str:
        """The real id of a run created while the server was unreachable (itself when not replayed yet)."""
        if not isinstance(run_id, str) or not run_id.startswith(PENDING_PREFIX):
            return run_id
        if run_id not in self._ids and self._ids_file.is_file():
            self._ids.update(json.loads(self._ids_file.read_text()))
        return self._ids.get(run_id, run_id)

    def _resolve(self, v: Any) -> Any:
        if isinstance(v, str):
            return self.resolve_id(v)
        if isinstance(v, (list, tuple)):
            return type(v)(self._resolve(x) for x in v)
        if isinstance(v, dict):
            return {k: self._resolve(x) for k, x in v.items()}
        return v

    # -- runs ----------------------------------------------------------------------------------------------------

    def find_run(self, tags: dict[str, str]) -> str | None:
        """The oldest run of the experiment carrying ``tags`` (a read: never journalled; None if unreachable)."""
        if _mentions_pending(tags) or time.monotonic() < self._down_until:
            return None
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        try:
            runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=5,
                                           order_by=["attributes.start_time ASC"])
        except Exception as e:  # noqa: BLE001
            if not _transient(e):
                raise
            self._down_until = time.monotonic() + RETRY_AFTER_S
            return None
        return runs[0].info.run_id if runs else None

    def start_run(self, name: str, tags: dict[str, str], reuse: dict[str, str] | None = None) -> str:
        """A new run, or the existing one carrying the ``reuse`` tags (set back to RUNNING).

        With the server unreachable the run is created in the journal and gets a ``pending-...`` id until replayed.
        """
        import uuid

        tags = self._resolve(tags)
        if reuse:
            rid = self.find_run(self._resolve(reuse))
            if rid is not None:
                self.call("update_run", rid, status="RUNNING")
                return rid
        args, kwargs = (self.experiment_id,), {"run_name": name, "tags": tags}
        err = None
        if not (self._pending() or _mentions_pending(tags)):
            try:
                return self.client.create_run(*args, **kwargs).info.run_id
            except Exception as e:  # noqa: BLE001
                if not _transient(e):
                    raise
                self._down_until = time.monotonic() + RETRY_AFTER_S
                err = e
        placeholder = PENDING_PREFIX + uuid.uuid4().hex
        self._journal("create_run", args, kwargs, err, placeholder=placeholder)
        return placeholder

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step logged for ``key`` (0 if none, or if the server cannot tell right now)."""
        run_id = self.resolve_id(run_id)
        if run_id.startswith(PENDING_PREFIX) or time.monotonic() < self._down_until:
            return 0
        try:
            return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)
        except Exception as e:  # noqa: BLE001
            if not _transient(e):
                raise
            self._down_until = time.monotonic() + RETRY_AFTER_S
            return 0

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in redact(params).items()]
        for i in range(0, len(items), 100):
            self.call("log_batch", run_id, params=items[i: i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.call("log_batch", run_id, metrics=items[i: i + 1000])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.call("set_terminated", run_id, status=status)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.call("log_artifact", run_id, str(path), artifact_path)


def _transient(e: Exception) -> bool:
    """Connection problems (retry later) vs real errors (raise)."""
    import requests

    from mlflow.exceptions import MlflowException

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    return isinstance(e, MlflowException) and any(w in str(e) for w in ("Max retries", "Connection", "connect",
                                                                         "Read timed out", "503", "502"))


def _mentions_pending(v: Any) -> bool:
    if isinstance(v, str):
        return v.startswith(PENDING_PREFIX)
    if isinstance(v, (list, tuple)):
        return any(_mentions_pending(x) for x in v)
    if isinstance(v, dict):
        return any(_mentions_pending(x) for x in v.values())
    return False


def _jsonable(v: Any) -> Any:
    from mlflow.entities import Metric, Param

    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, Metric):
        return {"__metric__": [v.key, v.value, v.timestamp, v.step]}
    if isinstance(v, Param):
        return {"__param__": [v.key, v.value]}
    return v


def _from_jsonable(fn: str, v: Any) -> Any:
    from mlflow.entities import Metric, Param

    if isinstance(v, list):
        return [_from_jsonable(fn, x) for x in v]
    if isinstance(v, dict) and "__metric__" in v:
        return Metric(*v["__metric__"])
    if isinstance(v, dict) and "__param__" in v:
        return Param(*v["__param__"])
    if isinstance(v, dict):
        return {k: _from_jsonable(fn, x) for k, x in v.items()}
    return v


def _load_state(out: Path) -> dict:
    f = Path(out) / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_state(out: Path, state: dict) -> None:
    from mlfd.store import atomic_write_text

    atomic_write_text(Path(out) / STATE_FILE, json.dumps(state, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Searches: parent run per study, child run per trial (a Ray Tune logger callback)
# ----------------------------------------------------------------------------------------------------------------


def trial_error(trial) -> str:
    """The last line of a failed Ray trial's error file (the exception), or its error message."""
    try:
        path = getattr(trial, "error_file", None)
        if path and os.path.isfile(path):
            text = Path(path).read_text().strip().splitlines()
            return text[-1] if text else "failed"
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "failed")


class SearchTracking:
    """The hooks ``mlfd.tune.launch.run_search`` calls: a parent run per study, trial runs, the best student."""

    def __init__(self, out: Path, register: str | None = None):
        self.out = Path(out)
        self.register = register
        self.tracker: Tracker | None = None
        self.parents: dict[str, str] = {}

    def open(self, plan: dict) -> None:
        """Check the tracking server and open the experiment (before the output directory is claimed)."""
        Tracker.check_reachable(plan["tracking_uri"])
        self.out.mkdir(parents=True, exist_ok=True)  # the default SQLite database lives there
        job = plan["job"]
        self.tracker = Tracker(plan["tracking_uri"], job["name"], self.out / "mlflow_pending.jsonl")

    def parent(self, plan: dict, study: str | None) -> str:
        """The study's parent run: created once, found again on --resume (its id is kept in OUT/tracking.json)."""
        key = study or plan["job"]["stage"]
        state = _load_state(self.out)
        rid = state.get("parents", {}).get(key)
        t = self.tracker
        if rid is not None:
            t.call("update_run", rid, status="RUNNING")
        else:
            tags = {TAG_STUDY: key, TAG_STAGE: plan["job"]["stage"], "mlfd.job_file": plan["job_file"]}
            commit = git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = commit
            rid = t.start_run(f"search-{key}", tags)
            t.log_params(rid, {f"job.{k}": v for k, v in flatten(plan["job"]).items()})
            from mlfd.store import atomic_write_text

            for f in (plan["job_file"], plan["space_file"], plan["pipeline_file"]):
                # Logged as redacted copies: a job file may hold a tracking URI with user:password@.
                copy = self.out / "inputs" / Path(f).name
                atomic_write_text(copy, redact_text(Path(f).read_text()))
                t.log_artifact(rid, copy, "inputs")
            state.setdefault("parents", {})[key] = rid
            _save_state(self.out, state)
        self.parents[key] = rid
        return rid

    def trial_runs_args(self, plan: dict, study: str | None) -> dict:
        """Keyword arguments of ``mlfd.tune.mlflow_callback.TrialRuns`` for a new study: where its trials' runs go."""
        parent = self.parent(plan, study)
        return {"uri": self.tracker.uri, "experiment": self.tracker.experiment_name,
                "journal": str(self.tracker.journal), "parent_id": parent, "study": study,
                "stage": plan["job"]["stage"], "experiment_id": self.tracker.experiment_id}

    def interrupted(self, status: str = "KILLED") -> None:
        """End the open parent runs (Ctrl-C: KILLED, an error: FAILED); never masks the exception on its way."""
        for key, rid in self.parents.items():
            if key in _load_state(self.out).get("finished", []):
                continue
            try:
                self.tracker.end_run(rid, status)
            except Exception as e:  # noqa: BLE001
                _logger.warning("could not mark the MLflow run of study %r %s: %s", key, status, e)

    def close(self) -> None:
        """At the end of a search: replay what waits in the journal (waiting up to DRAIN_S for the server); say
        where the rest is kept if the server is still away."""
        if self.tracker is None:
            return
        left = self.tracker.drain()
        if left:
            _logger.warning("%d MLflow calls are still in %s; the next mlfd tune --resume --out %s replays them", left,
                            self.tracker.journal, self.out)

    def finish_study(self, plan: dict, study: str | None, best_yaml: Path | None) -> None:
        """Log the study's best trial under the parent: test metrics, weights, a loadable model, the YAML."""
        key = study or plan["job"]["stage"]
        rid = self.parents[key]
        t = self.tracker
        state = _load_state(self.out)
        if key in state.get("finished", []):  # a resumed search passes finished studies again: log them once
            t.end_run(rid, "FINISHED")
            return
        if best_yaml is not None and best_yaml.is_file():
            t.log_artifact(rid, best_yaml, "best")
            art = best_artifact(plan, best_yaml, study)
            if art is not None:
                try:
                    # The model goes through MLflow's own client, not the journal: only once the journal is empty
                    # (calls in order) and the parent run exists on the server.
                    if t.drain() or t.resolve_id(rid).startswith(PENDING_PREFIX):
                        raise ConnectionError("earlier tracking calls are still waiting in the journal")
                    log_best_model(t, t.resolve_id(rid), best_yaml, art, study, self.register)
                except Exception as e:  # noqa: BLE001 - the search is done; a model upload must not undo it
                    if not _transient(e):
                        raise
                    warnings.warn(f"MLflow unreachable: the best model of study {key!r} was not logged ({e})",
                                  RuntimeWarning, stacklevel=2)
                    _logger.warning("MLflow unreachable; the best model of study %r was not logged (its weights are in "
                                    "%s)", key, art.path)
        trials = self.out / "trials.parquet"
        if trials.is_file():
            t.log_artifact(rid, trials)
        t.end_run(rid, "FINISHED")
        state.setdefault("finished", []).append(key)
        _save_state(self.out, state)


def best_artifact(plan: dict, best_yaml: Path, study: str | None):
    """The stored artifact of the exported best trial (students and teachers: its trained model)."""
    from mlfd.config import load_pipeline
    from mlfd.stages.common import Context
    from mlfd.stages.joint import plan_for
    from mlfd.stages.students import student_key, student_variant
    from mlfd.stages.teachers import teacher_key
    from mlfd.store import ArtifactStore

    spec = load_pipeline(best_yaml)
    ctx = Context(spec=spec, store=ArtifactStore(plan["store"]), progress=False)
    stage = plan["job"]["stage"]
    if stage == "students":
        level = spec.fusion_levels[0]
        return ctx.store.get("student", student_key(ctx, study, plan_for(ctx, level, study),
                                                    student_variant(ctx, None, study)))
    if stage == "teachers":
        return ctx.store.get("teacher", teacher_key(ctx, study))
    return None


def log_best_model(t: Tracker, run_id: str, best_yaml: Path, art, study: str, register: str | None) -> None:
    """State dict, an MLflow PyTorch model with an input example, and test metrics (evaluated once, at build)."""
    import mlflow
    import numpy as np

    from mlfd.config import load_pipeline
    from mlfd.data import load_dataset
    from mlfd.models import create_model
    from mlfd.stages.common import read_metrics
    from mlfd.store import load_torch

    spec = load_pipeline(best_yaml)
    ds = spec.dataset(study)
    data = load_dataset(ds)
    model_spec = ds.student_net if art.kind == "student" else ds.model
    metrics = read_metrics(art)
    t.log_metrics(run_id, {f"test/{k}": v for k, v in metrics["test"].items()}, step=0)
    t.log_metrics(run_id, {f"best/val/{k}": v for k, v in metrics["val"].items()}, step=0)
    t.log_artifact(run_id, art.file("model.pt"), "best")
    net = create_model(type(model_spec)(**{**to_dict(model_spec), "checkpoint": None, "pretrained": False}),
                       data.num_classes)
    net.load_state_dict(load_torch(art.file("model.pt")))
    net.eval()
    # The model takes normalized [B, 3, S, S] float input (see the dataset's mean/std in the logged YAML). MLflow 3
    # saves it with torch.export, which traces the example: a batch of 1 would specialize the batch dimension to 1
    # (the loaded model then refuses any other batch size), so the example holds 2 images.
    example = np.zeros((2, 3, model_spec.input_size, model_spec.input_size), dtype=np.float32)
    prev = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(t.uri)
        with mlflow.start_run(run_id=run_id, experiment_id=t.experiment_id):
            # Explicit requirements: inferring them reloads the model in a subprocess (20+ s per study on a CPU),
            # and the exported graph needs only torch.
            info = mlflow.pytorch.log_model(net, name="student" if art.kind == "student" else "teacher",
                                            input_example=example,
                                            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                                            registered_model_name=register)
            mlflow.set_tag("mlfd.best_model_uri", info.model_uri)
            mlflow.log_dict({"mean": list(data.mean), "std": list(data.std), "input_size": model_spec.input_size,
                             "classes": data.classes}, "best/preprocessing.json")
    finally:
        mlflow.set_tracking_uri(prev)


# ----------------------------------------------------------------------------------------------------------------
# Pipeline runs: parent per `mlfd run`, child per stage
# ----------------------------------------------------------------------------------------------------------------


class PipelineTracking:
    """``mlfd run`` logging: one parent run, one child per stage and run seed (tag ``mlfd.seed``; with several seeds
    the child's name ends in ``[seed s]``) with its epoch curves and final val/test metrics."""

    def __init__(self, tracking_uri: str, spec, out: Path):
        Tracker.check_reachable(tracking_uri)
        self.tracker = Tracker(tracking_uri, spec.name, Path(out) / "mlflow_pending.jsonl")
        self.out = Path(out)
        tags = {TAG_STAGE: "pipeline"}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self.parent = self.tracker.start_run(f"run-{spec.name}", tags)
        self.tracker.log_params(self.parent, flatten(to_dict(spec)))

    def log_stage(self, stage, art, rows: list[dict], curves: list[dict]) -> None:
        t = self.tracker
        tags = {TAG_PARENT: self.parent, TAG_ROLE: stage.role, TAG_STAGE: stage.label, TAG_SEED: str(stage.seed),
                "mlfd.artifact": art.key}
        if stage.levels != "-":
            tags[TAG_LEVEL] = stage.levels[1:]
        if "cache_on_device" in art.meta():  # joint teachers: were the feature caches read whole on the device?
            tags["mlfd.cache_on_device"] = str(art.meta()["cache_on_device"]).lower()
        datasets = sorted({r["dataset"] for r in rows})
        if len(datasets) == 1:
            tags[TAG_DATASET] = datasets[0]
        rid = t.start_run(stage.label, tags, reuse={TAG_PARENT: self.parent, TAG_STAGE: stage.label})
        by_epoch: dict[int, dict[str, float]] = {}
        for c in curves:
            name = c["metric"] if len(datasets) == 1 or c["dataset"] == "all" else f"{c['metric']}/{c['dataset']}"
            by_epoch.setdefault(c["epoch"], {})[name] = c["value"]
        for epoch, m in sorted(by_epoch.items()):
            t.log_metrics(rid, m, step=epoch)
        final = {}
        for r in rows:
            sfx = "" if len(datasets) == 1 else f"/{r['dataset']}"
            final[f"{r['split']}/acc1{sfx}"] = r["acc1"]
            final[f"{r['split']}/acc5{sfx}"] = r["acc5"]
        t.log_metrics(rid, {f"best/{k}" if k.startswith("val/") else k: v for k, v in final.items()},
                      step=max(by_epoch) if by_epoch else 0)
        t.end_run(rid)

    def finish(self, files: dict[str, Path] | None = None, status: str = "FINISHED") -> None:
        t = self.tracker
        for name in ("results.parquet", "results.md", "pipeline.yaml"):
            if (self.out / name).is_file():
                t.log_artifact(self.parent, self.out / name)
        for p in (files or {}).values():
            t.log_artifact(self.parent, p, "report")
        t.end_run(self.parent, status)


def log_report_to_mlflow(files: dict[str, Path], run_id: str, tracking_uri: str, artifact_path: str = "report"
                         ) -> None:
    """Log a report's files (report.md and the PNGs) as artifacts of an existing MLflow run.

    Uses an explicit :class:`mlflow.MlflowClient`, so the process-wide tracking URI and active run are untouched.

    Args:
        files: What :func:`mlfd.report.write_report` returned.
        run_id: The MLflow run to attach them to.
        tracking_uri: Its tracking URI (``sqlite:///...`` or a server URL).
        artifact_path: Folder inside the run's artifacts.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in dict.fromkeys(Path(p) for p in files.values()):
        if path.suffix in (".md", ".png") and path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
