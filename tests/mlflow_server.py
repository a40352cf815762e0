"""A real `mlflow server` on loopback, as a pytest fixture.

Use it from a test module with `from mlflow_server import mlflow_server  # noqa: F401`
(pytest puts tests/ on sys.path). The fixture is module-scoped: starting the server costs
several seconds, so the tests of one module share it. Tests that stop it (outages) must
start it again before they end; the fixture checks and restarts it if they did not.

The server keeps its runs in `<tmp>/mlflow.db` and serves artifacts itself
(`--artifacts-destination <tmp>/artifacts`, proxied as `mlflow-artifacts:/`), so clients
need no shared filesystem, as on a cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

START_TIMEOUT_S = 120.0  # a cold start is ~6 s on an idle machine; the test box is shared


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    """One `mlflow server` process group on 127.0.0.1:`port`, restartable on the same
    port and store."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server and wait (bounded) until /health answers."""
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        with open(self.log, "ab") as log:
            # Own process group: the CLI starts uvicorn as a child; stop() kills both.
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            try:  # doubles as the poll interval, and notices a server that died at start
                self.proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self._tail()}")
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {START_TIMEOUT_S:.0f}s:\n{self._tail()}")

    def stop(self) -> None:
        """Kill the server abruptly (SIGKILL to its process group): an outage, not a
        graceful shutdown. Returns once the port refuses connections."""
        if self.proc is None:
            return
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in procs:  # any that left the group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        self.proc = None
        # The uvicorn child holds the socket; the port is free once every process is gone.
        _, alive = psutil.wait_procs(procs, timeout=30)
        if alive or _port_open(self.port):
            raise RuntimeError(f"mlflow server on port {self.port} did not stop: {alive}")

    def _tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_mlflow_server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The module's server, guaranteed up at the start and end of each test."""
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.start()
