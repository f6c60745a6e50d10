"""The gallery's store of record: enrolled subjects and faces, durable across crashes.

Durability: every enrolment is one transaction (the subject, its faces and, with an
``Idempotency-Key``, the answer given), committed (SQLite in WAL mode with ``synchronous=FULL``)
before the API acknowledges it, so it survives ``kill -9`` and a failure leaves nothing half
written. At start-up the in-memory index (:mod:`service.index`) is rebuilt from the store. Records
carry the model version; a store written by other weights is refused (:class:`GalleryVersionError`)
instead of matching incompatible embeddings.

Deletion deletes: the writer runs with ``secure_delete`` (freed pages and cells are overwritten
with zeros) and truncates the write-ahead log after every deletion, so a deleted face's
embedding, maps and crop are in neither file afterwards.

Readers never share the writer's connection: each reading thread has its own, so a reader sees
committed data only and never waits for a writer (WAL). Writers wait at most ``timeout_s`` for
the write lock (another process's, through SQLite's busy timeout, or this process's) and then
fail with :class:`GalleryStoreError` (503 ``STORE_UNAVAILABLE``).

The store is behind :class:`GalleryStore`: :class:`SQLiteGalleryStore` is the embedded default (no
server to run); :mod:`service.store_pg` puts the gallery in PostgreSQL for several replicas. Nothing
here touches torch: the store holds numpy arrays and bytes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.errors import FaceNotFound, GalleryStoreError, GalleryVersionError, SubjectNotFound

__all__ = [
    "FaceRecord",
    "SubjectRecord",
    "Enrolment",
    "StoredAnswer",
    "EnrolCommit",
    "GalleryStore",
    "SQLiteGalleryStore",
    "GalleryVersionError",
    "SubjectNotFound",
    "FaceNotFound",
    "new_face_id",
    "FACE_COLUMNS",
    "IDEMPOTENCY_TTL_S",
    "face_row",
    "face_from_row",
]

logger = logging.getLogger(__name__)

#: How long an ``Idempotency-Key`` and the answer it got are kept (then the key may be used afresh).
IDEMPOTENCY_TTL_S = 24 * 3600


@dataclass
class FaceRecord:
    face_id: str
    subject: str
    embedding: np.ndarray  # [512] float32
    feature_map: np.ndarray  # [C, 7, 7] float16
    occlusion: np.ndarray  # [7, 7] float32
    norm: float
    quality: float
    detection_score: float | None
    box: list[float] | None
    created_at: float
    crop: bytes | None = None  # aligned crop (JPEG) when the service stores crops


@dataclass
class SubjectRecord:
    subject: str
    name: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    faces: int = 0


@dataclass(frozen=True)
class Enrolment:
    """One subject's enrolment: created (or its name and metadata updated) together with its new faces."""

    subject: str
    name: str | None
    metadata: dict[str, Any] | None
    faces: list[FaceRecord]


@dataclass(frozen=True)
class StoredAnswer:
    """The answer an ``Idempotency-Key`` got: the request's fingerprint and the response body (JSON)."""

    request_hash: str
    body: str


@dataclass(frozen=True)
class EnrolCommit:
    """What :meth:`GalleryStore.enrol` did: the subject's face count after it committed, the answer it
    recorded under the key; or, when the key had already answered, that earlier answer (nothing written)."""

    total_faces: int = 0
    body: str | None = None
    replayed: StoredAnswer | None = None


#: Renders the answer to an enrolment from the subject's face count after it (stored under its key).
Render = Callable[[int], str]


