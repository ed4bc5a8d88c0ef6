"""Stop a search whose trials no live node can host, instead of waiting forever.

When a Ray node is lost, Tune retries its trials elsewhere (``max_failures``). If no surviving node has the resources
one trial asks for (a trial of ``resources.cpu=2`` after the only 2-CPU node died), Ray Tune keeps the trial PENDING
for ever and only logs an "insufficient resources" warning. :class:`LostNodeWatch`, a Tune callback, notices that: while
trials are pending it compares each one's request with the *total* resources of every live node (not what is free now,
so trials merely queued behind others on a healthy cluster never count), and when none can ever host one for
``timeout`` seconds it stops the search the way Ctrl-C does: Tune saves the experiment state, so ``mlfd tune --resume``
on a healthy cluster finishes it. ``mlfd tune`` then exits 2 with one line naming the lost node(s)
(:class:`mlfd.errors.NodeLost`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable

from ray.tune import Callback

from mlfd.errors import NodeLost
from mlfd.tune._private import tuner_callbacks

_logger = logging.getLogger(__name__)

POLL_S = 1.0
"""Seconds between two looks at the cluster's node table while trials are pending."""
SHOWN = 3
"""Lost nodes named in the error line (the rest are counted)."""


def fits(request: dict[str, float], resources: dict[str, float]) -> bool:
    """Whether a node with ``resources`` in all can host one bundle ``request`` (zero entries ask for nothing)."""
    return all(float(resources.get(k, 0.0)) + 1e-9 >= float(v) for k, v in request.items() if v and v > 0)


def unhostable(nodes: list[dict], bundles: list[dict[str, float]]) -> bool:
    """Whether no live node of ``nodes`` (``ray.nodes()`` entries: ``Alive``, ``Resources`` = the node's totals) can
    ever host one of ``bundles`` (a trial's placement group bundles, each placed on one node)."""
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    return not all(any(fits(b, r) for r in alive) for b in bundles)


def lost_nodes(nodes: list[dict], before: Iterable[str] = ()) -> list[dict]:
    """The dead nodes of ``nodes``: those that died since the node ids in ``before`` were dead if any did, else all."""
    dead = [n for n in nodes if not n.get("Alive")]
    known = set(before)
    return [n for n in dead if n.get("NodeID") not in known] or dead


def _format(request: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(request.items()) if v and v > 0) or "nothing"


def stuck_reason(nodes: list[dict], bundles: list[dict[str, float]], waited: float,
                 before: Iterable[str] = ()) -> str:
    """One line: which nodes were lost (id and IP) and what a waiting trial needs that no live node has."""
    lost = lost_nodes(nodes, before)
    named = [f"{n.get('NodeID', '?')} ({n.get('NodeManagerAddress', '?')})" for n in lost[:SHOWN]]
    if len(lost) > SHOWN:
        named.append(f"and {len(lost) - SHOWN} more")
    largest = max((n.get("Resources") or {} for n in nodes if n.get("Alive")),
                  key=lambda r: float(r.get("CPU", 0.0)) + 1000 * float(r.get("GPU", 0.0)), default={})
    need = " + ".join(f"[{_format(b)}]" for b in bundles)
    what = (f"no live node can host a waiting trial ({need}; the largest live node has "
            f"{_format({k: v for k, v in largest.items() if k in ('CPU', 'GPU')})}) for {waited:.0f} s")
    if lost:
        return f"lost Ray node {', '.join(named)}: {what}"
    return f"{what}, and no Ray node was lost: the trial asks for more than any node of the cluster has"


def trial_bundles(trial) -> list[dict[str, float]]:
    """The resource bundles a Tune trial asks for, each of which one node must hold (STRICT_PACK: all on one)."""
    pgf = trial.placement_group_factory
    bundles = [b for b in pgf.bundles if any(v and v > 0 for v in b.values())]
    return [pgf.required_resources] if pgf.strategy == "STRICT_PACK" else bundles


class LostNodeWatch(Callback):
    """Tune callback: stop the search (like Ctrl-C) when pending trials fit on no live node for ``timeout`` seconds.

    Args:
        timeout: seconds to wait for a node that can host them (0: wait for ever, e.g. for an autoscaler).
        poll: seconds between two reads of ``ray.nodes()`` while trials are pending.
    """

    def __init__(self, timeout: float, poll: float = POLL_S) -> None:
        self.timeout, self.poll = float(timeout), float(poll)
        self.reason: str | None = None
        self._since: float | None = None
        self._last = -float("inf")
        self._dead_at_start: set[str] | None = None

    def __getstate__(self) -> dict:  # pickled with the experiment: the settings only, not this run's state
        return {"timeout": self.timeout, "poll": self.poll}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.timeout <= 0 or self.reason is not None:
            return
        pending = [t for t in trials if t.status == "PENDING"]
        now = time.monotonic()
        if not pending:
            self._since = None
            return
        if now - self._last < self.poll:
            return
        self._last = now
        import ray

        nodes = ray.nodes()
        if self._dead_at_start is None:
            self._dead_at_start = {n.get("NodeID") for n in nodes if not n.get("Alive")}
        stuck = [b for b in map(trial_bundles, pending) if unhostable(nodes, b)]
        if not stuck:
            self._since = None
            return
        if self._since is None:
            self._since = now
            _logger.warning("%d trial(s) wait for resources that no live Ray node has; the search stops in %g s "
                            "unless a node that fits joins", len(stuck), self.timeout)
            return
        if now - self._since >= self.timeout:
            self.reason = stuck_reason(nodes, stuck[0], now - self._since, self._dead_at_start)
            self._stop()

    def _stop(self) -> None:
        """What Ctrl-C does: Tune's SIGINT handler ends the run after saving the experiment state."""
        handler = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and callable(handler) and \
                handler is not signal.default_int_handler:
            handler(signal.SIGINT, None)
        else:  # Tune installed no handler (TUNE_DISABLE_SIGINT_HANDLER): end the run now, from its last saved state
            raise NodeLost(f"{self.reason}; the search stopped; continue on a healthy cluster with --resume")

    def raise_if_stopped(self, hint: str) -> None:
        """After ``Tuner.fit``: raise :class:`NodeLost` (the reason, then ``hint``) if this watch stopped the run."""
        if self.reason is not None:
            raise NodeLost(f"{self.reason}; the search stopped with its state saved; {hint}")


def rewatch(tuner, callbacks: list) -> None:
    """Make a restored ``Tuner`` run with the ``LostNodeWatch`` of ``callbacks`` (this command's timeout, and the
    object :meth:`LostNodeWatch.raise_if_stopped` is asked on) instead of the copy pickled with the experiment."""
    live = tuner_callbacks(tuner)
    if live is None:  # Ray Client: the run happens in a remote actor
        return
    live[:] = [c for c in live if not isinstance(c, LostNodeWatch)] + [c for c in callbacks
                                                                        if isinstance(c, LostNodeWatch)]
