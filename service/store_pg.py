"""PostgreSQL as the gallery's store of record, shared by several service replicas.

Each replica keeps the in-memory index it has with SQLite (loaded at start-up) and follows the
changes the others make through a change log:

- Every write transaction takes one advisory lock, writes its rows and appends to ``oaml_changes``
  (``seq``, ``op``, ``collection``, ``subject``, ``face_id``) and sends ``NOTIFY oaml_gallery`` (delivered at
  commit). The lock makes ``seq`` order equal commit order, so a follower that has applied every
  change up to ``seq`` never skips a later-committed lower number. Enrolments are few next to
  reads; one writer at a time is what SQLite does too. A writer waits at most ``timeout_s`` for
  the lock (``lock_timeout``) and for a connection, then fails (503 ``STORE_UNAVAILABLE``): one
  stuck writer cannot freeze the others for longer than that.
- :class:`ChangeFollower` holds a ``LISTEN`` connection and, on each notification (or every
  ``poll_s`` seconds, in case one was lost), reads the changes after the last it applied: an
  indexed range scan of the log, never a scan of the gallery. After a dropped connection or a
  restart it reconnects and catches up from the same place.
- Changes are applied in order and a face is read from ``oaml_faces`` when its ``add`` is
  applied: a face deleted since is not there, so a replica catching up never resurrects it.
- The log holds subject and face ids, so it is pruned: each replica records in
  ``oaml_replicas`` the last change it applied, and entries every live replica has applied are
  deleted (within a second or two of the last replica applying them). A replica silent for
  ``stale_after_s`` stops holding the log back; should it come back, it finds the log pruned past
  its position (``oaml_meta.pruned_through``) and reconciles its index with the faces table.

An enrolment is one transaction, acknowledged after it commits (``synchronous_commit`` as the
server is configured: on by default), so it survives ``kill -9`` of any replica. Schema changes
are versioned migrations (``oaml_migrations``) applied at start-up under an advisory lock, so
replicas starting together apply each once.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from service import audit
from service.deadline import time_left
from service.errors import (
    CollectionExists,
    CollectionNotFound,
    FaceNotFound,
    GalleryStoreError,
    MigrationIncomplete,
    SubjectNotFound,
)
from service.store import (
    AUDIT_INSERT,
    BUSY,
    COLLECTION_COUNTS,
    DEFAULT_COLLECTION,
    EMBEDDING_COLUMNS,
    ENROLLED_SINCE,
    FACE_COLUMN_COUNT,
    FACE_COLUMNS,
    FACES_TO_DERIVE,
    FACES_TO_EMBED,
    FORGET_FACE_ANSWERS,
    IDEMPOTENCY_TTL_S,
    READ_FAILED,
    VERSION_COVERAGE,
    VERSIONED_FACES,
    WITHOUT_CROPS,
    WRITE_FAILED,
    CollectionRecord,
    EnrolCommit,
    Enrolment,
    FaceEmbedding,
    FaceRecord,
    Render,
    StoredAnswer,
    SubjectRecord,
    at_versions,
    audit_query,
    collection_changes,
    collection_from_row,
    embedding_row,
    face_from_row,
    face_row,
    subject_from_row,
    subject_missing,
)

__all__ = ["PostgresGalleryStore", "Change", "ChangeLogGap", "ChangeFollower", "MIGRATIONS", "CHANNEL", "redacted"]

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
    (
        2,
        """
        CREATE TABLE oaml_idempotency (
            key text PRIMARY KEY, request_hash text NOT NULL, subject text NOT NULL, response text NOT NULL,
            created_at double precision NOT NULL
        );
        CREATE INDEX oaml_idempotency_created ON oaml_idempotency(created_at);
        CREATE INDEX oaml_idempotency_subject ON oaml_idempotency(subject);
        CREATE TABLE oaml_replicas (
            replica text PRIMARY KEY, seq bigint NOT NULL, seen_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        3,
        # Collections: every subject, face, stored answer and logged change of a one-gallery database goes into
        # the default collection; a subject's key becomes (collection, subject).
        """
        CREATE TABLE oaml_collections (name text PRIMARY KEY, created_at double precision NOT NULL);
        INSERT INTO oaml_collections(name, created_at) VALUES ('default', extract(epoch FROM now()));
        ALTER TABLE oaml_faces DROP CONSTRAINT oaml_faces_subject_fkey;
        ALTER TABLE oaml_subjects ADD COLUMN collection text NOT NULL DEFAULT 'default'
            REFERENCES oaml_collections(name);
        ALTER TABLE oaml_subjects DROP CONSTRAINT oaml_subjects_pkey;
        ALTER TABLE oaml_subjects ADD PRIMARY KEY (collection, subject);
        ALTER TABLE oaml_faces ADD COLUMN collection text NOT NULL DEFAULT 'default';
        ALTER TABLE oaml_faces ADD FOREIGN KEY (collection, subject)
            REFERENCES oaml_subjects(collection, subject) ON DELETE CASCADE;
        DROP INDEX oaml_faces_subject;
        CREATE INDEX oaml_faces_subject ON oaml_faces(collection, subject);
        ALTER TABLE oaml_changes ADD COLUMN collection text NOT NULL DEFAULT 'default';
        ALTER TABLE oaml_idempotency ADD COLUMN collection text NOT NULL DEFAULT 'default';
        DROP INDEX oaml_idempotency_subject;
        CREATE INDEX oaml_idempotency_subject ON oaml_idempotency(collection, subject);
        """,
    ),
    (
        4,
        # Model versions per collection (a database of one version: schema 3 refused mixed ones), faces' data at
        # further versions (migration, rollback), and the versions each replica holds (a switch waits for all).
        """
        ALTER TABLE oaml_collections ADD COLUMN model_version text, ADD COLUMN previous_version text,
            ADD COLUMN migration text, ADD COLUMN store_crops boolean, ADD COLUMN switched_at double precision;
        UPDATE oaml_collections c SET model_version =
            (SELECT f.model_version FROM oaml_faces f WHERE f.collection = c.name LIMIT 1);
        CREATE TABLE oaml_face_embeddings (
            face_id text NOT NULL REFERENCES oaml_faces(face_id) ON DELETE CASCADE, model_version text NOT NULL,
            embedding bytea NOT NULL, feature_map bytea NOT NULL, fmap_shape text NOT NULL, occlusion bytea NOT NULL,
            norm double precision NOT NULL, quality double precision NOT NULL, PRIMARY KEY (face_id, model_version)
        );
        ALTER TABLE oaml_replicas ADD COLUMN versions text NOT NULL DEFAULT '';
        """,
    ),
    (
        5,
        # The audit log of biometric operations (service/audit.py): append-only, no biometric data or names.
        """
        CREATE TABLE oaml_audit (
            seq bigserial PRIMARY KEY, at double precision NOT NULL, key_id text NOT NULL, action text NOT NULL,
            collection text, subject text, other_subject text, faces integer NOT NULL DEFAULT 0,
            outcome text NOT NULL, detail text NOT NULL DEFAULT '{}'
        );
        CREATE INDEX oaml_audit_at ON oaml_audit(at);
        CREATE INDEX oaml_audit_key ON oaml_audit(key_id, action, at);
        CREATE INDEX oaml_audit_subject ON oaml_audit(collection, subject);
        CREATE INDEX oaml_audit_other ON oaml_audit(collection, other_subject);
        """,
    ),
)