class GalleryStore(Protocol):
    """What the service needs from a durable store."""

    model_version: str

    def check_version(self) -> None: ...

    def check_writable(self) -> None: ...

    def enrol(
        self, enrolment: Enrolment, key: str | None = None, request_hash: str = "", render: Render | None = None
    ) -> EnrolCommit: ...

    def enrol_many(self, enrolments: Sequence[Enrolment]) -> None: ...

    def answer_for(self, key: str) -> StoredAnswer | None: ...

    def delete_subject(self, subject: str) -> list[str]: ...

    def delete_face(self, subject: str, face_id: str) -> None: ...

    def update_subject(self, subject: str, changes: dict[str, Any]) -> None: ...

    def face_ids(self) -> set[str]: ...

    def faces_by_id(self, face_ids: list[str]) -> list[FaceRecord]: ...

    def subject(self, subject: str) -> SubjectRecord: ...

    def subjects(self, offset: int, limit: int) -> tuple[list[SubjectRecord], int]: ...

    def faces_of(self, subject: str) -> list[FaceRecord]: ...

    def face(self, face_id: str) -> FaceRecord: ...

    def iter_faces(self) -> Iterator[FaceRecord]: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subjects (
    subject TEXT PRIMARY KEY, name TEXT, metadata TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    face_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL REFERENCES subjects(subject) ON DELETE CASCADE,
    model_version TEXT NOT NULL,
    embedding BLOB NOT NULL, feature_map BLOB NOT NULL, fmap_shape TEXT NOT NULL, occlusion BLOB NOT NULL,
    norm REAL NOT NULL, quality REAL NOT NULL, detection_score REAL, box TEXT, crop BLOB, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_subject ON faces(subject);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, subject TEXT NOT NULL, response TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency(created_at);
CREATE INDEX IF NOT EXISTS idempotency_subject ON idempotency(subject);
"""

_UPSERT_SUBJECT = (
    "INSERT INTO subjects(subject, name, metadata, created_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(subject) DO UPDATE SET name = COALESCE(excluded.name, subjects.name), "
    "metadata = CASE WHEN ? THEN excluded.metadata ELSE subjects.metadata END"
)
_SUBJECTS = (
    "SELECT s.subject, s.name, s.metadata, s.created_at, COUNT(f.face_id) FROM subjects s "
    "LEFT JOIN faces f ON f.subject = s.subject"
)

#: A deleted subject's keys keep only the request's fingerprint: a late retry of its enrolment is refused
#: (422) instead of enrolling the deleted subject again, and no answer (face ids, boxes, file names) remains.
_FORGET_ANSWERS = "UPDATE idempotency SET response = '', subject = '' WHERE subject = ?"

#: What a client is told when the store fails: no path, no driver text (those go to the log).
WRITE_FAILED = "the gallery database cannot be written right now; retry later"
READ_FAILED = "the gallery database cannot be read right now; retry later"
BUSY = "the gallery database is busy with other writes; retry later"


class SQLiteGalleryStore:
    """Embedded store: one SQLite file in WAL mode, fsync on every commit.

    Args:
        path: the database file (its folder is created).
        model_version: the served weights' version; faces of other versions are refused.
        timeout_s: the longest a write waits for the write lock before it fails (503).
    """

    def __init__(self, path: str | Path, model_version: str, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.model_version = model_version
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._wal_dirty = False  # a deletion's old pages may still be in the WAL: truncate it when possible
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA secure_delete=ON")  # freed pages and cells are overwritten with zeros
        except (OSError, sqlite3.Error) as exc:
            raise GalleryStoreError(
                f"cannot open the gallery {self.path}: {exc}; set OAML_DATA_DIR to a writable folder"
            ) from exc
        try:
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            if not self._has_faces_table():  # not even readable as a gallery
                raise GalleryStoreError(
                    f"cannot create the gallery {self.path}: {exc}; set OAML_DATA_DIR to a writable folder"
                ) from exc
            logger.warning("gallery %s: schema not brought up to date (%s); writes will fail", self.path, exc)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=self.timeout_s)

    def _has_faces_table(self) -> bool:
        try:
            query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'faces'"
            return self._db.execute(query).fetchone() is not None
        except sqlite3.Error:
            return False

    def _failure(self, public: str, doing: str, exc: BaseException) -> GalleryStoreError:
        return GalleryStoreError(public, internal=f"cannot {doing} the gallery {self.path}: {exc}")

    # -- reading: one connection per thread, committed data only --------------------------------

    @property
    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = self._connect()
                db.execute("PRAGMA query_only=ON")
            except sqlite3.Error as exc:
                raise self._failure(READ_FAILED, "read", exc) from exc
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._reader
        except sqlite3.Error as exc:
            raise self._failure(READ_FAILED, "read", exc) from exc

    # -- writing: one writer at a time, waits bounded ------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under a lock (one writer at a time), waiting at most ``timeout_s``
        for it; SQLite failures become :class:`GalleryStoreError` (503 ``STORE_UNAVAILABLE``)."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise GalleryStoreError(BUSY, internal=f"gallery {self.path}: write lock not free in {self.timeout_s}s")
        try:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                raise self._failure(BUSY if busy else WRITE_FAILED, "write", exc) from exc
            if self._wal_dirty:
                self._truncate_wal()
        finally:
            self._lock.release()

    def _truncate_wal(self) -> None:
        """Copy the WAL into the database and truncate it to zero bytes, so the old versions of deleted rows
        are in neither file. A reader in the middle of a statement can hold it back: then it is retried
        after the next write and at close."""
        try:
            self._db.execute("PRAGMA busy_timeout = 100")  # a reader holding the log back: try again later
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            logger.warning("gallery %s: could not truncate the write-ahead log (%s); retrying later", self.path, exc)
            return
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        self._wal_dirty = bool(busy)

    def check_writable(self) -> None:
        """Write and commit one row, so a read-only file or a full disk is known at start-up."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_opened', ?)", (str(time.time()),))

    def check_version(self) -> None:
        """Refuse a store made by other weights (the embeddings would be meaningless)."""
        with self._read() as db:
            versions = {r[0] for r in db.execute("SELECT DISTINCT model_version FROM faces").fetchall()}
        if versions - {self.model_version}:
            raise GalleryVersionError(
                f"the gallery holds faces embedded by model version(s) {sorted(versions)}, but the service runs "
                f"{self.model_version}; re-enrol into a new OAML_DATA_DIR, or serve the matching weights",
                internal=f"gallery {self.path}",
            )

    def enrol(
        self, enrolment: Enrolment, key: str | None = None, request_hash: str = "", render: Render | None = None
    ) -> EnrolCommit:
        """The subject and its faces in one transaction; with ``key``, also the answer (``render(total)``),
        unless the key has answered before: then that answer, and nothing is written."""
        with self._tx() as db:
            now = time.time()
            if key is not None:
                db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - IDEMPOTENCY_TTL_S,))
                row = db.execute("SELECT request_hash, response FROM idempotency WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    return EnrolCommit(replayed=StoredAnswer(row[0], row[1]))
            self._write_enrolment(db, enrolment)
            total = db.execute("SELECT COUNT(*) FROM faces WHERE subject = ?", (enrolment.subject,)).fetchone()[0]
            body = render(total) if render is not None else None
            if key is not None and body is not None:
                db.execute(
                    "INSERT INTO idempotency(key, request_hash, subject, response, created_at) VALUES (?, ?, ?, ?, ?)",
                    (key, request_hash, enrolment.subject, body, now),
                )
        return EnrolCommit(total_faces=int(total), body=body)

    def enrol_many(self, enrolments: Sequence[Enrolment]) -> None:
        """Several enrolments in one transaction (bulk imports, benchmarks)."""
        with self._tx() as db:
            for enrolment in enrolments:
                self._write_enrolment(db, enrolment)

    def _write_enrolment(self, db: sqlite3.Connection, e: Enrolment) -> None:
        db.execute(
            _UPSERT_SUBJECT, (e.subject, e.name, json.dumps(e.metadata or {}), time.time(), e.metadata is not None)
        )
        db.executemany(
            f"INSERT INTO faces({FACE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [face_row(f, self.model_version) for f in e.faces],
        )

    def answer_for(self, key: str) -> StoredAnswer | None:
        """The answer recorded under ``key`` (within :data:`IDEMPOTENCY_TTL_S`), if any."""
        with self._read() as db:
            row = db.execute(
                "SELECT request_hash, response FROM idempotency WHERE key = ? AND created_at >= ?",
                (key, time.time() - IDEMPOTENCY_TTL_S),
            ).fetchone()
        return StoredAnswer(row[0], row[1]) if row is not None else None

    def delete_subject(self, subject: str) -> list[str]:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
                raise SubjectNotFound(f"subject {subject!r} is not enrolled")
            ids = [r[0] for r in db.execute("SELECT face_id FROM faces WHERE subject = ?", (subject,))]
            db.execute("DELETE FROM faces WHERE subject = ?", (subject,))
            db.execute(_FORGET_ANSWERS, (subject,))
            db.execute("DELETE FROM subjects WHERE subject = ?", (subject,))
            self._wal_dirty = True
        return ids

    def update_subject(self, subject: str, changes: dict[str, Any]) -> None:
        """Set the subject's ``name`` (None clears it) and/or ``metadata`` (replaced whole), as ``changes`` has them."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
                raise SubjectNotFound(f"subject {subject!r} is not enrolled")
            if "name" in changes:
                db.execute("UPDATE subjects SET name = ? WHERE subject = ?", (changes["name"], subject))
            if "metadata" in changes:
                db.execute(
                    "UPDATE subjects SET metadata = ? WHERE subject = ?", (json.dumps(changes["metadata"]), subject)
                )

    def delete_face(self, subject: str, face_id: str) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
                raise SubjectNotFound(f"subject {subject!r} is not enrolled")
            if db.execute("DELETE FROM faces WHERE face_id = ? AND subject = ?", (face_id, subject)).rowcount == 0:
                raise FaceNotFound(f"face {face_id!r} does not belong to subject {subject!r}")
            self._wal_dirty = True

    # -- reading ----------------------------------------------------------------------------------

    def subject(self, subject: str) -> SubjectRecord:
        with self._read() as db:
            row = db.execute(f"{_SUBJECTS} WHERE s.subject = ? GROUP BY s.subject", (subject,)).fetchone()
        if row is None:
            raise SubjectNotFound(f"subject {subject!r} is not enrolled")
        return SubjectRecord(row[0], row[1], json.loads(row[2]), row[3], row[4])

    def subjects(self, offset: int, limit: int) -> tuple[list[SubjectRecord], int]:
        with self._read() as db:
            total = db.execute("SELECT COUNT(*) FROM subjects").fetchone()[0]
            rows = db.execute(
                f"{_SUBJECTS} GROUP BY s.subject ORDER BY s.subject LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [SubjectRecord(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows], total

    def faces_of(self, subject: str) -> list[FaceRecord]:
        self.subject(subject)
        with self._read() as db:
            rows = db.execute(
                f"SELECT {FACE_COLUMNS} FROM faces WHERE subject = ? ORDER BY created_at, rowid", (subject,)
            ).fetchall()
        return [face_from_row(r) for r in rows]

    def face(self, face_id: str) -> FaceRecord:
        with self._read() as db:
            row = db.execute(f"SELECT {FACE_COLUMNS} FROM faces WHERE face_id = ?", (face_id,)).fetchone()
        if row is None:
            raise FaceNotFound(f"face {face_id!r} is not enrolled")
        return face_from_row(row)

    def face_ids(self) -> set[str]:
        """Every enrolled face's id (reconciling the index with the store)."""
        with self._read() as db:
            return {r[0] for r in db.execute("SELECT face_id FROM faces")}

    def faces_by_id(self, face_ids: list[str]) -> list[FaceRecord]:
        """The faces among ``face_ids`` that are still enrolled, in enrolment order."""
        found: list[tuple[Any, ...]] = []
        with self._read() as db:
            for start in range(0, len(face_ids), 500):
                part = face_ids[start : start + 500]
                found += db.execute(
                    f"SELECT rowid, {FACE_COLUMNS} FROM faces WHERE face_id IN ({', '.join('?' * len(part))})", part
                ).fetchall()
        return [face_from_row(r[1:]) for r in sorted(found, key=lambda r: r[0])]

    def iter_faces(self) -> Iterator[FaceRecord]:
        """Every face in enrolment order, a page at a time (no read transaction held across pages)."""
        last = 0
        while True:
            with self._read() as db:
                rows = db.execute(
                    f"SELECT rowid, {FACE_COLUMNS} FROM faces WHERE rowid > ? ORDER BY rowid LIMIT 256", (last,)
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield face_from_row(row[1:])
            last = rows[-1][0]

    def close(self) -> None:
        with self._readers_lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
        if self._lock.acquire(timeout=self.timeout_s):
            try:
                if self._wal_dirty:
                    self._truncate_wal()
                self._db.close()
            finally:
                self._lock.release()


#: the faces table's columns, in the order of :func:`face_row` and :func:`face_from_row` (both stores)
FACE_COLUMNS = (
    "face_id, subject, model_version, embedding, feature_map, fmap_shape, occlusion, "
    "norm, quality, detection_score, box, crop, created_at"
)


def face_row(f: FaceRecord, model_version: str) -> tuple[Any, ...]:
    """A face as stored: arrays as raw little-endian bytes (maps in float16), shapes and boxes as JSON."""
    return (
        f.face_id,
        f.subject,
        model_version,
        f.embedding.astype(np.float32).tobytes(),
        f.feature_map.astype(np.float16).tobytes(),
        json.dumps(list(f.feature_map.shape)),
        f.occlusion.astype(np.float32).tobytes(),
        f.norm,
        f.quality,
        f.detection_score,
        json.dumps(f.box) if f.box is not None else None,
        f.crop,
        f.created_at,
    )


def face_from_row(row: Sequence[Any]) -> FaceRecord:
    """The inverse of :func:`face_row` (without the model version, checked at open)."""
    return FaceRecord(
        face_id=row[0],
        subject=row[1],
        embedding=np.frombuffer(row[3], dtype=np.float32).copy(),
        feature_map=np.frombuffer(row[4], dtype=np.float16).reshape(json.loads(row[5])).copy(),
        occlusion=np.frombuffer(row[6], dtype=np.float32).reshape(7, 7).copy(),
        norm=row[7],
        quality=row[8],
        detection_score=row[9],
        box=json.loads(row[10]) if row[10] else None,
        crop=bytes(row[11]) if row[11] is not None else None,
        created_at=row[12],
    )


def new_face_id() -> str:
    return uuid.uuid4().hex
