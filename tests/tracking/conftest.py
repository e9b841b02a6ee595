"""A real `mlflow server` on loopback for the tracking tests: random free port, sqlite store and
artifact root in a temp dir, started in its own process group so that it and every worker it
spawns can be killed together, with hard timeouts on start-up and shutdown.

Start-up is made cheap and the waits generous, for a loaded machine: one server per session
(`mlflow_server`; a test that stops it starts it again), stores copied from one migrated empty
store (`store_template`: a fresh sqlite store's migrations take 4-8 s), and up to 300 s for the
health endpoint to answer."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import seed_store  # also imported from here; the store_template fixture is in tests/conftest.py

START_TIMEOUT_S = 300  # 90 s was once not enough on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, backend_uri: str | None = None, port: int | None = None,
                 template: Path | None = None):
        self.root, self.port = root, port or free_port()
        self.backend_uri = backend_uri or f"sqlite:///{root / 'server.db'}"
        if template is not None and backend_uri is None:
            seed_store(template, root / "server.db")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no background job workers: faster start
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", self.backend_uri,
               "--default-artifact-root", str(self.root / "artifacts")]
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"mlflow server did not become healthy in {START_TIMEOUT_S} s:\n"
                    + (self.root / "server.log").read_text()[-3000:])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server's process group (uvicorn worker included) and wait for it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this fixture created, nothing else
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        self.proc = None


@pytest.fixture(scope="session")
def _session_server(tmp_path_factory, store_template):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), template=store_template)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(_session_server):
    """The session's server, running (started again if a test stopped it); tests tell their runs
    apart by run id, never by what else is in the store."""
    if _session_server.proc is None or not _session_server.healthy():
        _session_server.stop()
        _session_server.start()
    return _session_server
