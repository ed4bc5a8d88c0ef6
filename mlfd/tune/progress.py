"""What ``mlfd tune`` shows while it runs: a compact live view of each study, and Ray's own output kept in a file.

* :class:`LiveView` is a Ray Tune callback: one line per finished, stopped or failed trial (with the reason when it
  failed), and a progress line per study (trials done/total, running, best so far with its trial, elapsed, ETA).
  On a terminal the progress line is redrawn in place; elsewhere (a log file, CI) it is written only when a trial
  ends, so logs stay short. It writes through the ``mlfd.tune.progress`` logger: ``-q`` silences it.
* :class:`ThirdPartyLogs` sends the records of Ray's, Optuna's and MLflow's loggers (the token-auth banner, snapshot
  warnings, Optuna's "new study" lines, MLflow's notices) to ``OUT/logs/ray.log`` instead of the screen;
  ``--verbose`` shows them on screen as well (and Ray Tune's own progress tables, which are off otherwise).

The view pickles without streams or handlers: Ray stores callbacks with the experiment, and a restored study brings
its pickled view back (reset by :meth:`LiveView.setup` at the start of every session).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from logging.handlers import MemoryHandler
from pathlib import Path

from ray.tune import Callback

_logger = logging.getLogger(__name__)

RAY_LOG = Path("logs") / "ray.log"
"""Where Ray's, Optuna's and MLflow's log records go, relative to the search's output directory."""
THIRD_PARTY_LOGGERS = ("ray", "ray.data", "optuna", "mlflow")
"""Loggers that write to the screen on their own (a handler of their own and no propagation)."""
REDRAW_S = 0.5
"""Seconds between two redraws of the progress line on a terminal."""
BAR_WIDTH = 20


def error_reason(text: str | None, limit: int = 300) -> str:
    """The last line of an error trace (``DivergedError: loss became nan at epoch 2, step 3``), without the module
    path of the exception class; empty for no text."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    m = re.match(r"([\w.]+\.)(\w+(Error|Exception|Interrupt)\b.*)", last)
    return (m.group(2) if m else last)[:limit]


