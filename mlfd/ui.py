"""``mlfd ui``: MLflow's own UI server (``mlflow server``) for a run's tracking database, bound to 127.0.0.1.

What this adds to ``mlflow server``: it finds ``OUT/mlflow.db`` of a run or search directory, binds 127.0.0.1 unless
told otherwise, puts artifacts uploaded through the UI next to the database, and refuses a missing database, a file
store or a busy port with one line before starting anything. Everything else is MLflow's: this process becomes
``mlflow server`` (exec), so Ctrl-C, logging and shutdown are MLflow's own; options after ``--`` go to it unchanged.

Also runnable as ``python -m mlfd.ui [--out DIR | --tracking-uri URI] [--port P] [--host H] [-- MLFLOW_OPTIONS]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

from mlfd.errors import SpecError

DEFAULT_DIR = "runs/latest"
DB_FILE = "mlflow.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
REMOTE_SCHEMES = ("http://", "https://")
DB_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")


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


def url_for(host: str, port: int) -> str:
    """The URL a browser on this machine uses for a server bound to ``host:port``."""
    h = DEFAULT_HOST if host in ("", "0.0.0.0", "::") else host
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


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


def server_command(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                   extra: list[str] | None = None) -> list[str]:
    """The ``mlflow server`` command line for a backend store (``extra``: more ``mlflow server`` options).

    For a SQLite store, artifacts uploaded through the UI go to ``mlartifacts/`` next to the database instead of
    the current directory.
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port)]
    db = _sqlite_path(tracking_uri)
    if db is not None:
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return cmd + list(extra or [])


def serve_ui(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
             extra: list[str] | None = None) -> int:
    """Become ``mlflow server`` for ``tracking_uri`` (does not return unless the URI is a remote server).

    Returns:
        0 for an ``http(s)://`` URI: that tracking server already serves its UI, whose address is printed.

    Raises:
        SpecError: The port cannot be bound.
    """
    if tracking_uri.startswith(REMOTE_SCHEMES):
        print(f"MLflow UI: {tracking_uri.rstrip('/')} (a tracking server already serves it)", flush=True)
        return 0
    check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mlfd ui: warning: listening on {host}, not only on this machine", file=sys.stderr, flush=True)
    print(f"MLflow UI: {url_for(host, port)} (serving {tracking_uri}; Ctrl-C stops it)", flush=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI job runners: extra processes, unused here
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's store is --backend-store-uri, nothing else
    cmd = server_command(tracking_uri, host, port, extra)
    os.execve(cmd[0], cmd, env)
    return 1  # pragma: no cover - execve does not return


def _add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, metavar="DIR",
                       help=f"run or search directory holding {DB_FILE} (default: {DEFAULT_DIR})")
    where.add_argument("--tracking-uri", default=None, metavar="URI",
                       help="tracking store instead, e.g. sqlite:///path/to/mlflow.db")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to bind (default: {DEFAULT_HOST}, this machine only)")
    p.add_argument("mlflow_args", nargs=argparse.REMAINDER, metavar="-- MLFLOW_OPTIONS",
                   help="after --: more `mlflow server` options, e.g. -- --workers 2")


def _cmd_ui(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.out, args.tracking_uri)
    extra = list(args.mlflow_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return serve_ui(uri, host=args.host, port=args.port, extra=extra)


def add_ui_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``ui`` subcommand to an argparse subparsers object.

    Args:
        sub: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new subparser (its ``func`` default runs the command and returns an exit code).
    """
    p = sub.add_parser("ui", help="open the MLflow UI of a run's tracking database (127.0.0.1 only)",
                       description="Run `mlflow server` for DIR/mlflow.db (or --tracking-uri) on 127.0.0.1; "
                                   "Ctrl-C stops it.")
    _add_arguments(p)
    p.set_defaults(func=_cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m mlfd.ui``: the same options as ``mlfd ui``; bad input exits 2."""
    p = argparse.ArgumentParser(prog="python -m mlfd.ui", description="Run the MLflow UI; Ctrl-C stops it.")
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _cmd_ui(args)
    except SpecError as e:
        print(f"mlfd ui: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
