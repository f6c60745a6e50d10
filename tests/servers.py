"""Real service processes for tests that need sockets, signals or uvicorn itself (not the in-process client).

The server's output goes to a file, never to a pipe nobody reads: a full pipe would block the
server's logging, and with it the server, after a few hundred access-log lines.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


class Server(subprocess.Popen[bytes]):
    """``oaml serve`` in a child process, its output in ``log``."""

    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = 120) -> str:
        """Wait for the process to exit (a failed start-up) and return its output."""
        self.wait(timeout=timeout)
        return self.output()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    weights: Path, data_dir: Path, port: int, command: Sequence[str] = ("-m", "oaml", "serve"), **env: str
) -> Server:
    """``env`` adds ``OAML_*`` settings; ``command``: the Python arguments that start it."""
    full = {
        **os.environ,
        "OAML_WEIGHTS": str(weights),
        "OAML_DATA_DIR": str(data_dir),
        "OAML_PORT": str(port),
        "OAML_TORCH_THREADS": "1",
        **env,
    }
    fd, name = tempfile.mkstemp(prefix="oaml-server-", suffix=".log")
    # gone when the test session ends (a failing test has put what it needed of it in its message): a run
    # starts about 150 servers, and a machine that keeps its /tmp between runs would keep every log
    atexit.register(Path(name).unlink, missing_ok=True)
    with os.fdopen(fd, "wb") as log:
        proc = Server([sys.executable, *command], cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT)
    proc.log = Path(name)
    return proc


def wait_ready(proc: Server | None, port: int, timeout: float = 90) -> None:
    """Until 127.0.0.1:``port`` answers /ready with 200; fails at once if ``proc`` (when given) exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.output()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server on port {port} did not become ready in {timeout:.0f} s")
