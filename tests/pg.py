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
import subprocess
import tempfile
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
    data, port = root / "data", free_port()
    try:
        subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
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
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        subprocess.run(
            [
                *as_user,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "server.log"),
                "-w",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"cannot start PostgreSQL: {exc.stderr.decode(errors='replace').strip()}") from exc
    try:
        yield PostgresServer(bindir, root, port, as_user)
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)
