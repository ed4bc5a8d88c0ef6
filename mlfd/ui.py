"""``mlfd ui``: the MLflow UI (``mlflow server``) for a run's tracking database, bound to 127.0.0.1.

The server runs as ``sys.executable -m mlflow server ...`` in its own process group (session), so a Ctrl-C in the
terminal reaches only this process, which then stops the whole server group (uvicorn and its helpers) with SIGTERM,
escalating to SIGKILL if it lingers. MLflow's background job runner (used by GenAI features, several extra
processes) is disabled unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set in the environment.

Also runnable as ``python -m mlfd.ui [--out DIR | --tracking-uri URI] [--port P] [--host H]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from mlfd.errors import SpecError

DEFAULT_DIR = "runs/latest"
DB_FILE = "mlflow.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
REMOTE_SCHEMES = ("http://", "https://")
DB_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")


# --------------------------------------------------------------------------------------------------------------------
# Tracking URI
# --------------------------------------------------------------------------------------------------------------------


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other schemes)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def resolve_tracking_uri(out: str | Path | None = None, tracking_uri: str | None = None) -> str:
    """The tracking URI the UI should serve.

    Args:
        out: A run or search directory holding ``mlflow.db`` (default ``runs/latest``); ignored when
            ``tracking_uri`` is given.
        tracking_uri: An explicit URI: ``sqlite:///path.db``, another SQLAlchemy database URL, or ``http(s)://``.

    Returns:
        The URI, with a SQLite path made absolute.

    Raises:
        SpecError: The database file does not exist, or the URI is a file store / unknown scheme.
    """
    if tracking_uri:
        if tracking_uri.startswith(REMOTE_SCHEMES):
            return tracking_uri
        db = _sqlite_path(tracking_uri)
        if db is not None:
            if not db.is_file():
                raise SpecError(f"--tracking-uri: database file {db} does not exist")
            return f"sqlite:///{db.resolve()}"
        if tracking_uri.startswith(DB_SCHEMES):
            return tracking_uri
        raise SpecError(f"--tracking-uri: unsupported URI {tracking_uri!r}; allowed: sqlite:///path/to/mlflow.db, "
                        f"another SQLAlchemy database URL (postgresql://..., mysql://...), or http(s)://host:port "
                        f"(MLflow 3 refuses file: stores)")
    d = Path(out if out is not None else DEFAULT_DIR)
    db = (d / DB_FILE).resolve()
    if not db.is_file():
        raise SpecError(f"--out {d}: no MLflow database {db}; run `mlfd run`/`mlfd tune` with tracking into {d} "
                        f"first, or pass --tracking-uri")
    return f"sqlite:///{db}"


# --------------------------------------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------------------------------------


def url_for(host: str, port: int) -> str:
    """The URL a browser on this machine uses for a server bound to ``host:port``."""
    h = DEFAULT_HOST if host in ("", "0.0.0.0", "::") else host
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> None:
    """Fail early, with a clear message, when ``host:port`` cannot be bound.

    Raises:
        SpecError: The port is out of range or already in use.
    """
    if not 1 <= port <= 65535:
        raise SpecError(f"--port: must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SpecError(f"--port {port}: cannot listen on {host} ({e.strerror or e}); pick another port") from None


def server_command(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = 1
                   ) -> list[str]:
    """The ``mlflow server`` command line for a backend store.

    For a SQLite store, artifacts uploaded through the UI go to ``mlartifacts/`` next to the database instead of
    the current directory.
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", str(workers)]
    db = _sqlite_path(tracking_uri)
    if db is not None:
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return cmd


def start_ui(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
             log: str | Path | IO[Any] | None = None, workers: int = 1) -> subprocess.Popen:
    """Start ``mlflow server`` for ``tracking_uri`` in its own process group; returns at once.

    Args:
        tracking_uri: The backend store (see :func:`resolve_tracking_uri`).
        host: Interface to bind (127.0.0.1 unless told otherwise).
        port: TCP port.
        log: File (path or open binary/text file) for the server's stdout and stderr; None inherits ours.
        workers: uvicorn worker processes.

    Returns:
        The server process (its pid is also its process-group id). Stop it with :func:`stop_ui`.
    """
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's store is --backend-store-uri, nothing else
    cmd = server_command(tracking_uri, host, port, workers)
    if isinstance(log, (str, Path)):
        with open(log, "ab") as f:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None,
                            env=env, start_new_session=True)