@dataclass(frozen=True)
class Change:
    """One committed change: ``op`` is ``add`` or ``delete`` (a face), ``subject`` (its record) or
    ``collection`` (created or deleted: ``subject`` is empty)."""

    seq: int
    op: str
    subject: str
    face_id: str | None
    collection: str = DEFAULT_COLLECTION


class ChangeLogGap(Exception):
    """The log no longer reaches back to a follower's position (pruned while it was away)."""

    def __init__(self, seq: int, pruned_through: int) -> None:
        super().__init__(f"change log pruned through {pruned_through}, follower at {seq}")
        self.seq, self.pruned_through = seq, pruned_through


class PostgresGalleryStore:
    """The :class:`service.store.GalleryStore` on a PostgreSQL server (psycopg 3, a connection pool).

    Args:
        url: ``postgresql://user:password@host:port/database`` (libpq URL or key-value string).
        model_version: the served weights' version; faces of other versions are refused.
        pool_size: most connections this replica holds (reads, writes and the follower's catch-ups).
        timeout_s: the longest a write waits for the gallery's write lock, and any call for a connection.
    """

    def __init__(self, url: str, model_version: str, pool_size: int = 8, timeout_s: float = 5.0) -> None:
        self.url = url
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.path = redacted(url)  # named in logs and start-up failures, without a password
        try:
            import psycopg
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as exc:
            raise GalleryStoreError(
                "OAML_GALLERY_URL needs the PostgreSQL driver: pip install -e '.[postgres]'", internal=self.path
            ) from exc

        self._errors: tuple[type[BaseException], ...] = (psycopg.Error, PoolTimeout, OSError)
        self._lock_errors: tuple[type[BaseException], ...] = (psycopg.errors.LockNotAvailable, PoolTimeout)
        try:
            with psycopg.connect(url, connect_timeout=5):  # fail fast, in one line, when the server is not there
                pass
            self._pool = ConnectionPool(
                url, min_size=1, max_size=pool_size, open=False, timeout=timeout_s, kwargs=self.connection_options()
            )
            self._pool.open(wait=True, timeout=10)
            self.migrate()
        except self._errors as exc:
            raise GalleryStoreError(
                "cannot open the gallery database", internal=f"{self.path}: {_one_line(exc)}"
            ) from exc

    def connection_options(self) -> dict[str, Any]:
        """libpq settings for every connection: a dead peer is noticed in seconds (TCP keepalives and
        ``tcp_user_timeout``), not after the kernel's minutes, and no statement runs unbounded."""
        return {
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self.timeout_s * 2000),
            "options": f"-c statement_timeout={int(self.timeout_s * 6000)}",
        }

    # -- schema ------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply the migrations this database lacks; returns the schema version."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            conn.execute("SET LOCAL statement_timeout = 0")  # rebuilding keys of a large gallery takes its time
            conn.execute(
                "CREATE TABLE IF NOT EXISTS oaml_migrations (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM oaml_migrations").fetchall()}
            known = MIGRATIONS[-1][0]
            if done and max(done) > known:
                raise GalleryStoreError(
                    f"the gallery database has schema {max(done)}, newer than this service's {known}: serve it with "
                    "the release that wrote it (or a newer one)",
                    internal=self.path,
                )
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
            with self._pool.connection(timeout=self.timeout_s) as conn:
                yield conn
        except self._errors as exc:
            raise GalleryStoreError(READ_FAILED, internal=f"reading {self.path}: {_one_line(exc)}") from exc

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """A transaction holding the gallery's write lock; waiting for a connection and for the lock takes at most
        ``timeout_s`` in all, or what is left of the write's deadline (:mod:`service.deadline`). It notifies
        followers when it logged changes."""
        try:
            with self._pool.connection(timeout=time_left(self.timeout_s)) as conn, conn.transaction():
                left = max(1, int(time_left(self.timeout_s) * 1000))  # 0 would mean no limit at all
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (str(left),))
                conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(int(self.timeout_s * 6000)),))
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                yield conn
                entry = audit.current()  # the operation's audit entry, committed with it
                if entry is not None and not entry.recorded:
                    conn.execute(
                        AUDIT_INSERT.format(p="oaml_", q="%s"),
                        entry.row(),
                    )
            if entry is not None:
                entry.recorded = True
        except self._lock_errors as exc:
            raise GalleryStoreError(BUSY, internal=f"writing {self.path}: {_one_line(exc)}") from exc
        except self._errors as exc:
            raise GalleryStoreError(WRITE_FAILED, internal=f"writing {self.path}: {_one_line(exc)}") from exc

    @staticmethod
    def _log(conn: Any, collection: str, changes: list[tuple[str, str, str | None]]) -> None:
        if not changes:
            return
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO oaml_changes(collection, op, subject, face_id) VALUES (%s, %s, %s, %s)",
                [(collection, *change) for change in changes],
            )
        conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

    # -- GalleryStore ------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Write and commit one row, so a read-only role or a full disk is known at start-up."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO oaml_meta(key, value) VALUES ('last_opened', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(time.time()),),
            )

    def enrol(
        self, enrolment: Enrolment, key: str | None = None, request_hash: str = "", render: Render | None = None
    ) -> EnrolCommit:
        """The subject and its faces in one transaction; with ``key``, also the answer (``render(total)``),
        unless the key has answered before: then that answer, and nothing is written."""
        with self._write() as conn:
            now = time.time()
            if key is not None:
                conn.execute("DELETE FROM oaml_idempotency WHERE created_at < %s", (now - IDEMPOTENCY_TTL_S,))
                row = conn.execute(
                    "SELECT request_hash, response FROM oaml_idempotency WHERE key = %s", (key,)
                ).fetchone()
                if row is not None:
                    return EnrolCommit(replayed=StoredAnswer(row[0], row[1]))
            self._write_enrolment(conn, enrolment)
            total = conn.execute(
                "SELECT COUNT(*) FROM oaml_faces WHERE collection = %s AND subject = %s",
                (enrolment.collection, enrolment.subject),
            ).fetchone()[0]
            body = render(total) if render is not None else None
            if key is not None and body is not None:
                conn.execute(
                    "INSERT INTO oaml_idempotency(key, request_hash, collection, subject, response, created_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (key, request_hash, enrolment.collection, enrolment.subject, body, now),
                )
        return EnrolCommit(total_faces=int(total), body=body)

    def enrol_many(self, enrolments: Sequence[Enrolment]) -> None:
        """Several enrolments in one transaction (bulk imports, benchmarks)."""
        with self._write() as conn:
            for enrolment in enrolments:
                self._write_enrolment(conn, enrolment)

    def _write_enrolment(self, conn: Any, e: Enrolment) -> None:
        if conn.execute("SELECT 1 FROM oaml_collections WHERE name = %s", (e.collection,)).fetchone() is None:
            raise CollectionNotFound(f"collection {e.collection!r} does not exist")
        conn.execute(
            "INSERT INTO oaml_subjects(collection, subject, name, metadata, created_at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (collection, subject) DO UPDATE SET name = COALESCE(excluded.name, oaml_subjects.name), "
            "metadata = CASE WHEN %s THEN excluded.metadata ELSE oaml_subjects.metadata END",
            (e.collection, e.subject, e.name, json.dumps(e.metadata or {}), time.time(), e.metadata is not None),
        )
        if e.faces:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO oaml_faces({FACE_COLUMNS}) VALUES ({', '.join(['%s'] * FACE_COLUMN_COUNT)})",
                    [face_row(f, self.model_version, e.collection) for f in e.faces],
                )
                others = [embedding_row(f.face_id, other) for f in e.faces for other in f.others]
                if others:
                    cur.executemany(
                        f"INSERT INTO oaml_face_embeddings({EMBEDDING_COLUMNS}) VALUES ({', '.join(['%s'] * 8)})",
                        others,
                    )
            conn.execute(
                "UPDATE oaml_collections SET model_version = %s WHERE name = %s AND model_version IS NULL",
                (e.faces[0].model_version or self.model_version, e.collection),
            )
        self._log(conn, e.collection, [("subject", e.subject, None)] + [("add", e.subject, f.face_id) for f in e.faces])

    def answer_for(self, key: str) -> StoredAnswer | None:
        """The answer recorded under ``key`` (within :data:`~service.store.IDEMPOTENCY_TTL_S`), if any."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT request_hash, response FROM oaml_idempotency WHERE key = %s AND created_at >= %s",
                (key, time.time() - IDEMPOTENCY_TTL_S),
            ).fetchone()
        return StoredAnswer(row[0], row[1]) if row is not None else None

    @staticmethod
    def _require_subject(conn: Any, collection: str, subject: str) -> None:
        found = conn.execute(
            "SELECT 1 FROM oaml_subjects WHERE collection = %s AND subject = %s", (collection, subject)
        ).fetchone()
        if found is None:
            raise SubjectNotFound(subject_missing(subject, collection))

    def delete_subject(self, subject: str, collection: str = DEFAULT_COLLECTION) -> list[str]:
        with self._write() as conn:
            self._require_subject(conn, collection, subject)
            where, args = "WHERE collection = %s AND subject = %s", (collection, subject)
            ids = [r[0] for r in conn.execute(f"DELETE FROM oaml_faces {where} RETURNING face_id", args)]
            conn.execute(f"UPDATE oaml_idempotency SET response = '', subject = '' {where}", args)
            conn.execute(f"DELETE FROM oaml_subjects {where}", args)
            self._forget_in_audit(conn, collection, [subject], faces=len(ids))
            self._log(conn, collection, [("delete", subject, fid) for fid in ids] + [("subject", subject, None)])
        return ids

    @staticmethod
    def _secret(conn: Any) -> bytes:
        """The gallery's own key for the audit log's pseudonyms (made once, kept in ``oaml_meta``)."""
        conn.execute(
            "INSERT INTO oaml_meta(key, value) VALUES ('audit_secret', %s) ON CONFLICT (key) DO NOTHING",
            (secrets.token_hex(32),),
        )
        return bytes.fromhex(conn.execute("SELECT value FROM oaml_meta WHERE key = 'audit_secret'").fetchone()[0])

    def _forget_in_audit(self, conn: Any, collection: str, subjects: Sequence[str], faces: int) -> None:
        """Deleted subjects' ids become pseudonyms in the log, in this deletion's own entry too."""
        audit.pseudonymise(conn.execute, self._secret(conn), "oaml_", "%s", collection, subjects)
        audit.note(faces=faces)

    # -- the audit log ----------------------------------------------------------------------------

    def append_audit(self, entry: audit.AuditEntry) -> None:
        """Record an entry on its own (a refused operation, a read such as an export)."""
        with audit.pending(entry), self._write():
            pass

    def audit_entries(
        self,
        after: int = 0,
        limit: int = 100,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        collection: str | None = None,
    ) -> list[dict[str, Any]]:
        """Entries after position ``after``, oldest first, filtered."""
        query, args = audit_query("oaml_", "%s", after, since, until, action, collection)
        with self._read() as conn:
            rows = conn.execute(f"{query} ORDER BY seq LIMIT %s", (*args, limit)).fetchall()
        return [audit.entry_from_row(tuple(r)) for r in rows]

    def prune_audit(self, before: float) -> int:
        """Delete the entries older than ``before`` (the retention); returns how many."""
        with self._write() as conn:
            return int(conn.execute("DELETE FROM oaml_audit WHERE at < %s", (before,)).rowcount)

    def faces_enrolled_since(self, key_id: str, since: float) -> int:
        """Faces the key enrolled since ``since`` (its daily quota, shared by every replica), from the log."""
        with self._read() as conn:
            return int(conn.execute(ENROLLED_SINCE.format(p="oaml_", q="%s"), (key_id, since)).fetchone()[0])

    # -- identity hygiene: merging subjects, moving faces -------------------------------------------

    def merge_subjects(self, collection: str, into: str, source: str) -> list[str]:
        """Move every face of ``source`` to ``into`` and delete ``source`` in one transaction (see the SQLite
        store); other replicas re-index the moved faces from the change log."""
        with self._write() as conn:
            self._require_subject(conn, collection, into)
            self._require_subject(conn, collection, source)
            where = "WHERE collection = %s AND subject = %s"
            ids = [
                r[0]
                for r in conn.execute(
                    f"UPDATE oaml_faces SET subject = %s {where} RETURNING face_id", (into, collection, source)
                )
            ]
            conn.execute(
                "UPDATE oaml_subjects t SET name = COALESCE(t.name, s.name) FROM oaml_subjects s "
                "WHERE t.collection = %s AND t.subject = %s AND s.collection = %s AND s.subject = %s",
                (collection, into, collection, source),
            )
            conn.execute(f"UPDATE oaml_idempotency SET response = '', subject = '' {where}", (collection, source))
            conn.execute(f"DELETE FROM oaml_subjects {where}", (collection, source))
            self._forget_in_audit(conn, collection, [source], faces=len(ids))  # an id that is no more
            self._log(
                conn,
                collection,
                [("move", into, fid) for fid in ids] + [("subject", into, None), ("subject", source, None)],
            )
        return ids

    def move_faces(self, collection: str, face_ids: Sequence[str], source: str, to: str) -> list[str]:
        """Move faces of ``source`` to subject ``to`` (made if new) in one transaction."""
        with self._write() as conn:
            self._require_subject(conn, collection, source)
            for fid in face_ids:
                found = conn.execute(
                    "SELECT 1 FROM oaml_faces WHERE face_id = %s AND collection = %s AND subject = %s",
                    (fid, collection, source),
                ).fetchone()
                if found is None:
                    raise FaceNotFound(f"face {fid!r} does not belong to subject {source!r}")
            conn.execute(
                "INSERT INTO oaml_subjects(collection, subject, name, metadata, created_at) "
                "VALUES (%s, %s, NULL, '{}', %s) ON CONFLICT (collection, subject) DO NOTHING",
                (collection, to, time.time()),
            )
            for fid in face_ids:
                conn.execute("UPDATE oaml_faces SET subject = %s WHERE face_id = %s", (to, fid))
                conn.execute(FORGET_FACE_ANSWERS.format(p="oaml_", q="%s", pct="%%"), (collection, source, fid))
            audit.note(faces=len(face_ids))
            self._log(
                conn,
                collection,
                [("move", to, fid) for fid in face_ids] + [("subject", to, None), ("subject", source, None)],
            )
        return list(face_ids)

    def update_subject(self, subject: str, changes: dict[str, Any], collection: str = DEFAULT_COLLECTION) -> None:
        """Set the subject's ``name`` (None clears it) and/or ``metadata`` (replaced whole); other replicas
        re-read the subject from the change log."""
        with self._write() as conn:
            self._require_subject(conn, collection, subject)
            where = "WHERE collection = %s AND subject = %s"
            if "name" in changes:
                conn.execute(f"UPDATE oaml_subjects SET name = %s {where}", (changes["name"], collection, subject))
            if "metadata" in changes:
                conn.execute(
                    f"UPDATE oaml_subjects SET metadata = %s {where}",
                    (json.dumps(changes["metadata"]), collection, subject),
                )
            self._log(conn, collection, [("subject", subject, None)])

    def delete_face(self, subject: str, face_id: str, collection: str = DEFAULT_COLLECTION) -> None:
        with self._write() as conn:
            self._require_subject(conn, collection, subject)
            gone = conn.execute(
                "DELETE FROM oaml_faces WHERE face_id = %s AND collection = %s AND subject = %s",
                (face_id, collection, subject),
            )
            if gone.rowcount == 0:
                raise FaceNotFound(f"face {face_id!r} does not belong to subject {subject!r}")
            conn.execute(FORGET_FACE_ANSWERS.format(p="oaml_", q="%s", pct="%%"), (collection, subject, face_id))
            self._log(conn, collection, [("delete", subject, face_id)])

    # -- collections -------------------------------------------------------------------------

    def create_collection(self, name: str, model_version: str | None = None) -> CollectionRecord:
        created = time.time()
        with self._write() as conn:
            row = conn.execute(
                "INSERT INTO oaml_collections(name, created_at, model_version) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO NOTHING RETURNING name",
                (name, created, model_version),
            ).fetchone()
            if row is None:
                raise CollectionExists(f"collection {name!r} exists already")
            self._log(conn, name, [("collection", "", None)])
        return CollectionRecord(name, created, model_version=model_version)

    def update_collection(self, name: str, changes: dict[str, Any]) -> CollectionRecord:
        """Set any of :data:`~service.store.COLLECTION_VERSION_COLUMNS`; other replicas re-read the collection."""
        with self._write() as conn:
            self._require_collection(conn, name)
            for column, value in collection_changes(changes):
                if column == "store_crops" and value is not None:
                    value = bool(value)
                conn.execute(f"UPDATE oaml_collections SET {column} = %s WHERE name = %s", (value, name))
            self._log(conn, name, [("collection", "", None)])
        return self.collection(name)

    @staticmethod
    def _require_collection(conn: Any, name: str) -> CollectionRecord:
        row = conn.execute(f"{COLLECTION_COUNTS.format(p='oaml_')} WHERE c.name = %s", (name,)).fetchone()
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return collection_from_row(row)

    # -- model versions: a collection's faces at more than one version ------------------------

    def faces_for(self, collection: str, version: str) -> Iterator[FaceRecord]:
        """The collection's faces at ``version`` (those that have it), in enrolment order, streamed."""
        query = VERSIONED_FACES.format(first="f.position", p="oaml_", q="%s")
        with self._read() as conn, conn.transaction(), conn.cursor(name="oaml_faces_at") as cur:
            cur.itersize = 256
            cur.execute(f"{query} AND f.collection = %s ORDER BY f.position", (version, version, collection))
            for row in cur:
                yield face_from_row(row[1:])

    def put_embeddings(
        self, collection: str, items: Sequence[tuple[str, FaceEmbedding]], migration: dict[str, Any] | None
    ) -> int:
        """Faces' data at another version (a migration's batch) for those still enrolled in ``collection``, with
        the migration's progress in the same transaction; returns how many were written."""
        with self._write() as conn:
            written = 0
            for face_id, data in items:
                cursor = conn.execute(
                    f"INSERT INTO oaml_face_embeddings({EMBEDDING_COLUMNS}) SELECT %s, %s, %s, %s, %s, %s, %s, %s "
                    "WHERE EXISTS (SELECT 1 FROM oaml_faces WHERE face_id = %s AND collection = %s "
                    "AND model_version <> %s) ON CONFLICT (face_id, model_version) DO UPDATE SET "
                    "embedding = excluded.embedding, feature_map = excluded.feature_map, "
                    "fmap_shape = excluded.fmap_shape, occlusion = excluded.occlusion, norm = excluded.norm, "
                    "quality = excluded.quality",
                    (*embedding_row(face_id, data), face_id, collection, data.model_version),
                )
                written += cursor.rowcount
            if migration is not None:
                conn.execute(
                    "UPDATE oaml_collections SET migration = %s WHERE name = %s", (json.dumps(migration), collection)
                )
        return written

    def faces_to_embed(self, collection: str, version: str, after: str, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` faces (id, crop) of the collection that lack ``version`` and have a crop, after
        ``after`` (face ids in order: a migration resumes from any point)."""
        query = _in_byte_order(FACES_TO_EMBED.format(p="oaml_", q="%s"))
        with self._read() as conn:
            rows = conn.execute(query, (collection, after, version, version, limit)).fetchall()
        return [(r[0], bytes(r[1])) for r in rows]

    def faces_to_derive(self, collection: str, source: str, version: str, after: str, limit: int) -> list[FaceRecord]:
        """Up to ``limit`` faces of the collection that lack ``version``, with their data at ``source``, after
        ``after`` (face ids in byte order, as :meth:`faces_to_embed`)."""
        query = _in_byte_order(FACES_TO_DERIVE.format(p="oaml_", q="%s"))
        with self._read() as conn:
            rows = conn.execute(query, (source, source, collection, after, version, version, limit)).fetchall()
        return [face_from_row(r[1:]) for r in rows]

    def version_coverage(self, collection: str, version: str) -> tuple[int, int]:
        """(faces of the collection that have data at ``version``, all its faces)."""
        with self._read() as conn:
            row = conn.execute(VERSION_COVERAGE.format(p="oaml_", q="%s"), (version, version, collection)).fetchone()
        return int(row[0]), int(row[1])

    def faces_without_crops(self, collection: str, version: str) -> dict[str, int]:
        """Subject -> faces of it that lack ``version`` and have no crop to make it from."""
        with self._read() as conn:
            query = WITHOUT_CROPS.format(p="oaml_", q="%s").replace(
                "ORDER BY f.subject", 'ORDER BY f.subject COLLATE "C"'
            )
            rows = conn.execute(query, (collection, version, version)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def switch_version(self, name: str, to: str, drop_missing: bool = False) -> tuple[CollectionRecord, list[str]]:
        """Make ``to`` the collection's version in one transaction (the old one kept as ``previous_version``);
        every replica reloads the collection at ``to`` when it applies the logged change. Faces without data
        at ``to``: deleted with ``drop_missing`` (and listed), else :class:`MigrationIncomplete`."""
        with self._write() as conn:
            record = self._require_collection(conn, name)
            have, total = (
                int(x) for x in conn.execute(VERSION_COVERAGE.format(p="oaml_", q="%s"), (to, to, name)).fetchone()
            )
            dropped: list[str] = []
            if have < total:
                if not drop_missing:
                    raise MigrationIncomplete(f"{total - have} of {total} faces of {name!r} have no data at {to}")
                dropped = [
                    r[0]
                    for r in conn.execute(
                        "DELETE FROM oaml_faces f WHERE f.collection = %s AND f.model_version <> %s AND NOT EXISTS "
                        "(SELECT 1 FROM oaml_face_embeddings e WHERE e.face_id = f.face_id AND e.model_version = %s) "
                        "RETURNING f.face_id",
                        (name, to, to),
                    )
                ]
                for fid in dropped:
                    conn.execute(
                        "UPDATE oaml_idempotency SET response = '', subject = '' WHERE strpos(response, %s) > 0", (fid,)
                    )
            audit.note(faces=len(dropped))
            previous = record.model_version if record.model_version != to else record.previous_version
            conn.execute(
                "UPDATE oaml_collections SET model_version = %s, previous_version = %s, migration = NULL, "
                "switched_at = %s WHERE name = %s",
                (to, previous, time.time(), name),
            )
            self._log(conn, name, [("delete", "", fid) for fid in dropped] + [("collection", "", None)])
        return self.collection(name), dropped

    def drop_version(self, name: str, version: str) -> CollectionRecord:
        """Erase the collection's data at ``version`` (not its active one): faces whose own row holds it take
        the active version's data into it; the rest of it is deleted."""
        with self._write() as conn:
            record = self._require_collection(conn, name)
            active = record.model_version
            if version == active:
                raise ValueError(f"{version} is the version collection {name!r} is matched with")
            if active is not None:
                conn.execute(
                    "UPDATE oaml_faces f SET model_version = e.model_version, embedding = e.embedding, "
                    "feature_map = e.feature_map, fmap_shape = e.fmap_shape, occlusion = e.occlusion, norm = e.norm, "
                    "quality = e.quality FROM oaml_face_embeddings e WHERE e.face_id = f.face_id "
                    "AND e.model_version = %s AND f.collection = %s AND f.model_version = %s",
                    (active, name, version),
                )
                conn.execute(
                    "DELETE FROM oaml_face_embeddings e USING oaml_faces f WHERE e.face_id = f.face_id "
                    "AND e.model_version = %s AND f.collection = %s AND f.model_version = %s",
                    (active, name, active),
                )
            conn.execute(
                "DELETE FROM oaml_face_embeddings e USING oaml_faces f WHERE e.face_id = f.face_id "
                "AND e.model_version = %s AND f.collection = %s",
                (version, name),
            )
            if record.previous_version == version:
                conn.execute("UPDATE oaml_collections SET previous_version = NULL WHERE name = %s", (name,))
            if (record.migration or {}).get("to") == version:
                conn.execute("UPDATE oaml_collections SET migration = NULL WHERE name = %s", (name,))
            self._log(conn, name, [("collection", "", None)])
        return self.collection(name)

    def delete_collection(self, name: str) -> list[str]:
        """Delete the collection with every subject and face in it and forget its stored answers; other
        replicas drop its faces and its index through the change log. Returns the deleted faces' ids."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM oaml_collections WHERE name = %s", (name,)).fetchone() is None:
                raise CollectionNotFound(f"collection {name!r} does not exist")
            deleted = conn.execute("DELETE FROM oaml_faces WHERE collection = %s RETURNING face_id", (name,))
            ids = [r[0] for r in deleted]
            conn.execute("UPDATE oaml_idempotency SET response = '', subject = '' WHERE collection = %s", (name,))
            subjects = [r[0] for r in conn.execute("SELECT subject FROM oaml_subjects WHERE collection = %s", (name,))]
            self._forget_in_audit(conn, name, subjects, faces=len(ids))
            conn.execute("DELETE FROM oaml_subjects WHERE collection = %s", (name,))
            conn.execute("DELETE FROM oaml_collections WHERE name = %s", (name,))
            self._log(conn, name, [("delete", "", fid) for fid in ids] + [("collection", "", None)])
        return ids

    def collection(self, name: str) -> CollectionRecord:
        with self._read() as conn:
            row = conn.execute(f"{COLLECTION_COUNTS.format(p='oaml_')} WHERE c.name = %s", (name,)).fetchone()
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return collection_from_row(row)

    def collections(self) -> list[CollectionRecord]:
        with self._read() as conn:
            rows = conn.execute(f'{COLLECTION_COUNTS.format(p="oaml_")} ORDER BY c.name COLLATE "C"').fetchall()
        return [collection_from_row(r) for r in rows]

    _SUBJECTS = (
        "SELECT s.subject, s.name, s.metadata, s.created_at, COUNT(f.face_id), s.collection FROM oaml_subjects s "
        "LEFT JOIN oaml_faces f ON f.collection = s.collection AND f.subject = s.subject"
    )

    def subject(self, subject: str, collection: str = DEFAULT_COLLECTION) -> SubjectRecord:
        with self._read() as conn:
            row = conn.execute(
                f"{self._SUBJECTS} WHERE s.collection = %s AND s.subject = %s GROUP BY s.collection, s.subject",
                (collection, subject),
            ).fetchone()
        if row is None:
            raise SubjectNotFound(subject_missing(subject, collection))
        return subject_from_row(row)

    def subjects(
        self, offset: int, limit: int, collection: str | None = DEFAULT_COLLECTION
    ) -> tuple[list[SubjectRecord], int]:
        """A page of the collection's subjects by id (of every collection's, by collection and id, for None)."""
        where, args = ("WHERE s.collection = %s", (collection,)) if collection is not None else ("", ())
        with self._read() as conn:
            total = conn.execute(f"SELECT COUNT(*) FROM oaml_subjects s {where}", args).fetchone()[0]
            rows = conn.execute(
                f"{self._SUBJECTS} {where} GROUP BY s.collection, s.subject "
                'ORDER BY s.collection COLLATE "C", s.subject COLLATE "C" LIMIT %s OFFSET %s',
                (*args, limit, offset),
            ).fetchall()
        return [subject_from_row(r) for r in rows], total

    def faces_of(
        self, subject: str, collection: str = DEFAULT_COLLECTION, version: str | None = None
    ) -> list[FaceRecord]:
        """The subject's faces, in enrolment order: as stored, or at ``version`` (those that have it)."""
        self.subject(subject, collection)
        with self._read() as conn:
            if version is None:
                rows = conn.execute(
                    f"SELECT 0, {FACE_COLUMNS} FROM oaml_faces WHERE collection = %s AND subject = %s "
                    "ORDER BY position",
                    (collection, subject),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"{VERSIONED_FACES.format(first='0', p='oaml_', q='%s')} AND f.collection = %s AND f.subject = %s "
                    "ORDER BY f.position",
                    (version, version, collection, subject),
                ).fetchall()
        return [face_from_row(r[1:]) for r in rows]

    def face(self, face_id: str, version: str | None = None) -> FaceRecord:
        """One face, as stored or at ``version`` (FaceNotFound when it lacks it)."""
        with self._read() as conn:
            if version is None:
                row = conn.execute(
                    f"SELECT 0, {FACE_COLUMNS} FROM oaml_faces WHERE face_id = %s", (face_id,)
                ).fetchone()
            else:
                query = f"{VERSIONED_FACES.format(first='0', p='oaml_', q='%s')} AND f.face_id = %s"
                row = conn.execute(query, (version, version, face_id)).fetchone()
        if row is None:
            raise FaceNotFound(f"face {face_id!r} is not enrolled")
        return face_from_row(row[1:])

    def faces_by_id(self, face_ids: list[str], versions: dict[str, str] | None = None) -> list[FaceRecord]:
        """The faces among ``face_ids`` that are still enrolled, in enrolment order; with ``versions`` (collection
        -> version), each at its collection's version (a face without it is left out)."""
        if not face_ids:
            return []
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {FACE_COLUMNS} FROM oaml_faces WHERE face_id = ANY(%s) ORDER BY position", (face_ids,)
            ).fetchall()
            others = (
                conn.execute(
                    f"SELECT {EMBEDDING_COLUMNS} FROM oaml_face_embeddings WHERE face_id = ANY(%s)", (face_ids,)
                ).fetchall()
                if versions is not None
                else []
            )
        records = [face_from_row(r) for r in rows]
        return records if versions is None else at_versions(records, others, versions)

    def face_ids(self) -> set[str]:
        """Every enrolled face's id (a replica reconciling its index after a gap in the change log)."""
        with self._read() as conn:
            return {r[0] for r in conn.execute("SELECT face_id FROM oaml_faces").fetchall()}

    def iter_faces(self) -> Iterator[FaceRecord]:
        """Every face in enrolment order, streamed through a server-side cursor (bounded memory)."""
        with self._read() as conn, conn.transaction(), conn.cursor(name="oaml_faces_scan") as cur:
            cur.itersize = 256
            cur.execute(f"SELECT {FACE_COLUMNS} FROM oaml_faces ORDER BY position")
            for row in cur:
                yield face_from_row(row)

    # -- the change log ----------------------------------------------------------------------

    #: the newest committed change's number, also when pruning has emptied the log (0 for none)
    _LAST_SEQ = (
        "SELECT GREATEST(COALESCE((SELECT MAX(seq) FROM oaml_changes), 0), "
        "COALESCE((SELECT value::bigint FROM oaml_meta WHERE key = 'pruned_through'), 0))"
    )

    def last_seq(self) -> int:
        """The newest change's number (0 for none): a follower started from it misses nothing after."""
        with self._read() as conn:
            return int(conn.execute(self._LAST_SEQ).fetchone()[0])

    def register(self, replica: str) -> int:
        """Enter ``replica`` in ``oaml_replicas`` at the newest change and return that change's number: the
        log is not pruned past it until this replica reports having applied more (:meth:`heartbeat`)."""
        with self._write() as conn:
            row = conn.execute(
                f"INSERT INTO oaml_replicas(replica, seq, seen_at) SELECT %s, ({self._LAST_SEQ}), now() "
                "ON CONFLICT (replica) DO UPDATE SET seq = excluded.seq, seen_at = now() RETURNING seq",
                (replica,),
            ).fetchone()
        return int(row[0])

    def heartbeat(self, replica: str, seq: int, stale_after_s: float, versions: Sequence[str] = ()) -> int:
        """Record that ``replica`` has applied every change through ``seq`` and holds model ``versions``; forget
        replicas silent for ``stale_after_s``; delete the entries every remaining replica has applied. Returns how
        many."""
        with self._read() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO oaml_replicas(replica, seq, seen_at, versions) VALUES (%s, %s, now(), %s) "
                "ON CONFLICT (replica) DO UPDATE SET seq = excluded.seq, seen_at = now(), versions = excluded.versions",
                (replica, seq, ",".join(versions)),
            )
            conn.execute(
                "DELETE FROM oaml_replicas WHERE seen_at < now() - make_interval(secs => %s)", (stale_after_s,)
            )
            horizon = conn.execute("SELECT MIN(seq) FROM oaml_replicas").fetchone()[0]
            if horizon is None:
                return 0
            pruned = conn.execute("DELETE FROM oaml_changes WHERE seq <= %s", (horizon,)).rowcount
            if pruned:
                conn.execute(
                    "INSERT INTO oaml_meta(key, value) VALUES ('pruned_through', %s) ON CONFLICT (key) DO UPDATE "
                    "SET value = GREATEST(oaml_meta.value::bigint, excluded.value::bigint)::text",
                    (str(horizon),),
                )
        return int(pruned)

    def replica_versions(self) -> dict[str, set[str]]:
        """Each live replica's loaded model versions (as it last reported them)."""
        with self._read() as conn:
            rows = conn.execute("SELECT replica, versions FROM oaml_replicas").fetchall()
        return {r[0]: set(filter(None, r[1].split(","))) for r in rows}

    def notify(self) -> None:
        """Wake every follower (each reads the log once)."""
        with self._read() as conn:
            conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

    def deregister(self, replica: str) -> None:
        """``replica`` stops (a clean shutdown): it no longer holds the log back."""
        with self._read() as conn:
            conn.execute("DELETE FROM oaml_replicas WHERE replica = %s", (replica,))

    def changes_since(self, seq: int, limit: int = 10_000) -> list[Change]:
        """The changes after ``seq``, in order; :class:`ChangeLogGap` when the log was pruned past it."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT seq, op, subject, face_id, collection FROM oaml_changes WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()
            # read after the rows: a pruning that removed some of them has recorded its horizon by then
            row = conn.execute("SELECT value FROM oaml_meta WHERE key = 'pruned_through'").fetchone()
            if row is not None and int(row[0]) > seq:
                raise ChangeLogGap(seq, int(row[0]))
        return [Change(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def close(self) -> None:
        self._pool.close()


class ChangeFollower:
    """Applies other replicas' changes: LISTEN for hints, read the log from the last applied ``seq``.

    Args:
        store: the store to read changes and faces from.
        apply: called with each run of new changes, in ``seq`` order, from this follower's thread;
            it must be idempotent for changes this replica made itself.
        resync: called when the log was pruned past this replica's position (it was silent for
            longer than ``stale_after_s``): bring the index in line with the faces table.
        poll_s: the longest wait between catch-ups when no notification arrives (a lost one, a
            dropped connection): the bound on how stale this replica can be while the database is up.
        stale_after_s: how long a silent replica holds back the log's pruning.
        replica: this replica's name in ``oaml_replicas`` (default: a fresh one).
    """

    #: a replica reports its position at least this often, even when nothing changes
    HEARTBEAT_S = 10.0

    def __init__(
        self,
        store: PostgresGalleryStore,
        apply: Callable[[list[Change]], None],
        resync: Callable[[], None] | None = None,
        poll_s: float = 1.0,
        stale_after_s: float = 600.0,
        replica: str | None = None,
        versions: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.store = store
        self.apply = apply
        self.resync = resync
        self.versions = versions or (lambda: ())
        self.replica = replica or f"replica-{uuid.uuid4().hex[:12]}"
        try:
            self.seq = store.register(self.replica)
        except GalleryStoreError as exc:  # a read-only database: follow from the end, prune nothing
            logger.warning(
                "replica %s not registered (%s): the change log is not pruned for it", self.replica, exc.full
            )
            self.seq = store.last_seq()
        self.poll_s = poll_s
        self.stale_after_s = stale_after_s
        self.connected = False
        self.listener_pid: int | None = None
        self.reconnects = 0
        self.resyncs = 0
        self._reported = (self.seq, time.monotonic())
        self._versions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oaml-gallery-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:  # wake the listener now rather than at its next poll (the other replicas just read the log once more)
            self.store.notify()
        except GalleryStoreError:
            pass
        self._thread.join(timeout=5 + self.poll_s)
        try:
            self.store.deregister(self.replica)
        except GalleryStoreError as exc:
            logger.warning("could not deregister replica %s: %s", self.replica, exc.full)

    def catch_up(self) -> int:
        """Apply every change after :attr:`seq`; returns how many."""
        applied = 0
        while True:
            try:
                changes = self.store.changes_since(self.seq)
            except ChangeLogGap as gap:
                logger.warning("gallery change log pruned past this replica (%s): reconciling the index", gap)
                position = self.store.last_seq()
                if self.resync is not None:
                    self.resync()
                self.seq, self.resyncs = max(position, gap.pruned_through), self.resyncs + 1
                continue
            if not changes:
                self._report()
                return applied
            self.apply(changes)
            self.seq = changes[-1].seq
            applied += len(changes)

    def _report(self) -> None:
        """Tell the store how far this replica is (when it moved, or every :attr:`HEARTBEAT_S`), which lets
        it prune what every replica has applied."""
        seq, at = self._reported
        versions = list(self.versions())
        if seq == self.seq and versions == self._versions and time.monotonic() - at < self.HEARTBEAT_S:
            return
        self._versions = versions
        try:
            pruned = self.store.heartbeat(self.replica, self.seq, self.stale_after_s, versions)
        except GalleryStoreError as exc:  # e.g. a read-only database: following matters more than pruning
            logger.warning("replica %s could not report its position: %s", self.replica, exc.full)
            pruned = 0
        self._reported = (self.seq, time.monotonic())
        if pruned:
            logger.debug("pruned %d change log entries every replica has applied", pruned)

    def _run(self) -> None:
        import psycopg

        backoff = 0.2
        while not self._stop.is_set():
            try:
                options = self.store.connection_options()
                with psycopg.connect(self.store.url, autocommit=True, connect_timeout=5, **options) as conn:
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
                reason = exc.full if isinstance(exc, GalleryStoreError) else _one_line(exc)
                logger.warning("gallery follower lost %s (%s); reconnecting in %.1fs", self.store.path, reason, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug in apply: log it and keep following rather than go silently stale
                logger.exception("gallery follower failed applying changes after seq %d", self.seq)
                self._stop.wait(1.0)
        self.connected = False


def _one_line(exc: BaseException) -> str:
    """A driver's message on one line (libpq's span several), without any password it might quote."""
    return redacted(" ".join(str(exc).split())) or type(exc).__name__


_KEY_VALUE_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def redacted(text: str) -> str:
    """``text`` (a libpq URL, a key-value connection string, or a message quoting one) without passwords:
    in a URL's user part (``user:secret@``), as a query parameter (``?password=secret``) or as a key-value
    pair (``password=secret``)."""
    text = re.sub(r"(postgres(?:ql)?://[^:/?#@\s]*:)[^@/\s]*@", r"\1***@", text)  # libpq: only @ and / end it
    return _KEY_VALUE_PASSWORD.sub(r"\1***", text)


def _in_byte_order(query: str) -> str:
    """A batch query over face ids made to compare and sort them byte by byte, as SQLite does (a migration's
    ``after`` cursor must mean the same in both stores, whatever the database's collation)."""
    return query.replace("ORDER BY f.face_id", 'ORDER BY f.face_id COLLATE "C"').replace(
        "f.face_id > %s", 'f.face_id COLLATE "C" > %s'
    )
