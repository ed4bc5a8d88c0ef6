"""Tests of mlfd.ui against a real SQLite MLflow store and a real `mlflow server` (startup takes 10-40 s here)."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mlfd.errors import SpecError
from mlfd.ui import add_ui_parser, resolve_tracking_uri, server_command, url_for

ROOT = Path(__file__).resolve().parents[1]
READY_S = 150.0
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real SQLite tracking store with one finished run: (tracking URI, run id)."""
    import mlflow

    d = tmp_path_factory.mktemp("store")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("ui-test", artifact_location=str(d / "artifacts"))
        with mlflow.start_run(experiment_id=exp, run_name="one") as run:
            mlflow.log_param("student.alpha", 0.5)
            mlflow.log_metric("val/acc1", 61.5, step=1)
        return uri, run.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)


def listening(port: int) -> list[tuple[str, str]]:
    """(table, local address hex) of every TCP socket in LISTEN state on ``port`` (Linux /proc/net)."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.append((table, addr))
    return found


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` and a new server could bind it (closed connections may linger in TIME_WAIT)."""
    if listening(port):
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def server_pids(port: int) -> list[int]:
    """Processes whose command line carries ``--port <port>`` (the server and its uvicorn child)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                args = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a == b"--port" and b == str(port).encode() for a, b in zip(args, args[1:])):
                pids.append(int(p.name))
    return pids


def non_loopback_ip() -> str | None:
    """An IPv4 address of this machine that is not 127.x (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = READY_S) -> None:
    """Poll ``url`` until it answers HTTP 200 (fails at once if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            with OPENER.open(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _read_lines(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_mlfd_ui_serves_the_store_on_loopback_only_and_stops_on_ctrl_c(store: tuple[str, str]) -> None:
    """`mlfd ui` becomes `mlflow server`: it answers on 127.0.0.1 only with the given store, passes options after
    `--` to MLflow, and a Ctrl-C (SIGINT to the terminal's process group) stops every process of the server."""
    uri, run_id = store
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlfd.cli", "ui", "--tracking-uri", uri, "--port", str(port), "--",
                             "--workers", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, q), daemon=True).start()
    try:
        assert q.get(timeout=60) == f"MLflow UI: http://127.0.0.1:{port} (serving {uri}; Ctrl-C stops it)\n"
        wait_ready(f"http://127.0.0.1:{port}/", proc)
        with OPENER.open(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}")
        with OPENER.open(req, timeout=10) as r:  # the UI serves the store it was given
            assert json.loads(r.read())["run"]["data"]["metrics"][0]["value"] == 61.5
        socks = listening(port)
        assert socks == [("tcp", "0100007F")], socks  # 127.0.0.1 only, no 0.0.0.0 and no IPv6
        ip = non_loopback_ip()
        if ip is not None:
            with pytest.raises(OSError), socket.create_connection((ip, port), timeout=3):
                pass
        assert proc.pid in server_pids(port)  # exec'd: mlfd's process is the server
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    t0 = time.monotonic()
    while (server_pids(port) or not port_free(port)) and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    assert not server_pids(port) and port_free(port)  # the whole server group is gone


def test_server_command_binds_loopback_and_keeps_artifacts_next_to_the_database(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert server_command(uri, extra=["--workers", "2"]) == [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", "5000",
        "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "2"]
    assert url_for("0.0.0.0", 8080) == "http://127.0.0.1:8080" and url_for("::1", 5) == "http://[::1]:5"


def test_resolve_tracking_uri(tmp_path: Path, store: tuple[str, str]) -> None:
    with pytest.raises(SpecError, match=r"--out .*: no MLflow database .*mlflow\.db"):
        resolve_tracking_uri(tmp_path)
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert resolve_tracking_uri(None, store[0]) == store[0]
    with pytest.raises(SpecError, match=r"--tracking-uri: database file .*missing\.db does not exist"):
        resolve_tracking_uri(None, f"sqlite:///{tmp_path / 'missing.db'}")
    with pytest.raises(SpecError, match=r"--tracking-uri: unsupported URI 'file:///x'; allowed: sqlite"):
        resolve_tracking_uri(None, "file:///x")
    assert resolve_tracking_uri(None, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.slow
def test_cli_parser_defaults_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="mlfd")
    add_ui_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ui"])
    assert (args.host, args.port, args.out, args.tracking_uri, args.mlflow_args) == ("127.0.0.1", 5000, None, None, [])
    assert parser.parse_args(["ui", "--port", "1", "--", "--workers", "2"]).mlflow_args == ["--", "--workers", "2"]
    with pytest.raises(SystemExit):
        parser.parse_args(["ui", "--out", "x", "--tracking-uri", "sqlite:///y.db"])
    capsys.readouterr()
    args = parser.parse_args(["ui", "--out", str(tmp_path)])
    with pytest.raises(SpecError, match="no MLflow database"):
        args.func(args)
    (tmp_path / "mlflow.db").write_bytes(b"")
    with socket.socket() as s:  # a port that is taken fails before any server starts
        s.bind(("127.0.0.1", 0))
        s.listen()
        args = parser.parse_args(["ui", "--out", str(tmp_path), "--port", str(s.getsockname()[1])])
        with pytest.raises(SpecError, match=r"--port \d+: cannot listen on 127\.0\.0\.1"):
            args.func(args)
    r = subprocess.run([sys.executable, "-m", "mlfd.ui", "--out", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no MLflow database" in r.stderr
