"""A real PostgreSQL server for the shared-store tests, started by the suite itself.

Debian's ``postgresql`` package (``make test`` installs it where it can) puts ``initdb`` and
``pg_ctl`` under ``/usr/lib/postgresql/<version>/bin``. The server runs in a fresh folder under
``/tmp`` on a free port and stops when the session ends. PostgreSQL refuses to run as root, so as
root (CI) it runs as the ``postgres`` system user the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import free_port

__all__ = ["postgres_binaries", "PostgresServer", "running_postgres"]


def postgres_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """A running server: :meth:`new_database` gives each test its own database URL."""

    def __init__(self, bindir: Path, root: Path, port: int, as_user: list[str]) -> None:
        self.bindir, self.root, self.port, self.as_user = bindir, root, port, as_user
        self.admin_url = f"postgresql://oaml@127.0.0.1:{port}/postgres"
        self.data = root / "data"

    def start(self, timeout: float = 60) -> None:
        """Start the server on its folder and port (again, after :meth:`kill`: it recovers from its WAL)."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        command = [
            *self.as_user,
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
        ]
        deadline = time.time() + timeout
        while True:  # after a kill, the old backends may hold shared memory for a moment
            done = subprocess.run([*command, "-w", "-o", options, "start"], capture_output=True)
            if done.returncode == 0:
                return
            if time.time() > deadline:
                raise RuntimeError(f"cannot start PostgreSQL: {done.stderr.decode(errors='replace').strip()}")
            time.sleep(0.5)

    def kill(self) -> None:
        """``kill -9`` of the postmaster, as a crash of the database host would do; its backends follow."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

    def new_database(self) -> str:
        import psycopg

        name = f"oaml_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://oaml@127.0.0.1:{self.port}/{name}"

    def terminate(self, pid: int) -> None:
        """End one server process (a client's connection), as a network fault or a DBA would."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a throw-away server; raise RuntimeError (with the reason) when that cannot be done."""
    bindir = postgres_binaries()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql; make test does it)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="oaml-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    server = PostgresServer(bindir, root, port, as_user)
    try:
        subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(server.data),
                "-U",
                "oaml",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        server.start(timeout=0)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"cannot start PostgreSQL: {exc.stderr.decode(errors='replace').strip()}") from exc
    except RuntimeError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield server
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)
