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

import dataclasses
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np

from service import audit
from service.audit import AUDIT_COLUMNS
from service.deadline import time_left
from service.errors import (
    CollectionExists,
    CollectionNotFound,
    FaceNotFound,
    GalleryStoreError,
    GalleryVersionError,
    MigrationIncomplete,
    SubjectNotFound,
)

__all__ = [
    "DEFAULT_COLLECTION",
    "COLLECTION_PATTERN",
    "CollectionRecord",
    "FaceEmbedding",
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
    "embedding_row",
    "embedding_from_row",
    "at_versions",
    "collection_from_row",
    "collection_changes",
    "COLLECTION_VERSION_COLUMNS",
    "VERSIONED_FACES",
    "FACES_TO_EMBED",
    "FACES_TO_DERIVE",
    "VERSION_COVERAGE",
    "WITHOUT_CROPS",
    "EMBEDDING_COLUMNS",
    "AUDIT_SELECT",
    "AUDIT_INSERT",
    "ENROLLED_SINCE",
    "audit_query",
    "subject_from_row",
    "subject_missing",
    "COLLECTION_COUNTS",
    "FORGET_FACE_ANSWERS",
    "FACE_COLUMN_COUNT",
]

logger = logging.getLogger(__name__)

#: The collection of clients that name none, and of every gallery made before collections existed.
DEFAULT_COLLECTION = "default"
#: A collection's name: short, URL- and key-list-safe (no ``:``, ``+`` or ``,``, which ``OAML_API_KEYS`` uses).
COLLECTION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

#: How long an ``Idempotency-Key`` and the answer it got are kept (then the key may be used afresh).
IDEMPOTENCY_TTL_S = 24 * 3600


@dataclass
class FaceEmbedding:
    """What one model version says about a face: a collection keeps one per version it holds (its active one,
    a migration's target, the previous one until it is dropped)."""

    model_version: str
    embedding: np.ndarray  # [512] float32
    feature_map: np.ndarray  # [C, 7, 7] float16
    occlusion: np.ndarray  # [7, 7] float32
    norm: float
    quality: float


@dataclass
class FaceRecord:
    """A face: who, where in its photo, its crop when kept, and its data at ``model_version`` (the version it
    was read at, or enrolled with); ``others``: the same face at further versions, written with it (an
    enrolment during a migration, or while a previous version is kept for rollback)."""

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
    collection: str = DEFAULT_COLLECTION
    model_version: str = ""  # empty: the store's default version (what it was opened with)
    others: list[FaceEmbedding] = field(default_factory=list)

    def at(self, version: str) -> FaceEmbedding | None:
        """This face's data at ``version``, if it has it."""
        if version == self.model_version:
            return FaceEmbedding(version, self.embedding, self.feature_map, self.occlusion, self.norm, self.quality)
        return next((e for e in self.others if e.model_version == version), None)


@dataclass
class SubjectRecord:
    subject: str
    name: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    faces: int = 0
    collection: str = DEFAULT_COLLECTION


@dataclass(frozen=True)
class CollectionRecord:
    """A named, isolated gallery: its subjects and faces are searched, listed and deleted only through it.

    Attributes:
        model_version: the weights its faces are matched with (None: a collection made before versions were
            recorded that has no face yet: it takes the service's default weights with its first face).
        previous_version: the version it was switched from, whose data is kept for rollback until dropped.
        migration: a re-embedding in progress or done and waiting (``to``, ``state``, counts; see
            :mod:`service.migration`), or None.
        store_crops: whether its faces' crops are kept (None: the service's ``OAML_STORE_CROPS``).
        switched_at: when it last switched version (the previous one's retention counts from there).
    """

    name: str
    created_at: float
    subjects: int = 0
    faces: int = 0
    model_version: str | None = None
    previous_version: str | None = None
    migration: dict[str, Any] | None = None
    store_crops: bool | None = None
    switched_at: float | None = None


@dataclass(frozen=True)
class Enrolment:
    """One subject's enrolment: created (or its name and metadata updated) together with its new faces."""

    subject: str
    name: str | None
    metadata: dict[str, Any] | None
    faces: list[FaceRecord]
    collection: str = DEFAULT_COLLECTION


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

    def check_writable(self) -> None: ...

    def enrol(
        self, enrolment: Enrolment, key: str | None = None, request_hash: str = "", render: Render | None = None
    ) -> EnrolCommit: ...

    def enrol_many(self, enrolments: Sequence[Enrolment]) -> None: ...

    def answer_for(self, key: str) -> StoredAnswer | None: ...

    def delete_subject(self, subject: str, collection: str = DEFAULT_COLLECTION) -> list[str]: ...

    def delete_face(self, subject: str, face_id: str, collection: str = DEFAULT_COLLECTION) -> None: ...

    def update_subject(self, subject: str, changes: dict[str, Any], collection: str = DEFAULT_COLLECTION) -> None: ...

    def create_collection(self, name: str, model_version: str | None = None) -> CollectionRecord: ...

    def update_collection(self, name: str, changes: dict[str, Any]) -> CollectionRecord: ...

    def faces_for(self, collection: str, version: str) -> Iterator[FaceRecord]: ...

    def put_embeddings(
        self, collection: str, items: Sequence[tuple[str, FaceEmbedding]], migration: dict[str, Any] | None
    ) -> int: ...

    def faces_to_embed(self, collection: str, version: str, after: str, limit: int) -> list[tuple[str, bytes]]: ...

    def faces_to_derive(
        self, collection: str, source: str, version: str, after: str, limit: int
    ) -> list[FaceRecord]: ...

    def version_coverage(self, collection: str, version: str) -> tuple[int, int]: ...

    def faces_without_crops(self, collection: str, version: str) -> dict[str, int]: ...

    def switch_version(self, name: str, to: str, drop_missing: bool = False) -> tuple[CollectionRecord, list[str]]: ...

    def drop_version(self, name: str, version: str) -> CollectionRecord: ...

    def merge_subjects(self, collection: str, into: str, source: str) -> list[str]: ...

    def move_faces(self, collection: str, face_ids: Sequence[str], source: str, to: str) -> list[str]: ...

    def append_audit(self, entry: audit.AuditEntry) -> None: ...

    def audit_entries(
        self,
        after: int = 0,
        limit: int = 100,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        collection: str | None = None,
    ) -> list[dict[str, Any]]: ...

    def prune_audit(self, before: float) -> int: ...

    def faces_enrolled_since(self, key_id: str, since: float) -> int: ...

    def delete_collection(self, name: str) -> list[str]: ...

    def collection(self, name: str) -> CollectionRecord: ...

    def collections(self) -> list[CollectionRecord]: ...

    def face_ids(self) -> set[str]: ...

    def faces_by_id(self, face_ids: list[str], versions: dict[str, str] | None = None) -> list[FaceRecord]: ...

    def subject(self, subject: str, collection: str = DEFAULT_COLLECTION) -> SubjectRecord: ...

    def subjects(
        self, offset: int, limit: int, collection: str | None = DEFAULT_COLLECTION
    ) -> tuple[list[SubjectRecord], int]: ...

    def faces_of(
        self, subject: str, collection: str = DEFAULT_COLLECTION, version: str | None = None
    ) -> list[FaceRecord]: ...

    def face(self, face_id: str, version: str | None = None) -> FaceRecord: ...

    def iter_faces(self) -> Iterator[FaceRecord]: ...

    def close(self) -> None: ...