def wait_ready(url: str, timeout: float = READY_TIMEOUT, proc: subprocess.Popen | None = None,
               stop: threading.Event | None = None) -> bool:
    """Poll ``url`` until it answers HTTP 200.

    Args:
        url: e.g. ``http://127.0.0.1:5000/``.
        timeout: Seconds to wait.
        proc: The server process; if it exits first, fail at once instead of waiting out the timeout.
        stop: An event that aborts the wait (Ctrl-C during startup).

    Returns:
        True when the URL answered 200; False when ``stop`` was set first.

    Raises:
        RuntimeError: ``proc`` exited before answering.
        TimeoutError: No 200 within ``timeout`` seconds.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send localhost via a proxy
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return False
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering {url}")
        try:
            with opener.open(url, timeout=5) as r:
                if r.status == 200:
                    return True
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if stop is not None:
            stop.wait(0.5)
        else:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer HTTP 200 within {timeout:.0f} s (last: {last})")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused id owned by someone else: not ours any more
        return False
    return True


def stop_ui(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop a server started by :func:`start_ui`: SIGTERM to its process group, SIGKILL after ``timeout``.

    Args:
        proc: What :func:`start_ui` returned.
        timeout: Seconds to wait for a clean exit before killing.

    Returns:
        The server's exit code (None if it could not be reaped).
    """
    pgid = proc.pid  # start_new_session=True: the server leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + min(timeout, 5.0)
    while _group_alive(pgid) and time.monotonic() < deadline:  # helpers (uvicorn workers) still shutting down
        time.sleep(0.1)
    if proc.poll() is None or _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    return proc.returncode


def _tail(path: str, n: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    return ""


def serve_ui(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
             ready_timeout: float = READY_TIMEOUT) -> int:
    """Run the MLflow UI until Ctrl-C (SIGINT) or SIGTERM, then stop the server cleanly.

    Prints ``MLflow UI: http://127.0.0.1:PORT`` on stdout once the server answers HTTP. Server output goes to a
    temporary log file, kept (and its tail printed) only when the server fails.

    Args:
        tracking_uri: The backend store; ``http(s)://`` URIs already have a UI, which is just printed.
        host: Interface to bind; 127.0.0.1 unless told otherwise.
        port: TCP port.
        ready_timeout: Seconds to wait for the server to answer.

    Returns:
        0 after a signal-requested stop; 1 when the server failed to start or died.

    Raises:
        SpecError: The port cannot be bound.
    """
    if tracking_uri.startswith(REMOTE_SCHEMES):
        print(f"MLflow UI: {tracking_uri.rstrip('/')} (a tracking server already serves it)", flush=True)
        return 0
    check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mlfd ui: warning: listening on {host}, not only on this machine", file=sys.stderr, flush=True)
    url = url_for(host, port)
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    fd, log = tempfile.mkstemp(prefix="mlfd-ui-", suffix=".log")
    failed = False
    try:
        with os.fdopen(fd, "wb") as f:
            proc = start_ui(tracking_uri, host, port, log=f)
        try:
            try:
                ready = wait_ready(url + "/", ready_timeout, proc, stop)
            except (RuntimeError, TimeoutError) as e:
                failed = True
                print(f"mlfd ui: {e}; server log {log}:\n{_tail(log)}", file=sys.stderr, flush=True)
                return 1
            if ready:
                print(f"MLflow UI: {url}", flush=True)
                print(f"mlfd ui: serving {tracking_uri}; Ctrl-C stops it", file=sys.stderr, flush=True)
            while not stop.is_set():
                if proc.poll() is not None:
                    failed = True
                    print(f"mlfd ui: mlflow server exited with code {proc.returncode}; server log {log}:\n"
                          f"{_tail(log)}", file=sys.stderr, flush=True)
                    return 1
                stop.wait(0.5)
            return 0
        finally:
            stop_ui(proc)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        if not failed:
            with contextlib.suppress(OSError):
                os.unlink(log)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, metavar="DIR",
                       help=f"run or search directory holding {DB_FILE} (default: {DEFAULT_DIR})")
    where.add_argument("--tracking-uri", default=None, metavar="URI",
                       help="tracking store instead, e.g. sqlite:///path/to/mlflow.db")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to bind (default: {DEFAULT_HOST}, this machine only)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT, metavar="S",
                   help=f"seconds to wait for the server to answer (default: {READY_TIMEOUT:.0f})")


def _cmd_ui(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.out, args.tracking_uri)
    return serve_ui(uri, host=args.host, port=args.port, ready_timeout=args.ready_timeout)


def add_ui_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``ui`` subcommand to an argparse subparsers object.

    Args:
        sub: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new subparser (its ``func`` default runs the command and returns an exit code).
    """
    p = sub.add_parser("ui", help="open the MLflow UI of a run's tracking database (127.0.0.1 only)",
                       description="Start `mlflow server` for DIR/mlflow.db (or --tracking-uri) and wait; "
                                   "Ctrl-C stops it.")
    _add_arguments(p)
    p.set_defaults(func=_cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m mlfd.ui``: the same options as ``mlfd ui``; bad input exits 2."""
    p = argparse.ArgumentParser(prog="python -m mlfd.ui", description="Start the MLflow UI; Ctrl-C stops it.")
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _cmd_ui(args)
    except SpecError as e:
        print(f"mlfd ui: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