def clock(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def trial_number(trial, offset: int = 0) -> str:
    """``#3``: Ray's creation counter of the trial in its study (the start of its experiment tag) plus ``offset`` (the
    trials of a study's earlier rounds, before an ``--extend``), else its id."""
    m = re.match(r"(\d+)_", str(getattr(trial, "experiment_tag", "") or ""))
    return f"#{int(m.group(1)) + offset}" if m else str(trial.trial_id)


class LiveView(Callback):
    """The live view of one study (see the module docstring).

    Args:
        study: the study's name, printed at the start of its lines.
        metric: the searched metric (``val/acc1``).
        mode: ``max`` or ``min``.
        max_epochs: the epochs of a trial that runs to the end (a trial with fewer was stopped by the scheduler).
        offset: added to Ray's trial numbers (the trials of the study's earlier rounds, for an ``--extend``).
    """

    def __init__(self, study: str, metric: str, mode: str, max_epochs: int, offset: int = 0):
        self.study, self.metric, self.mode, self.max_epochs = study, metric, mode, max_epochs
        self.offset = offset
        self._reset()

    def _reset(self, total: int = 0) -> None:
        self.total = total
        self.start = time.monotonic()
        self.ended: set[str] = set()  # trials that ended in this session (a resumed study starts with some done)
        self.retried: set[str] = set()  # trials whose out-of-memory retry has been shown
        self.last_draw = 0.0
        self.drawn = False  # a progress line is on screen, not yet ended by a newline (terminal only)
        self.enabled = _logger.isEnabledFor(logging.INFO)
        self.tty = self.enabled and sys.stderr.isatty()

    def _number(self, trial) -> str:
        return trial_number(trial, getattr(self, "offset", 0))  # a view pickled before offsets existed has none

    # --- Ray Tune's hooks -------------------------------------------------------------------------------------------

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self._reset(int(total_num_samples or num_samples or 0))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.tty and time.monotonic() - self.last_draw >= REDRAW_S:
            self._draw(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("oom_retries") and trial.trial_id not in self.retried:
            self.retried.add(trial.trial_id)
            self._line(f"  {self.study} trial {trial_number(trial)} ({trial.trial_id}) ran out of memory; retried "
                       f"in the same trial with micro-batch {result.get('micro_batch_size')} x "
                       f"{result.get('accum_steps')} accumulation steps")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        epochs = int(trial.last_result.get("training_iteration", 0) or 0)
        if epochs >= self.max_epochs:
            what = f"finished {epochs}/{self.max_epochs} epochs"
        else:
            what = f"stopped early at epoch {epochs}/{self.max_epochs} (scheduler)"
        if trial.last_result.get("oom_retries"):
            what += f" (after an out-of-memory retry, micro-batch {trial.last_result.get('micro_batch_size')})"
        self._trial_ended(trials, trial, f"{what}, {self.metric} {self._value(trial)}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._line(f"  {self.study} trial {self._number(trial)} ({trial.trial_id}) failed, retrying: "
                   f"{self._reason(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._trial_ended(trials, trial, f"FAILED: {self._reason(trial)}")

    def on_experiment_end(self, trials: list, **info) -> None:
        if not self.enabled:
            return
        if self.tty:
            self._draw(trials, final=True)
        else:
            self._line(self.bar(trials))

    # --- what is shown ------------------------------------------------------------------------------------------------

    def bar(self, trials: list, now: float | None = None) -> str:
        """``  digits [##########----------] 2/4 done, 2 running, best val/acc1 52.00 (#1), 1m05s, ETA ~1m10s``."""
        ended = self._done(trials)
        done = len(ended)
        running = sum(t.status == "RUNNING" and t.trial_id not in ended for t in trials)
        total = max(self.total, len(trials), 1)
        filled = round(BAR_WIDTH * done / total)
        elapsed = (now if now is not None else time.monotonic()) - self.start
        best = self.best(trials)
        parts = [f"{done}/{total} done", f"{running} running"]
        if best is not None:
            parts.append(f"best {self.metric} {best[0]:.2f} ({self._number(best[1])})")
        parts.append(clock(elapsed))
        if done < total:
            # Trials still to end, at the pace of those that ended in this session: a rough guide, not a promise.
            parts.append(f"ETA ~{clock(elapsed / len(self.ended) * (total - done))}" if self.ended else "ETA ?")
        return f"  {self.study} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {', '.join(parts)}"

    def _done(self, trials: list) -> set[str]:
        """Ids of the trials that ended: Ray calls the callbacks of a trial that ends before it changes its status."""
        return {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | self.ended

    def best(self, trials: list) -> tuple[float, object] | None:
        """(best value of the metric so far, its trial), over every epoch each trial reported."""
        found = [(v, t) for t in trials if (v := self._best_of(t)) is not None]
        if not found:
            return None
        return max(found, key=lambda p: p[0]) if self.mode == "max" else min(found, key=lambda p: p[0])

    def _best_of(self, trial) -> float | None:
        analysis = (getattr(trial, "metric_analysis", None) or {}).get(self.metric) or {}
        value = analysis.get(self.mode, (trial.last_result or {}).get(self.metric))
        return float(value) if isinstance(value, (int, float)) else None

    def _value(self, trial) -> str:
        v = self._best_of(trial)
        return f"{v:.2f} (best epoch)" if v is not None else "not reported"

    @staticmethod
    def _reason(trial) -> str:
        """The last line of the trial's latest error: from its error.txt on this machine (written before Ray calls
        the callbacks), else from the experiment's storage (synced later)."""
        text = None
        try:
            if trial.error_file and Path(trial.error_file).is_file():
                text = Path(trial.error_file).read_text(errors="replace")
            text = text or trial.get_error()
        except Exception:  # noqa: BLE001 - storage gone: say where to look instead
            pass
        return error_reason(text) or f"see {trial.error_file or 'error.txt in the trial directory'}"

    def _trial_ended(self, trials: list, trial, what: str) -> None:
        self.ended.add(trial.trial_id)
        self._line(f"  {self.study} trial {self._number(trial)} ({trial.trial_id}) {what}")
        if not self.enabled:
            return
        if self.tty:
            self._draw(trials)
        elif len(self._done(trials)) < max(self.total, len(trials)):
            self._line(self.bar(trials))  # the last one is written by on_experiment_end

    def _line(self, text: str) -> None:
        """A line that stays: on a terminal it replaces the progress line, which is drawn again after it."""
        if self.tty and self.drawn:
            sys.stderr.write("\r\x1b[2K")
            self.drawn = False
        _logger.info(text)

    def _draw(self, trials: list, final: bool = False) -> None:
        sys.stderr.write("\r\x1b[2K" + self.bar(trials) + ("\n" if final else ""))
        sys.stderr.flush()
        self.drawn = not final
        self.last_draw = time.monotonic()


class ThirdPartyLogs:
    """Ray's, Optuna's and MLflow's log records: held in memory until :meth:`open` names the file (so that a search
    refused before it claims its output directory writes nothing there), then written to it; on screen too with
    ``verbose``. :meth:`restore` puts the loggers back as they were."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.buffer = MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self.buffer.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.file: logging.Handler | None = None
        self.saved: dict[str, tuple[list, bool]] = {}
        import optuna

        optuna.logging.get_verbosity()  # Optuna installs its screen handler at first use: now, so that it is taken
        self._take(self.buffer)

    def _take(self, target: logging.Handler) -> None:
        """Point every logger of THIRD_PARTY_LOGGERS at ``target`` (again: MLflow, imported later, resets its own
        logger's handlers)."""
        for name in THIRD_PARTY_LOGGERS:
            log = logging.getLogger(name)
            if not any(h in (self.buffer, self.file) for h in log.handlers):  # not ours yet, or reset since
                self.saved[name] = (list(log.handlers), log.propagate)
            for h in list(log.handlers):
                on_screen = isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                if h is self.buffer or (on_screen and not self.verbose):
                    log.removeHandler(h)
            log.addHandler(target)
            log.propagate = False

    def open(self, path: Path) -> None:
        """Write what was held, and every later record, to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.buffer.formatter)
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        self._take(self.file)

    def restore(self) -> None:
        for name, (handlers, propagate) in self.saved.items():
            log = logging.getLogger(name)
            for h in list(log.handlers):
                log.removeHandler(h)
            for h in handlers:
                log.addHandler(h)
            log.propagate = propagate
        self.buffer.setTarget(None)
        self.buffer.close()
        if self.file is not None:
            self.file.close()