#: The schema's version (``meta.schema_version``): 1 had one gallery; 2 has collections; 3 has model versions per
#: collection and faces' data at more than one version (migration, rollback).
SCHEMA_VERSION = 3

#: The subjects' and faces' columns (schema 2), as both the schema and the migration to it create them.
_SUBJECT_COLUMNS = """(
    collection TEXT NOT NULL REFERENCES collections(name), subject TEXT NOT NULL, name TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, PRIMARY KEY (collection, subject)
)"""
_FACE_TABLE_COLUMNS = """(
    face_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    model_version TEXT NOT NULL,
    embedding BLOB NOT NULL, feature_map BLOB NOT NULL, fmap_shape TEXT NOT NULL, occlusion BLOB NOT NULL,
    norm REAL NOT NULL, quality REAL NOT NULL, detection_score REAL, box TEXT, crop BLOB, created_at REAL NOT NULL,
    collection TEXT NOT NULL,
    FOREIGN KEY (collection, subject) REFERENCES subjects(collection, subject) ON DELETE CASCADE
)"""

#: What schema 3 adds to a collection: its versions, a migration's state, its crops policy (both stores).
COLLECTION_VERSION_COLUMNS = (
    "model_version", "previous_version", "migration", "store_crops", "switched_at"
)  # fmt: skip

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY, created_at REAL NOT NULL, model_version TEXT, previous_version TEXT, migration TEXT,
    store_crops INTEGER, switched_at REAL
);
CREATE TABLE IF NOT EXISTS subjects {_SUBJECT_COLUMNS};
CREATE TABLE IF NOT EXISTS faces {_FACE_TABLE_COLUMNS};
CREATE INDEX IF NOT EXISTS faces_subject ON faces(collection, subject);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, subject TEXT NOT NULL, response TEXT NOT NULL,
    created_at REAL NOT NULL, collection TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency(created_at);
CREATE INDEX IF NOT EXISTS idempotency_subject ON idempotency(collection, subject);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, key_id TEXT NOT NULL, action TEXT NOT NULL,
    collection TEXT, subject TEXT, other_subject TEXT, faces INTEGER NOT NULL DEFAULT 0, outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE INDEX IF NOT EXISTS audit_key ON audit(key_id, action, at);
CREATE INDEX IF NOT EXISTS audit_subject ON audit(collection, subject);
CREATE INDEX IF NOT EXISTS audit_other ON audit(collection, other_subject);
CREATE TABLE IF NOT EXISTS face_embeddings (
    face_id TEXT NOT NULL REFERENCES faces(face_id) ON DELETE CASCADE, model_version TEXT NOT NULL,
    embedding BLOB NOT NULL, feature_map BLOB NOT NULL, fmap_shape TEXT NOT NULL, occlusion BLOB NOT NULL,
    norm REAL NOT NULL, quality REAL NOT NULL, PRIMARY KEY (face_id, model_version)
);
"""

#: Schema 2 to 3: each collection records the version of its faces (one per collection: schema 2 refused a
#: gallery of mixed versions), empty ones none yet; faces at other versions go into face_embeddings (made by
#: the schema above).
_MIGRATE_TO_3 = """
ALTER TABLE collections ADD COLUMN model_version TEXT;
ALTER TABLE collections ADD COLUMN previous_version TEXT;
ALTER TABLE collections ADD COLUMN migration TEXT;
ALTER TABLE collections ADD COLUMN store_crops INTEGER;
ALTER TABLE collections ADD COLUMN switched_at REAL;
UPDATE collections SET model_version =
    (SELECT f.model_version FROM faces f WHERE f.collection = collections.name LIMIT 1);
