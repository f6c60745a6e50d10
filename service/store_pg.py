"""PostgreSQL as the gallery's store of record, shared by several service replicas.

Each replica keeps the in-memory index it has with SQLite (loaded at start-up) and follows the
changes the others make through a change log:

- Every write transaction takes one advisory lock, writes its rows and appends to ``oaml_changes``
  (``seq``, ``op``, ``subject``, ``face_id``) and sends ``NOTIFY oaml_gallery`` (delivered at
  commit). The lock makes ``seq`` order equal commit order, so a follower that has applied every
  change up to ``seq`` never skips a later-committed lower number. Enrolments are few next to
  reads; one writer at a time is what SQLite does too.
- :class:`ChangeFollower` holds a ``LISTEN`` connection and, on each notification (or every
  ``poll_s`` seconds, in case one was lost), reads the changes after the last it applied: an
  indexed range scan of the log, never a scan of the gallery. After a dropped connection or a
  restart it reconnects and catches up from the same place.
- Changes are applied in order and a face is read from ``oaml_faces`` when its ``add`` is
  applied: a face deleted since is not there, so a replica catching up never resurrects it.

An enrolment is acknowledged after its transaction commits (``synchronous_commit`` as the server
is configured: on by default), so it survives ``kill -9`` of any replica. Schema changes are
versioned migrations (``oaml_migrations``) applied at start-up under an advisory lock, so
replicas starting together apply each once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from service.errors import FaceNotFound, GalleryStoreError, GalleryVersionError, SubjectNotFound
from service.store import FACE_COLUMNS, FaceRecord, SubjectRecord, face_from_row, face_row

__all__ = ["PostgresGalleryStore", "Change", "ChangeFollower", "MIGRATIONS", "CHANNEL"]

logger = logging.getLogger(__name__)

CHANNEL = "oaml_gallery"
_WRITE_LOCK = 0x0A4D4C01  # advisory lock key: one gallery writer at a time (all replicas)
_MIGRATE_LOCK = 0x0A4D4C02

#: (version, SQL): applied in order, each once, in one transaction with its version row.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE oaml_meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE oaml_subjects (
            subject text PRIMARY KEY, name text, metadata text NOT NULL DEFAULT '{}',
            created_at double precision NOT NULL
        );
        CREATE TABLE oaml_faces (
            position bigserial UNIQUE,
            face_id text PRIMARY KEY,
            subject text NOT NULL REFERENCES oaml_subjects(subject) ON DELETE CASCADE,
            model_version text NOT NULL,
            embedding bytea NOT NULL, feature_map bytea NOT NULL, fmap_shape text NOT NULL,
            occlusion bytea NOT NULL, norm double precision NOT NULL, quality double precision NOT NULL,
            detection_score double precision, box text, crop bytea, created_at double precision NOT NULL
        );
        CREATE INDEX oaml_faces_subject ON oaml_faces(subject);
        CREATE TABLE oaml_changes (
            seq bigserial PRIMARY KEY, op text NOT NULL, subject text NOT NULL, face_id text,
            at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)


@dataclass(frozen=True)
class Change:
    """One committed change: ``op`` is ``add`` or ``delete`` (a face) or ``subject`` (its record)."""

    seq: int
    op: str
    subject: str
    face_id: str | None


class PostgresGalleryStore:
    """The :class:`service.store.GalleryStore` on a PostgreSQL server (psycopg 3, a connection pool).

    Args:
        url: ``postgresql://user:password@host:port/database`` (libpq URL or key-value string).
        model_version: the served weights' version; faces of other versions are refused.
        pool_size: most connections this replica holds (reads run in the service's CPU threads).
    """

    def __init__(self, url: str, model_version: str, pool_size: int = 4) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as exc:
            raise GalleryStoreError(
                "OAML_GALLERY_URL needs the PostgreSQL driver: pip install -e '.[postgres]'", path=_redacted(url)
            ) from exc

        self.url = url
        self.model_version = model_version
        self.path = _redacted(url)  # named in errors and logs, without a password
        self._errors: tuple[type[BaseException], ...] = (psycopg.Error, PoolTimeout, OSError)
        try:
            with psycopg.connect(url, connect_timeout=5):  # fail fast, in one line, when the server is not there
                pass
            self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, timeout=10)
            self._pool.open(wait=True, timeout=10)
            self.migrate()
        except self._errors as exc:
            reason = " ".join(str(exc).split())  # libpq's messages span lines
            raise GalleryStoreError(f"cannot open the gallery {self.path}: {reason}", path=self.path) from exc

    # -- schema ------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply the migrations this database lacks; returns the schema version."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS oaml_migrations (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM oaml_migrations").fetchall()}
            for version, sql in MIGRATIONS:
                if version not in done:
                    conn.execute(sql)
                    conn.execute("INSERT INTO oaml_migrations(version) VALUES (%s)", (version,))
                    logger.info("gallery %s: applied migration %d", self.path, version)
        return MIGRATIONS[-1][0]

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._errors as exc:
            raise GalleryStoreError(f"cannot read the gallery {self.path}: {exc}", path=self.path) from exc

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """A transaction holding the gallery's write lock; it notifies followers when it logged changes."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                yield conn
        except self._errors as exc:
            raise GalleryStoreError(f"cannot write the gallery {self.path}: {exc}", path=self.path) from exc

    @staticmethod
    def _log(conn: Any, changes: list[tuple[str, str, str | None]]) -> None:
        if not changes:
            return
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO oaml_changes(op, subject, face_id) VALUES (%s, %s, %s)", changes)
        conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

    # -- GalleryStore ------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Write and commit one row, so a read-only role fails start-up instead of every enrolment."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO oaml_meta(key, value) VALUES ('last_opened', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(time.time()),),
            )

    def check_version(self) -> None:
        with self._read() as conn:
            versions = {r[0] for r in conn.execute("SELECT DISTINCT model_version FROM oaml_faces").fetchall()}
        if versions - {self.model_version}:
            raise GalleryVersionError(
                f"gallery {self.path} holds faces embedded by model version(s) {sorted(versions)}, "
                f"but the service runs {self.model_version}; use a new database, or serve the matching weights"
            )

    def upsert_subject(self, subject: str, name: str | None, metadata: dict[str, Any] | None) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO oaml_subjects(subject, name, metadata, created_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (subject) DO UPDATE SET name = COALESCE(excluded.name, oaml_subjects.name), "
                "metadata = CASE WHEN %s THEN excluded.metadata ELSE oaml_subjects.metadata END",
                (subject, name, json.dumps(metadata or {}), time.time(), metadata is not None),
            )
            self._log(conn, [("subject", subject, None)])

    def add_faces(self, faces: list[FaceRecord]) -> None:
        if not faces:
            return
        with self._write() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO oaml_faces({FACE_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})",
                    [face_row(f, self.model_version) for f in faces],
                )
            self._log(conn, [("add", f.subject, f.face_id) for f in faces])

    def delete_subject(self, subject: str) -> list[str]:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM oaml_subjects WHERE subject = %s", (subject,)).fetchone() is None:
                raise SubjectNotFound(f"subject {subject!r} is not enrolled")
            deleted = conn.execute("DELETE FROM oaml_faces WHERE subject = %s RETURNING face_id", (subject,))
            ids = [r[0] for r in deleted]
            conn.execute("DELETE FROM oaml_subjects WHERE subject = %s", (subject,))
            self._log(conn, [("delete", subject, fid) for fid in ids] + [("subject", subject, None)])
        return ids

    def delete_face(self, subject: str, face_id: str) -> None:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM oaml_subjects WHERE subject = %s", (subject,)).fetchone() is None:
                raise SubjectNotFound(f"subject {subject!r} is not enrolled")
            gone = conn.execute("DELETE FROM oaml_faces WHERE face_id = %s AND subject = %s", (face_id, subject))
            if gone.rowcount == 0:
                raise FaceNotFound(f"face {face_id!r} does not belong to subject {subject!r}")
            self._log(conn, [("delete", subject, face_id)])

    _SUBJECTS = (
        "SELECT s.subject, s.name, s.metadata, s.created_at, COUNT(f.face_id) FROM oaml_subjects s "
        "LEFT JOIN oaml_faces f ON f.subject = s.subject"
    )

    def subject(self, subject: str) -> SubjectRecord:
        with self._read() as conn:
            row = conn.execute(f"{self._SUBJECTS} WHERE s.subject = %s GROUP BY s.subject", (subject,)).fetchone()
        if row is None:
            raise SubjectNotFound(f"subject {subject!r} is not enrolled")
        return SubjectRecord(row[0], row[1], json.loads(row[2]), row[3], row[4])

    def subjects(self, offset: int, limit: int) -> tuple[list[SubjectRecord], int]:
        with self._read() as conn:
            total = conn.execute("SELECT COUNT(*) FROM oaml_subjects").fetchone()[0]
            rows = conn.execute(
                f'{self._SUBJECTS} GROUP BY s.subject ORDER BY s.subject COLLATE "C" LIMIT %s OFFSET %s',
                (limit, offset),
            ).fetchall()
        return [SubjectRecord(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows], total

    def faces_of(self, subject: str) -> list[FaceRecord]:
        self.subject(subject)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {FACE_COLUMNS} FROM oaml_faces WHERE subject = %s ORDER BY position", (subject,)
            ).fetchall()
        return [face_from_row(r) for r in rows]

    def face(self, face_id: str) -> FaceRecord:
        with self._read() as conn:
            row = conn.execute(f"SELECT {FACE_COLUMNS} FROM oaml_faces WHERE face_id = %s", (face_id,)).fetchone()
        if row is None:
            raise FaceNotFound(f"face {face_id!r} is not enrolled")
        return face_from_row(row)

    def faces_by_id(self, face_ids: list[str]) -> list[FaceRecord]:
        """The faces among ``face_ids`` that are still enrolled, in enrolment order."""
        if not face_ids:
            return []
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {FACE_COLUMNS} FROM oaml_faces WHERE face_id = ANY(%s) ORDER BY position", (face_ids,)
            ).fetchall()
        return [face_from_row(r) for r in rows]

    def iter_faces(self) -> Iterator[FaceRecord]:
        """Every face in enrolment order, streamed through a server-side cursor (bounded memory)."""
        with self._read() as conn, conn.transaction(), conn.cursor(name="oaml_faces_scan") as cur:
            cur.itersize = 1024
            cur.execute(f"SELECT {FACE_COLUMNS} FROM oaml_faces ORDER BY position")
            for row in cur:
                yield face_from_row(row)

    def last_seq(self) -> int:
        """The newest change's number (0 for none): a follower started from it misses nothing after."""
        with self._read() as conn:
            return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM oaml_changes").fetchone()[0])

    def changes_since(self, seq: int, limit: int = 10_000) -> list[Change]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT seq, op, subject, face_id FROM oaml_changes WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()
        return [Change(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def close(self) -> None:
        self._pool.close()


class ChangeFollower:
    """Applies other replicas' changes: LISTEN for hints, read the log from the last applied ``seq``.

    Args:
        store: the store to read changes and faces from.
        apply: called with each run of new changes, in ``seq`` order, from this follower's thread;
            it must be idempotent for changes this replica made itself.
        since: the ``seq`` already reflected locally (:meth:`PostgresGalleryStore.last_seq` taken
            before the index was loaded).
        poll_s: the longest wait between catch-ups when no notification arrives (a lost one, a
            dropped connection): the bound on how stale this replica can be while the database is up.
    """

    def __init__(
        self, store: PostgresGalleryStore, apply: Callable[[list[Change]], None], since: int, poll_s: float = 1.0
    ) -> None:
        self.store = store
        self.apply = apply
        self.seq = since
        self.poll_s = poll_s
        self.connected = False
        self.listener_pid: int | None = None
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oaml-gallery-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 + self.poll_s)

    def catch_up(self) -> int:
        """Apply every change after :attr:`seq`; returns how many."""
        applied = 0
        while True:
            changes = self.store.changes_since(self.seq)
            if not changes:
                return applied
            self.apply(changes)
            self.seq = changes[-1].seq
            applied += len(changes)

    def _run(self) -> None:
        import psycopg

        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.store.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected, self.listener_pid, backoff = True, conn.info.backend_pid, 0.2
                    self.catch_up()  # what happened while not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.poll_s, stop_after=1):
                            pass
                        self.catch_up()
            except (psycopg.Error, GalleryStoreError, OSError) as exc:
                if self._stop.is_set():
                    break
                self.connected = False
                self.reconnects += 1
                logger.warning("gallery follower lost %s (%s); reconnecting in %.1fs", self.store.path, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug in apply: log it and keep following rather than go silently stale
                logger.exception("gallery follower failed applying changes after seq %d", self.seq)
                self._stop.wait(1.0)
        self.connected = False


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<PostgreSQL URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
