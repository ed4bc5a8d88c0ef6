"""The MLflow client of a job: one experiment, calls that survive a server that went away (a local JSONL journal of
failed calls, replayed later), run tags, and params flattened from specs."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from mlfd.errors import SpecError
from mlfd.tracking.redaction import redact, safe_uri

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


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
                 placeholder: str | None = None, reuse: dict[str, str] | None = None) -> None:
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
        if reuse:
            entry["reuse"] = reuse
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
                # a run to continue if one carries these tags (looked up now: the server was away when asked)
                found = self._search_run(self._resolve(c["reuse"])) if c.get("reuse") else None
                if found is not None:
                    self.client.update_run(found, status="RUNNING")
                    self._remember(c["placeholder"], found)
                    done += 1
                    continue
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
        try:
            return self._search_run(tags)
        except Exception as e:  # noqa: BLE001
            if not _transient(e):
                raise
            self._down_until = time.monotonic() + RETRY_AFTER_S
            return None

    def _search_run(self, tags: dict[str, str]) -> str | None:
        """The oldest run of the experiment carrying ``tags`` (raises what the client raises)."""
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=5,
                                       order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def start_run(self, name: str, tags: dict[str, str], reuse: dict[str, str] | None = None) -> str:
        """A new run, or the existing one carrying the ``reuse`` tags (set back to RUNNING).

        With the server unreachable the run is created in the journal and gets a ``pending-...`` id until replayed.
        """
        import uuid

        tags = self._resolve(tags)
        args, kwargs = (self.experiment_id,), {"run_name": name, "tags": tags}
        err = None
        if reuse:
            reuse = self._resolve(reuse)
            looked = not (self._pending() or _mentions_pending(reuse))
            if looked:
                try:
                    rid = self._search_run(reuse)
                except Exception as e:  # noqa: BLE001
                    if not _transient(e):
                        raise
                    self._down_until = time.monotonic() + RETRY_AFTER_S
                    err, looked = e, False
                else:
                    if rid is not None:
                        self.call("update_run", rid, status="RUNNING")
                        return rid
            if not looked:  # whether a run to continue exists is asked again when the journal is replayed
                placeholder = PENDING_PREFIX + uuid.uuid4().hex
                self._journal("create_run", args, kwargs, err, placeholder=placeholder, reuse=reuse)
                return placeholder
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