"""

#: Schema 1 (one gallery) to 2 (collections): the tables are rebuilt with the collection in their keys and every
#: subject, face and stored answer goes into the default collection, rows in their order (SQLite cannot change a
#: primary key in place). Run in one transaction with foreign keys off, checked before it commits.
_MIGRATE_TO_2 = f"""
CREATE TABLE collections (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
INSERT INTO collections(name, created_at) VALUES ('default', CAST(strftime('%s', 'now') AS REAL));
CREATE TABLE subjects_v2 {_SUBJECT_COLUMNS};
INSERT INTO subjects_v2(collection, subject, name, metadata, created_at)
    SELECT 'default', subject, name, metadata, created_at FROM subjects ORDER BY rowid;
CREATE TABLE faces_v2 {_FACE_TABLE_COLUMNS};
INSERT INTO faces_v2(face_id, subject, model_version, embedding, feature_map, fmap_shape, occlusion, norm, quality,
                     detection_score, box, crop, created_at, collection)
    SELECT face_id, subject, model_version, embedding, feature_map, fmap_shape, occlusion, norm, quality,
           detection_score, box, crop, created_at, 'default' FROM faces ORDER BY rowid;
DROP TABLE faces;
DROP TABLE subjects;
ALTER TABLE subjects_v2 RENAME TO subjects;
ALTER TABLE faces_v2 RENAME TO faces;
CREATE INDEX faces_subject ON faces(collection, subject);
DROP INDEX IF EXISTS idempotency_subject;
ALTER TABLE idempotency ADD COLUMN collection TEXT NOT NULL DEFAULT 'default';
CREATE INDEX idempotency_subject ON idempotency(collection, subject);
"""

#: The Idempotency-Key table as schema 1 had it (made before migrating a gallery older than it).
_IDEMPOTENCY_1 = (
    "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, "
    "subject TEXT NOT NULL, response TEXT NOT NULL, created_at REAL NOT NULL)"
)

_UPSERT_SUBJECT = (
    "INSERT INTO subjects(collection, subject, name, metadata, created_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(collection, subject) DO UPDATE SET name = COALESCE(excluded.name, subjects.name), "
    "metadata = CASE WHEN ? THEN excluded.metadata ELSE subjects.metadata END"
)
_SUBJECTS = (
    "SELECT s.subject, s.name, s.metadata, s.created_at, COUNT(f.face_id), s.collection FROM subjects s "
    "LEFT JOIN faces f ON f.collection = s.collection AND f.subject = s.subject"
)
#: A collection with its counts and versions (both stores: their tables differ only by a prefix).
COLLECTION_COUNTS = (
    "SELECT c.name, c.created_at, "
    "(SELECT COUNT(*) FROM {p}subjects s WHERE s.collection = c.name), "
    "(SELECT COUNT(*) FROM {p}faces f WHERE f.collection = c.name), "
    "c.model_version, c.previous_version, c.migration, c.store_crops, c.switched_at FROM {p}collections c"
)
#: A face's columns (:data:`FACE_COLUMNS`' order) with its data at one model version: its own row's where the face
#: is of that version, else its face_embeddings row of it (both stores; ``{p}`` the table prefix, ``{q}`` the
#: placeholder; the first two parameters are that version). ``{first}``: a column before them (the order key).
VERSIONED_FACES = (
    "SELECT {first}, f.face_id, f.subject, COALESCE(e.model_version, f.model_version), "
    "COALESCE(e.embedding, f.embedding), COALESCE(e.feature_map, f.feature_map), "
    "COALESCE(e.fmap_shape, f.fmap_shape), COALESCE(e.occlusion, f.occlusion), COALESCE(e.norm, f.norm), "
    "COALESCE(e.quality, f.quality), f.detection_score, f.box, f.crop, f.created_at, f.collection "
    "FROM {p}faces f LEFT JOIN {p}face_embeddings e ON e.face_id = f.face_id AND e.model_version = {q} "
    "WHERE (f.model_version = {q} OR e.face_id IS NOT NULL)"
)
#: Faces of a collection with a crop and without data at a version, after a face id (a migration's next batch).
FACES_TO_EMBED = (
    "SELECT f.face_id, f.crop FROM {p}faces f WHERE f.collection = {q} AND f.face_id > {q} AND f.crop IS NOT NULL "
    "AND f.model_version <> {q} AND NOT EXISTS (SELECT 1 FROM {p}face_embeddings e WHERE e.face_id = f.face_id "
    "AND e.model_version = {q}) ORDER BY f.face_id LIMIT {q}"
)
#: Faces of a collection without data at a version, with their data at another (the source of a derived migration),
#: after a face id.
FACES_TO_DERIVE = (
    VERSIONED_FACES.format(first="f.face_id", p="{p}", q="{q}")
    + " AND f.collection = {q} AND f.face_id > {q} AND f.model_version <> {q} AND NOT EXISTS (SELECT 1 FROM "
    "{p}face_embeddings d WHERE d.face_id = f.face_id AND d.model_version = {q}) ORDER BY f.face_id LIMIT {q}"
)
#: Faces of a collection (with their subjects) that have data at a version, and all of them.
VERSION_COVERAGE = (
    "SELECT COUNT(*) FILTER (WHERE f.model_version = {q} OR EXISTS (SELECT 1 FROM {p}face_embeddings e "
    "WHERE e.face_id = f.face_id AND e.model_version = {q})), COUNT(*) FROM {p}faces f WHERE f.collection = {q}"
)
#: Subjects of a collection with faces that lack data at a version and have no crop to make it from.
WITHOUT_CROPS = (
    "SELECT f.subject, COUNT(*) FROM {p}faces f WHERE f.collection = {q} AND f.crop IS NULL AND f.model_version <> {q} "
    "AND NOT EXISTS (SELECT 1 FROM {p}face_embeddings e WHERE e.face_id = f.face_id AND e.model_version = {q}) "
    "GROUP BY f.subject ORDER BY f.subject"
)
#: The audit log (both stores): entries after a position, filtered; the enrolled faces a key added since a time.
AUDIT_INSERT = f"INSERT INTO {{p}}audit({AUDIT_COLUMNS}) VALUES ({', '.join(['{q}'] * audit.AUDIT_COLUMN_COUNT)})"
AUDIT_SELECT = f"SELECT seq, {AUDIT_COLUMNS} FROM {{p}}audit WHERE seq > {{q}}"
ENROLLED_SINCE = (
    "SELECT COALESCE(SUM(faces), 0) FROM {p}audit WHERE key_id = {q} AND action = 'enrol' AND outcome = 'ok' "
    "AND at >= {q}"
)
#: The columns of a face's data at a version (face_embeddings; the faces table has them too).
EMBEDDING_COLUMNS = "face_id, model_version, embedding, feature_map, fmap_shape, occlusion, norm, quality"

#: A deleted subject's keys keep only the request's fingerprint: a late retry of its enrolment is refused
#: (422) instead of enrolling the deleted subject again, and no answer (face ids, boxes, file names) remains.
_FORGET_ANSWERS = "UPDATE idempotency SET response = '', subject = '' WHERE collection = ? AND subject = ?"
#: So do the keys whose answer lists a face deleted alone (its id, box and file name must not stay in a replay).
#: A face id is 32 hex digits (no LIKE wildcard), found in an answer only where that face is listed.
FORGET_FACE_ANSWERS = (
    "UPDATE {p}idempotency SET response = '', subject = '' WHERE collection = {q} AND subject = {q} "
    "AND response LIKE '{pct}' || {q} || '{pct}'"
)

#: What a client is told when the store fails: no path, no driver text (those go to the log).
WRITE_FAILED = "the gallery database cannot be written right now; retry later"
READ_FAILED = "the gallery database cannot be read right now; retry later"
BUSY = "the gallery database is busy with other writes; retry later"


def _private_files(path: Path) -> None:
    """Make the gallery's folder (mode 0700 when it is made here) and its database file readable by this user
    alone (0600): they hold embeddings, maps, crops and names. SQLite gives its ``-wal`` and ``-shm`` files the
    database file's mode. An existing file of this user's that others could read is tightened; an existing
    folder is the operator's to set, and one others can enter is logged."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    elif folder.stat().st_mode & 0o077 and folder.stat().st_uid == os.getuid():
        logger.warning(
            "gallery folder %s can be read by other users (mode %o): chmod 700 it",
            folder,
            folder.stat().st_mode & 0o777,
        )
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            info = f.stat()
        except FileNotFoundError:
            continue
        if info.st_mode & 0o077 and info.st_uid == os.getuid():
            f.chmod(0o600)


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
        #: how the file is open: "" (read-write), "ro" or "immutable" (it could not be written at start-up)
        self.open_mode = ""
        self._generation = 0  # bumped when the file is reopened: each thread's reader follows
        try:
            _private_files(self.path)
            self._db = self._open_writer()
        except (OSError, sqlite3.Error) as exc:
            self._db = self._open_read_only(exc)
        if self.open_mode:  # served as it is: no migration, no schema change
            if not (self._schema_current() and self._versions_recorded()):
                raise GalleryStoreError(
                    f"the gallery {self.path} is of an older schema and cannot be written ({self.open_mode}): "
                    "upgrading it needs the file writable once"
                )
            return
        self._migrate()
        try:
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO collections(name, created_at) VALUES (?, ?)", (DEFAULT_COLLECTION, time.time())
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        except sqlite3.Error as exc:
            if not self._has_faces_table():  # not even readable as a gallery
                raise GalleryStoreError(
                    f"cannot create the gallery {self.path}: {exc}; set OAML_DATA_DIR to a writable folder"
                ) from exc
            logger.warning("gallery %s: schema not brought up to date (%s); writes will fail", self.path, exc)

    def _open_writer(self) -> sqlite3.Connection:
        """The read-write connection: WAL (which creates ``-wal`` and ``-shm`` beside the file), fsync on commit,
        foreign keys, zeroed deletions."""
        db = self._connect("")
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # freed pages and cells are overwritten with zeros
        except BaseException:
            db.close()
            raise
        return db

    def _open_read_only(self, cause: BaseException) -> sqlite3.Connection:
        """Open an existing gallery that cannot be written (a read-only mount, a full disk), so it is served
        read-only instead of not at all: ``mode=ro`` where SQLite can still use its ``-wal``/``-shm`` files,
        else ``immutable=1``, which reads the file alone and so is used only when no write-ahead log holds
        commits the file lacks. A gallery that does not exist, or is not readable as one, stops start-up."""
        wal = self.path.with_name(self.path.name + "-wal")
        failure = GalleryStoreError(
            f"cannot open the gallery {self.path}: {cause}; set OAML_DATA_DIR to a writable folder"
        )
        if not self.path.is_file():
            raise failure from cause
        modes = ["ro"] + (["immutable"] if not wal.exists() or wal.stat().st_size == 0 else [])
        for mode in modes:
            self.open_mode = mode
            try:
                db = self._connect()
                if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'faces'").fetchone():
                    logger.warning("gallery %s cannot be written (%s): opened read-only (%s)", self.path, cause, mode)
                    return db
                db.close()
            except (OSError, sqlite3.Error):
                continue
        self.open_mode = ""
        if wal.exists() and wal.stat().st_size > 0:
            raise GalleryStoreError(
                f"cannot open the gallery {self.path}: {cause}; its write-ahead log holds commits that can only be "
                "read where the folder can be written: free space or mount it writable"
            ) from cause
        raise failure from cause

    def _reopen_writable(self) -> None:
        """Leave read-only mode once the file can be written again (the caller holds the writer's lock): the
        writer is reopened read-write and every thread's reader follows at its next read."""
        writer = self._open_writer()
        old, self._db, self.open_mode = self._db, writer, ""
        old.close()
        self._generation += 1
        self._migrate()
        self._db.executescript(_SCHEMA)
        logger.info("gallery %s can be written again: reopened read-write", self.path)

    def _migrate(self) -> None:
        """Bring an older gallery to this schema, each step one transaction (:meth:`_migrate_to_2`,
        :meth:`_migrate_to_3`). A gallery of a newer schema than this code knows is refused (an older service
        would corrupt it)."""
        self._migrate_to_2()
        self._migrate_to_3()

    def _versions_recorded(self) -> bool:
        """Whether the collections record their model versions (schema 3), or the file is new."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(collections)").fetchall()}
        return not columns or "model_version" in columns

    def _migrate_to_3(self) -> None:
        """Schema 2 to 3: each collection records the version of its faces; faces' data at other versions gets a
        table of its own (made with the schema). One transaction; nothing of the faces is rewritten."""
        if self._versions_recorded():
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not self._versions_recorded():  # of processes starting together, one migrates
                    for statement in _MIGRATE_TO_3.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise GalleryStoreError(
                f"the gallery {self.path} could not be brought to schema 3 (model versions per collection): {exc}; "
                "nothing was changed"
            ) from exc
        logger.info("gallery %s: migrated to schema 3: each collection records its faces' model version", self.path)

    def _migrate_to_2(self) -> None:
        """Bring a gallery of schema 1 (one gallery, no collections) to schema 2 in one transaction: its
        subjects, faces and stored answers go into the default collection, nothing is lost or reordered."""
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error:  # no meta table: a new file
            row = None
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise GalleryStoreError(
                f"the gallery {self.path} has schema {row[0]}, newer than this service's {SCHEMA_VERSION}: "
                "serve it with the release that wrote it (or a newer one)"
            )
        if self._schema_current():  # read first: a read-only gallery of the current schema is served as it is
            return
        self._db.execute("PRAGMA foreign_keys=OFF")  # the tables are rebuilt; the check below replaces it
        try:
            self._db.execute("BEGIN IMMEDIATE")  # checked again inside: of processes starting together, one migrates
            try:
                if self._schema_current():
                    self._db.execute("COMMIT")
                    return
                subjects = self._db.execute("SELECT COUNT(*) FROM subjects").fetchone()[0]
                faces = self._db.execute("SELECT COUNT(*) FROM faces").fetchone()[0]
                self._db.execute(_IDEMPOTENCY_1)  # galleries older than the Idempotency-Key have no such table
                for statement in _MIGRATE_TO_2.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                broken = self._db.execute("PRAGMA foreign_key_check").fetchall()
                moved = self._db.execute("SELECT COUNT(*) FROM faces WHERE collection = 'default'").fetchone()[0]
                if broken or moved != faces:
                    raise sqlite3.IntegrityError(f"migration check: {len(broken)} dangling rows, {moved}/{faces} faces")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back by itself (a full disk, an I/O error)
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise GalleryStoreError(
                f"the gallery {self.path} is of schema 1 and could not be migrated to schema 2 "
                f"(collections): {exc}. Migrating needs the file writable and free space about its size; nothing "
                "was changed"
            ) from exc
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")
        logger.info(
            "gallery %s: migrated to schema %d (collections): %d subjects and %d faces are in collection %r",
            self.path,
            2,
            subjects,
            faces,
            DEFAULT_COLLECTION,
        )

    def _schema_current(self) -> bool:
        """A new file, or a gallery with collections already (schema 2)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(subjects)").fetchall()}
        return not columns or "collection" in columns

    def _connect(self, mode: str | None = None) -> sqlite3.Connection:
        """A connection to the file, opened as ``mode`` says (default :attr:`open_mode`): ``""`` read-write,
        ``ro`` or ``immutable``."""
        query = {"": "", "ro": "?mode=ro", "immutable": "?immutable=1"}[self.open_mode if mode is None else mode]
        target = f"file:{quote(str(self.path.resolve()))}{query}"
        return sqlite3.connect(target, uri=True, check_same_thread=False, isolation_level=None, timeout=self.timeout_s)

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
        if db is not None and getattr(self._local, "generation", 0) != self._generation:
            db.close()  # opened read-only before the file could be written again
            db = None
        if db is None:
            try:
                db = self._connect()
                db.execute("PRAGMA query_only=ON")
            except sqlite3.Error as exc:
                raise self._failure(READ_FAILED, "read", exc) from exc
            self._local.db, self._local.generation = db, self._generation
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
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under a lock (one writer at a time), waiting for it and for the
        database's lock at most ``timeout_s`` in all, or what is left of the write's deadline
        (:mod:`service.deadline`); SQLite failures become :class:`GalleryStoreError` (503 ``STORE_UNAVAILABLE``)."""
        if not self._lock.acquire(timeout=time_left(self.timeout_s)):
            raise GalleryStoreError(BUSY, internal=f"gallery {self.path}: write lock not free in {self.timeout_s}s")
        try:
            try:
                self._db.execute(f"PRAGMA busy_timeout = {int(time_left(self.timeout_s) * 1000)}")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    entry = audit.current()  # the operation's audit entry, committed with it
                    if entry is not None and not entry.recorded:
                        self._db.execute(
                            f"INSERT INTO audit({AUDIT_COLUMNS}) VALUES ({', '.join('?' * audit.AUDIT_COLUMN_COUNT)})",
                            entry.row(),
                        )
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                if entry is not None:
                    entry.recorded = True
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
        """Write and commit one row, so a read-only file or a full disk is known at start-up (and, for a file
        opened read-only, reopen it read-write first once that works)."""
        if self.open_mode:
            if not self._lock.acquire(timeout=time_left(self.timeout_s)):
                raise GalleryStoreError(BUSY, internal=f"gallery {self.path}: write lock not free in {self.timeout_s}s")
            try:
                self._reopen_writable()
            except (OSError, sqlite3.Error) as exc:
                raise self._failure(WRITE_FAILED, "write", exc) from exc
            finally:
                self._lock.release()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_opened', ?)", (str(time.time()),))

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
            total = db.execute(
                "SELECT COUNT(*) FROM faces WHERE collection = ? AND subject = ?",
                (enrolment.collection, enrolment.subject),
            ).fetchone()[0]
            body = render(total) if render is not None else None
            if key is not None and body is not None:
                db.execute(
                    "INSERT INTO idempotency(key, request_hash, collection, subject, response, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (key, request_hash, enrolment.collection, enrolment.subject, body, now),
                )
        return EnrolCommit(total_faces=int(total), body=body)

    def enrol_many(self, enrolments: Sequence[Enrolment]) -> None:
        """Several enrolments in one transaction (bulk imports, benchmarks)."""
        with self._tx() as db:
            for enrolment in enrolments:
                self._write_enrolment(db, enrolment)

    def _write_enrolment(self, db: sqlite3.Connection, e: Enrolment) -> None:
        if db.execute("SELECT 1 FROM collections WHERE name = ?", (e.collection,)).fetchone() is None:
            raise CollectionNotFound(f"collection {e.collection!r} does not exist")
        db.execute(
            _UPSERT_SUBJECT,
            (e.collection, e.subject, e.name, json.dumps(e.metadata or {}), time.time(), e.metadata is not None),
        )
        db.executemany(
            f"INSERT INTO faces({FACE_COLUMNS}) VALUES ({', '.join('?' * FACE_COLUMN_COUNT)})",
            [face_row(f, self.model_version, e.collection) for f in e.faces],
        )
        db.executemany(
            f"INSERT INTO face_embeddings({EMBEDDING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [embedding_row(f.face_id, other) for f in e.faces for other in f.others],
        )
        if e.faces:  # a collection without a version yet takes its first face's
            version = e.faces[0].model_version or self.model_version
            db.execute(
                "UPDATE collections SET model_version = ? WHERE name = ? AND model_version IS NULL",
                (version, e.collection),
            )

    def answer_for(self, key: str) -> StoredAnswer | None:
        """The answer recorded under ``key`` (within :data:`IDEMPOTENCY_TTL_S`), if any."""
        with self._read() as db:
            row = db.execute(
                "SELECT request_hash, response FROM idempotency WHERE key = ? AND created_at >= ?",
                (key, time.time() - IDEMPOTENCY_TTL_S),
            ).fetchone()
        return StoredAnswer(row[0], row[1]) if row is not None else None

    @staticmethod
    def _require_subject(db: sqlite3.Connection, collection: str, subject: str) -> None:
        found = db.execute("SELECT 1 FROM subjects WHERE collection = ? AND subject = ?", (collection, subject))
        if found.fetchone() is None:
            raise SubjectNotFound(subject_missing(subject, collection))

    def delete_subject(self, subject: str, collection: str = DEFAULT_COLLECTION) -> list[str]:
        with self._tx() as db:
            self._require_subject(db, collection, subject)
            where = "WHERE collection = ? AND subject = ?"
            ids = [r[0] for r in db.execute(f"SELECT face_id FROM faces {where}", (collection, subject))]
            db.execute(f"DELETE FROM faces {where}", (collection, subject))
            db.execute(_FORGET_ANSWERS, (collection, subject))
            db.execute(f"DELETE FROM subjects {where}", (collection, subject))
            self._forget_in_audit(db, collection, [subject], faces=len(ids))
            self._wal_dirty = True
        return ids

    def _secret(self, db: sqlite3.Connection) -> bytes:
        """The gallery's own key for the audit log's pseudonyms (made once, kept in ``meta``)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'audit_secret'").fetchone()
        if row is None:
            value = secrets.token_hex(32)
            db.execute("INSERT INTO meta(key, value) VALUES ('audit_secret', ?)", (value,))
            return bytes.fromhex(value)
        return bytes.fromhex(row[0])

    def _forget_in_audit(self, db: sqlite3.Connection, collection: str, subjects: Sequence[str], faces: int) -> None:
        """Deleted subjects' ids become pseudonyms in the log, in this deletion's own entry too."""
        audit.pseudonymise(db.execute, self._secret(db), "", "?", collection, subjects)
        audit.note(faces=faces)

    # -- the audit log ----------------------------------------------------------------------------

    def append_audit(self, entry: audit.AuditEntry) -> None:
        """Record an entry on its own (a refused operation, a read such as an export)."""
        with audit.pending(entry), self._tx():
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
        query, args = audit_query("", "?", after, since, until, action, collection)
        with self._read() as db:
            rows = db.execute(f"{query} ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [audit.entry_from_row(tuple(r)) for r in rows]

    def prune_audit(self, before: float) -> int:
        """Delete the entries older than ``before`` (the retention); returns how many."""
        with self._tx() as db:
            return int(db.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount)

    def faces_enrolled_since(self, key_id: str, since: float) -> int:
        """Faces the key enrolled since ``since`` (its daily quota), from the log."""
        with self._read() as db:
            return int(db.execute(ENROLLED_SINCE.format(p="", q="?"), (key_id, since)).fetchone()[0])

    # -- identity hygiene: merging subjects, moving faces -------------------------------------------

    def merge_subjects(self, collection: str, into: str, source: str) -> list[str]:
        """Move every face of ``source`` to ``into`` and delete ``source`` (its name taken by ``into`` when it has
        none), in one transaction; answers stored under ``source``'s keys are forgotten. Returns the moved ids."""
        with self._tx() as db:
            self._require_subject(db, collection, into)
            self._require_subject(db, collection, source)
            where = "WHERE collection = ? AND subject = ?"
            ids = [r[0] for r in db.execute(f"SELECT face_id FROM faces {where}", (collection, source))]
            db.execute(f"UPDATE faces SET subject = ? {where}", (into, collection, source))
            db.execute(
                "UPDATE subjects SET name = COALESCE(name, (SELECT name FROM subjects WHERE collection = ? "
                "AND subject = ?)) WHERE collection = ? AND subject = ?",
                (collection, source, collection, into),
            )
            db.execute(_FORGET_ANSWERS, (collection, source))
            db.execute(f"DELETE FROM subjects {where}", (collection, source))
            self._forget_in_audit(db, collection, [source], faces=len(ids))  # an id that is no more
        return ids

    def move_faces(self, collection: str, face_ids: Sequence[str], source: str, to: str) -> list[str]:
        """Move faces of ``source`` to subject ``to`` (made if new), in one transaction; answers that listed them
        are forgotten. Raises FaceNotFound for a face that is not ``source``'s."""
        with self._tx() as db:
            self._require_subject(db, collection, source)
            for fid in face_ids:
                found = db.execute(
                    "SELECT 1 FROM faces WHERE face_id = ? AND collection = ? AND subject = ?",
                    (fid, collection, source),
                ).fetchone()
                if found is None:
                    raise FaceNotFound(f"face {fid!r} does not belong to subject {source!r}")
            db.execute(
                "INSERT OR IGNORE INTO subjects(collection, subject, name, metadata, created_at) "
                "VALUES (?, ?, NULL, '{}', ?)",
                (collection, to, time.time()),
            )
            for fid in face_ids:
                db.execute("UPDATE faces SET subject = ? WHERE face_id = ?", (to, fid))
                db.execute(FORGET_FACE_ANSWERS.format(p="", q="?", pct="%"), (collection, source, fid))
            audit.note(faces=len(face_ids))
        return list(face_ids)

    def update_subject(self, subject: str, changes: dict[str, Any], collection: str = DEFAULT_COLLECTION) -> None:
        """Set the subject's ``name`` (None clears it) and/or ``metadata`` (replaced whole), as ``changes`` has them."""
        with self._tx() as db:
            self._require_subject(db, collection, subject)
            where = "WHERE collection = ? AND subject = ?"
            if "name" in changes:
                db.execute(f"UPDATE subjects SET name = ? {where}", (changes["name"], collection, subject))
            if "metadata" in changes:
                db.execute(
                    f"UPDATE subjects SET metadata = ? {where}", (json.dumps(changes["metadata"]), collection, subject)
                )

    def delete_face(self, subject: str, face_id: str, collection: str = DEFAULT_COLLECTION) -> None:
        with self._tx() as db:
            self._require_subject(db, collection, subject)
            gone = db.execute(
                "DELETE FROM faces WHERE face_id = ? AND collection = ? AND subject = ?", (face_id, collection, subject)
            )
            if gone.rowcount == 0:
                raise FaceNotFound(f"face {face_id!r} does not belong to subject {subject!r}")
            db.execute(FORGET_FACE_ANSWERS.format(p="", q="?", pct="%"), (collection, subject, face_id))
            self._wal_dirty = True

    # -- collections -----------------------------------------------------------------------------

    def create_collection(self, name: str, model_version: str | None = None) -> CollectionRecord:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone() is not None:
                raise CollectionExists(f"collection {name!r} exists already")
            created = time.time()
            db.execute(
                "INSERT INTO collections(name, created_at, model_version) VALUES (?, ?, ?)",
                (name, created, model_version),
            )
        return CollectionRecord(name, created, model_version=model_version)

    def update_collection(self, name: str, changes: dict[str, Any]) -> CollectionRecord:
        """Set any of :data:`COLLECTION_VERSION_COLUMNS` (``migration`` a dict or None)."""
        with self._tx() as db:
            self._require_collection(db, name)
            for column, value in collection_changes(changes):
                db.execute(f"UPDATE collections SET {column} = ? WHERE name = ?", (value, name))
        return self.collection(name)

    @staticmethod
    def _require_collection(db: sqlite3.Connection, name: str) -> tuple[Any, ...]:
        row = db.execute(f"{COLLECTION_COUNTS.format(p='')} WHERE c.name = ?", (name,)).fetchone()
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return tuple(row)

    # -- model versions: a collection's faces at more than one version ------------------------

    def faces_for(self, collection: str, version: str) -> Iterator[FaceRecord]:
        """The collection's faces at ``version`` (those that have it), in enrolment order, a page at a time."""
        query = VERSIONED_FACES.format(first="f.rowid", p="", q="?")
        last = 0
        while True:
            with self._read() as db:
                rows = db.execute(
                    f"{query} AND f.collection = ? AND f.rowid > ? ORDER BY f.rowid LIMIT 256",
                    (version, version, collection, last),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield face_from_row(row[1:])
            last = rows[-1][0]

    def put_embeddings(
        self, collection: str, items: Sequence[tuple[str, FaceEmbedding]], migration: dict[str, Any] | None
    ) -> int:
        """Faces' data at another version (a migration's batch), for those faces still enrolled in
        ``collection``, with the migration's progress in the same transaction; returns how many were written."""
        with self._tx() as db:
            written = 0
            for face_id, data in items:
                cursor = db.execute(
                    f"INSERT OR REPLACE INTO face_embeddings({EMBEDDING_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM faces WHERE face_id = ? AND collection = ? AND model_version <> ?)",
                    (*embedding_row(face_id, data), face_id, collection, data.model_version),
                )
                written += cursor.rowcount
            if migration is not None:
                db.execute("UPDATE collections SET migration = ? WHERE name = ?", (json.dumps(migration), collection))
        return written

    def faces_to_embed(self, collection: str, version: str, after: str, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` faces (id, crop) of the collection that lack ``version`` and have a crop to make it
        from, after face id ``after`` (a migration's next batch, resumable from any point)."""
        with self._read() as db:
            rows = db.execute(
                FACES_TO_EMBED.format(p="", q="?"), (collection, after, version, version, limit)
            ).fetchall()
        return [(r[0], bytes(r[1])) for r in rows]

    def faces_to_derive(self, collection: str, source: str, version: str, after: str, limit: int) -> list[FaceRecord]:
        """Up to ``limit`` faces of the collection that lack ``version``, with their data at ``source``, after face
        id ``after`` (a derived migration's next batch: no crop needed)."""
        with self._read() as db:
            rows = db.execute(
                FACES_TO_DERIVE.format(p="", q="?"), (source, source, collection, after, version, version, limit)
            ).fetchall()
        return [face_from_row(r[1:]) for r in rows]

    def version_coverage(self, collection: str, version: str) -> tuple[int, int]:
        """(faces of the collection that have data at ``version``, all its faces)."""
        with self._read() as db:
            row = db.execute(VERSION_COVERAGE.format(p="", q="?"), (version, version, collection)).fetchone()
        return int(row[0]), int(row[1])

    def faces_without_crops(self, collection: str, version: str) -> dict[str, int]:
        """Subject -> faces of it that lack ``version`` and have no crop to make it from."""
        with self._read() as db:
            rows = db.execute(WITHOUT_CROPS.format(p="", q="?"), (collection, version, version)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def switch_version(self, name: str, to: str, drop_missing: bool = False) -> tuple[CollectionRecord, list[str]]:
        """Make ``to`` the collection's version in one transaction, keeping the old one as ``previous_version``
        (rollback). Every face must have data at ``to``; with ``drop_missing`` the faces that do not are deleted
        (listed in the answer), else :class:`MigrationIncomplete`."""
        with self._tx() as db:
            record = collection_from_row(self._require_collection(db, name))
            have, total = (int(x) for x in db.execute(VERSION_COVERAGE.format(p="", q="?"), (to, to, name)).fetchone())
            dropped: list[str] = []
            if have < total:
                if not drop_missing:
                    raise MigrationIncomplete(f"{total - have} of {total} faces of {name!r} have no data at {to}")
                missing = (
                    "SELECT face_id FROM faces f WHERE f.collection = ? AND f.model_version <> ? AND NOT EXISTS "
                    "(SELECT 1 FROM face_embeddings e WHERE e.face_id = f.face_id AND e.model_version = ?)"
                )
                dropped = [r[0] for r in db.execute(missing, (name, to, to))]
                db.executemany("DELETE FROM faces WHERE face_id = ?", [(fid,) for fid in dropped])
                for fid in dropped:
                    db.execute(
                        "UPDATE idempotency SET response = '', subject = '' WHERE instr(response, ?) > 0", (fid,)
                    )
                self._wal_dirty = bool(dropped)
            audit.note(faces=len(dropped))
            previous = record.model_version if record.model_version != to else record.previous_version
            db.execute(
                "UPDATE collections SET model_version = ?, previous_version = ?, migration = NULL, switched_at = ? "
                "WHERE name = ?",
                (to, previous, time.time(), name),
            )
        return self.collection(name), dropped

    def drop_version(self, name: str, version: str) -> CollectionRecord:
        """Erase the collection's data at ``version`` (not its active one): faces whose own row holds it take
        the active version's data into it; the rest of it is deleted (zeroed in the file, as deletions are)."""
        with self._tx() as db:
            record = collection_from_row(self._require_collection(db, name))
            active = record.model_version
            if version == active:
                raise ValueError(f"{version} is the version collection {name!r} is matched with")
            if active is not None:
                db.execute(
                    "UPDATE faces SET (model_version, embedding, feature_map, fmap_shape, occlusion, norm, quality) = "
                    "(SELECT e.model_version, e.embedding, e.feature_map, e.fmap_shape, e.occlusion, e.norm, e.quality "
                    "FROM face_embeddings e WHERE e.face_id = faces.face_id AND e.model_version = ?) "
                    "WHERE collection = ? AND model_version = ? AND EXISTS (SELECT 1 FROM face_embeddings e "
                    "WHERE e.face_id = faces.face_id AND e.model_version = ?)",
                    (active, name, version, active),
                )
                db.execute(
                    "DELETE FROM face_embeddings WHERE model_version = ? AND face_id IN "
                    "(SELECT face_id FROM faces WHERE collection = ? AND model_version = ?)",
                    (active, name, active),
                )
            db.execute(
                "DELETE FROM face_embeddings WHERE model_version = ? AND face_id IN "
                "(SELECT face_id FROM faces WHERE collection = ?)",
                (version, name),
            )
            if record.previous_version == version:
                db.execute("UPDATE collections SET previous_version = NULL WHERE name = ?", (name,))
            if (record.migration or {}).get("to") == version:
                db.execute("UPDATE collections SET migration = NULL WHERE name = ?", (name,))
            self._wal_dirty = True
        return self.collection(name)

    def delete_collection(self, name: str) -> list[str]:
        """Delete the collection with every subject and face in it (erased from the files, as a subject's
        deletion is) and forget its stored answers; returns the deleted faces' ids."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone() is None:
                raise CollectionNotFound(f"collection {name!r} does not exist")
            ids = [r[0] for r in db.execute("SELECT face_id FROM faces WHERE collection = ?", (name,))]
            db.execute("DELETE FROM faces WHERE collection = ?", (name,))
            db.execute("UPDATE idempotency SET response = '', subject = '' WHERE collection = ?", (name,))
            subjects = [r[0] for r in db.execute("SELECT subject FROM subjects WHERE collection = ?", (name,))]
            self._forget_in_audit(db, name, subjects, faces=len(ids))
            db.execute("DELETE FROM subjects WHERE collection = ?", (name,))
            db.execute("DELETE FROM collections WHERE name = ?", (name,))
            self._wal_dirty = True
        return ids

    def collection(self, name: str) -> CollectionRecord:
        with self._read() as db:
            row = db.execute(f"{COLLECTION_COUNTS.format(p='')} WHERE c.name = ?", (name,)).fetchone()
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return collection_from_row(row)

    def collections(self) -> list[CollectionRecord]:
        with self._read() as db:
            rows = db.execute(f"{COLLECTION_COUNTS.format(p='')} ORDER BY c.name").fetchall()
        return [collection_from_row(r) for r in rows]

    # -- reading ----------------------------------------------------------------------------------

    def subject(self, subject: str, collection: str = DEFAULT_COLLECTION) -> SubjectRecord:
        with self._read() as db:
            row = db.execute(
                f"{_SUBJECTS} WHERE s.collection = ? AND s.subject = ? GROUP BY s.collection, s.subject",
                (collection, subject),
            ).fetchone()
        if row is None:
            raise SubjectNotFound(subject_missing(subject, collection))
        return subject_from_row(row)

    def subjects(
        self, offset: int, limit: int, collection: str | None = DEFAULT_COLLECTION
    ) -> tuple[list[SubjectRecord], int]:
        """A page of the collection's subjects by id (of every collection's, by collection and id, for None)."""
        where, args = ("WHERE s.collection = ?", (collection,)) if collection is not None else ("", ())
        with self._read() as db:
            total = db.execute(f"SELECT COUNT(*) FROM subjects s {where}", args).fetchone()[0]
            rows = db.execute(
                f"{_SUBJECTS} {where} GROUP BY s.collection, s.subject ORDER BY s.collection, s.subject "
                "LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        return [subject_from_row(r) for r in rows], total

    def faces_of(
        self, subject: str, collection: str = DEFAULT_COLLECTION, version: str | None = None
    ) -> list[FaceRecord]:
        """The subject's faces, in enrolment order: as stored, or at ``version`` (those that have it)."""
        self.subject(subject, collection)
        with self._read() as db:
            if version is None:
                rows = db.execute(
                    f"SELECT 0, {FACE_COLUMNS} FROM faces WHERE collection = ? AND subject = ? "
                    "ORDER BY created_at, rowid",
                    (collection, subject),
                ).fetchall()
            else:
                rows = db.execute(
                    f"{VERSIONED_FACES.format(first='0', p='', q='?')} AND f.collection = ? AND f.subject = ? "
                    "ORDER BY f.created_at, f.rowid",
                    (version, version, collection, subject),
                ).fetchall()
        return [face_from_row(r[1:]) for r in rows]

    def face(self, face_id: str, version: str | None = None) -> FaceRecord:
        """One face, as stored or at ``version`` (FaceNotFound when it lacks it)."""
        with self._read() as db:
            if version is None:
                row = db.execute(f"SELECT 0, {FACE_COLUMNS} FROM faces WHERE face_id = ?", (face_id,)).fetchone()
            else:
                query = f"{VERSIONED_FACES.format(first='0', p='', q='?')} AND f.face_id = ?"
                row = db.execute(query, (version, version, face_id)).fetchone()
        if row is None:
            raise FaceNotFound(f"face {face_id!r} is not enrolled")
        return face_from_row(row[1:])

    def face_ids(self) -> set[str]:
        """Every enrolled face's id (reconciling the index with the store)."""
        with self._read() as db:
            return {r[0] for r in db.execute("SELECT face_id FROM faces")}

    def faces_by_id(self, face_ids: list[str], versions: dict[str, str] | None = None) -> list[FaceRecord]:
        """The faces among ``face_ids`` that are still enrolled, in enrolment order; with ``versions`` (collection
        -> version), each at its collection's version (a face without it is left out)."""
        found: list[tuple[Any, ...]] = []
        others: list[tuple[Any, ...]] = []
        with self._read() as db:
            for start in range(0, len(face_ids), 500):
                part = face_ids[start : start + 500]
                marks = ", ".join("?" * len(part))
                found += db.execute(
                    f"SELECT rowid, {FACE_COLUMNS} FROM faces WHERE face_id IN ({marks})", part
                ).fetchall()
                if versions is not None:
                    others += db.execute(
                        f"SELECT {EMBEDDING_COLUMNS} FROM face_embeddings WHERE face_id IN ({marks})", part
                    ).fetchall()
        records = [face_from_row(r[1:]) for r in sorted(found, key=lambda r: r[0])]
        return records if versions is None else at_versions(records, others, versions)

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
    "norm, quality, detection_score, box, crop, created_at, collection"
)
FACE_COLUMN_COUNT = FACE_COLUMNS.count(",") + 1


def subject_missing(subject: str, collection: str) -> str:
    """What a 404 for a subject says (the collection named when it is not the default one)."""
    where = "" if collection == DEFAULT_COLLECTION else f" in collection {collection!r}"
    return f"subject {subject!r} is not enrolled{where}"


def subject_from_row(row: Sequence[Any]) -> SubjectRecord:
    """A row of the subject queries (both stores): id, name, metadata, created, face count, collection."""
    return SubjectRecord(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])


def face_row(f: FaceRecord, model_version: str, collection: str | None = None) -> tuple[Any, ...]:
    """A face as stored: arrays as raw little-endian bytes (maps in float16), shapes and boxes as JSON; its data
    at its own version (``f.model_version``), else at ``model_version`` (the store's default)."""
    return (
        f.face_id,
        f.subject,
        f.model_version or model_version,
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
        collection if collection is not None else f.collection,
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
        collection=row[13],
        model_version=row[2],
    )


def audit_query(
    p: str,
    q: str,
    after: int,
    since: float | None,
    until: float | None,
    action: str | None,
    collection: str | None,
) -> tuple[str, list[Any]]:
    """The audit log's query with its filters (both stores)."""
    query = AUDIT_SELECT.format(p=p, q=q)
    args: list[Any] = [after]
    for column, op, value in (
        ("at", ">=", since),
        ("at", "<", until),
        ("action", "=", action),
        ("collection", "=", collection),
    ):
        if value is not None:
            query += f" AND {column} {op} {q}"
            args.append(value)
    return query, args


def embedding_row(face_id: str, e: FaceEmbedding) -> tuple[Any, ...]:
    """A face's data at one version as face_embeddings stores it (:data:`EMBEDDING_COLUMNS`)."""
    return (
        face_id,
        e.model_version,
        e.embedding.astype(np.float32).tobytes(),
        e.feature_map.astype(np.float16).tobytes(),
        json.dumps(list(e.feature_map.shape)),
        e.occlusion.astype(np.float32).tobytes(),
        e.norm,
        e.quality,
    )


def embedding_from_row(row: Sequence[Any]) -> tuple[str, FaceEmbedding]:
    """The inverse of :func:`embedding_row`: (face id, its data at one version)."""
    return row[0], FaceEmbedding(
        model_version=row[1],
        embedding=np.frombuffer(row[2], dtype=np.float32).copy(),
        feature_map=np.frombuffer(row[3], dtype=np.float16).reshape(json.loads(row[4])).copy(),
        occlusion=np.frombuffer(row[5], dtype=np.float32).reshape(7, 7).copy(),
        norm=row[6],
        quality=row[7],
    )


def at_versions(
    records: Sequence[FaceRecord], embedding_rows: Sequence[Sequence[Any]], versions: dict[str, str]
) -> list[FaceRecord]:
    """Each face at its collection's version (``versions``): its own data where it is of that version, else its
    face_embeddings row of it; faces of collections not in ``versions``, or without that version, left out."""
    extra: dict[tuple[str, str], FaceEmbedding] = {}
    for row in embedding_rows:
        face_id, data = embedding_from_row(row)
        extra[(face_id, data.model_version)] = data
    out = []
    for r in records:
        version = versions.get(r.collection)
        if version is None:
            continue
        if r.model_version == version:
            out.append(r)
        elif (r.face_id, version) in extra:
            e = extra[(r.face_id, version)]
            out.append(
                dataclasses.replace(
                    r,
                    model_version=version,
                    embedding=e.embedding,
                    feature_map=e.feature_map,
                    occlusion=e.occlusion,
                    norm=e.norm,
                    quality=e.quality,
                )
            )
    return out


def collection_from_row(row: Sequence[Any]) -> CollectionRecord:
    """A row of :data:`COLLECTION_COUNTS` (both stores)."""
    return CollectionRecord(
        name=row[0],
        created_at=row[1],
        subjects=int(row[2]),
        faces=int(row[3]),
        model_version=row[4],
        previous_version=row[5],
        migration=json.loads(row[6]) if row[6] else None,
        store_crops=bool(row[7]) if row[7] is not None else None,
        switched_at=row[8],
    )


def collection_changes(changes: dict[str, Any]) -> list[tuple[str, Any]]:
    """``changes`` to a collection's :data:`COLLECTION_VERSION_COLUMNS` as (column, stored value) pairs."""
    unknown = set(changes) - set(COLLECTION_VERSION_COLUMNS)
    if unknown:
        raise ValueError(f"not a collection's setting: {sorted(unknown)}")
    out = []
    for column, value in changes.items():
        if column == "migration":
            value = json.dumps(value) if value is not None else None
        elif column == "store_crops":
            value = None if value is None else int(bool(value))
        out.append((column, value))
    return out


def new_face_id() -> str:
    return uuid.uuid4().hex
