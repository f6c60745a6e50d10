"""The gallery's store of record: enrolled subjects and faces, durable across crashes.

Durability: every enrolment is committed to the store (SQLite in WAL mode with
``synchronous=FULL``) before the API acknowledges it, so it survives ``kill -9``. At start-up the
in-memory index (:mod:`service.index`) is rebuilt from the store. Records carry the model
version; a store written by other weights is refused (:class:`GalleryVersionError`) instead of
matching incompatible embeddings.

The store is behind :class:`GalleryStore`: :class:`SQLiteGalleryStore` is the embedded default (no
server to run); :mod:`service.store_pg` puts the gallery in PostgreSQL for several replicas. Nothing here touches
torch: the store holds numpy arrays and bytes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.errors import FaceNotFound, GalleryStoreError, GalleryVersionError, SubjectNotFound

__all__ = [
    "FaceRecord",
    "SubjectRecord",
    "GalleryStore",
    "SQLiteGalleryStore",
    "GalleryVersionError",
    "SubjectNotFound",
    "FaceNotFound",
    "new_face_id",
    "FACE_COLUMNS",
    "face_row",
    "face_from_row",
]


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


class GalleryStore(Protocol):
    """What the service needs from a durable store."""

    model_version: str

    def check_version(self) -> None: ...

    def upsert_subject(self, subject: str, name: str | None, metadata: dict[str, Any] | None) -> None: ...

    def add_faces(self, faces: list[FaceRecord]) -> None: ...

    def delete_subject(self, subject: str) -> list[str]: ...

    def delete_face(self, subject: str, face_id: str) -> None: ...

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
"""


class SQLiteGalleryStore:
    """Embedded store: one SQLite file in WAL mode, fsync on every commit."""

    def __init__(self, path: str | Path, model_version: str) -> None:
        self.path = Path(path)
        self.model_version = model_version
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise GalleryStoreError(
                f"cannot open the gallery {self.path}: {exc}; set OAML_DATA_DIR to a writable folder",
                path=str(self.path),
            ) from exc

    def check_writable(self) -> None:
        """Write and commit one row, so a read-only file or folder fails start-up instead of every enrolment."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_opened', ?)", (str(time.time()),))

    def check_version(self) -> None:
        """Refuse a store made by other weights (the embeddings would be meaningless)."""
        rows = self._db.execute("SELECT DISTINCT model_version FROM faces").fetchall()
        versions = {r[0] for r in rows}
        if versions - {self.model_version}:
            raise GalleryVersionError(
                f"gallery {self.path} holds faces embedded by model version(s) {sorted(versions)}, "
                f"but the service runs {self.model_version}; re-enrol into a new OAML_DATA_DIR, "
                "or serve the matching weights"
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under a lock (one writer at a time); SQLite failures become
        :class:`GalleryStoreError` (503 ``STORE_UNAVAILABLE``) naming the file."""
        with self._lock:
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
                raise GalleryStoreError(f"cannot write the gallery {self.path}: {exc}", path=str(self.path)) from exc

    def upsert_subject(self, subject: str, name: str | None, metadata: dict[str, Any] | None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO subjects(subject, name, metadata, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(subject) DO UPDATE SET name = COALESCE(excluded.name, subjects.name), "
                "metadata = CASE WHEN ? THEN excluded.metadata ELSE subjects.metadata END",
                (subject, name, json.dumps(metadata or {}), time.time(), metadata is not None),
            )

    def add_faces(self, faces: list[FaceRecord]) -> None:
        with self._tx() as db:
            db.executemany(
                f"INSERT INTO faces({FACE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [face_row(f, self.model_version) for f in faces],
            )

    def delete_subject(self, subject: str) -> list[str]:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
                raise SubjectNotFound(f"subject {subject!r} is not enrolled")
            ids = [r[0] for r in db.execute("SELECT face_id FROM faces WHERE subject = ?", (subject,))]
            db.execute("DELETE FROM faces WHERE subject = ?", (subject,))
            db.execute("DELETE FROM subjects WHERE subject = ?", (subject,))
        return ids

    def delete_face(self, subject: str, face_id: str) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
                raise SubjectNotFound(f"subject {subject!r} is not enrolled")
            if db.execute("DELETE FROM faces WHERE face_id = ? AND subject = ?", (face_id, subject)).rowcount == 0:
                raise FaceNotFound(f"face {face_id!r} does not belong to subject {subject!r}")

    def subject(self, subject: str) -> SubjectRecord:
        row = self._db.execute(
            "SELECT s.subject, s.name, s.metadata, s.created_at, COUNT(f.face_id) FROM subjects s "
            "LEFT JOIN faces f ON f.subject = s.subject WHERE s.subject = ? GROUP BY s.subject",
            (subject,),
        ).fetchone()
        if row is None:
            raise SubjectNotFound(f"subject {subject!r} is not enrolled")
        return SubjectRecord(row[0], row[1], json.loads(row[2]), row[3], row[4])

    def subjects(self, offset: int, limit: int) -> tuple[list[SubjectRecord], int]:
        total = self._db.execute("SELECT COUNT(*) FROM subjects").fetchone()[0]
        rows = self._db.execute(
            "SELECT s.subject, s.name, s.metadata, s.created_at, COUNT(f.face_id) FROM subjects s "
            "LEFT JOIN faces f ON f.subject = s.subject GROUP BY s.subject ORDER BY s.subject LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [SubjectRecord(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows], total

    def _face(self, row: tuple[Any, ...]) -> FaceRecord:
        shape = json.loads(row[5])
        return FaceRecord(
            face_id=row[0],
            subject=row[1],
            embedding=np.frombuffer(row[3], dtype=np.float32).copy(),
            feature_map=np.frombuffer(row[4], dtype=np.float16).reshape(shape).copy(),
            occlusion=np.frombuffer(row[6], dtype=np.float32).reshape(7, 7).copy(),
            norm=row[7],
            quality=row[8],
            detection_score=row[9],
            box=json.loads(row[10]) if row[10] else None,
            crop=row[11],
            created_at=row[12],
        )

    _COLUMNS = (
        "face_id, subject, model_version, embedding, feature_map, fmap_shape, occlusion, "
        "norm, quality, detection_score, box, crop, created_at"
    )

    def faces_of(self, subject: str) -> list[FaceRecord]:
        self.subject(subject)
        rows = self._db.execute(f"SELECT {FACE_COLUMNS} FROM faces WHERE subject = ? ORDER BY created_at", (subject,))
        return [face_from_row(r) for r in rows]

    def face(self, face_id: str) -> FaceRecord:
        row = self._db.execute(f"SELECT {FACE_COLUMNS} FROM faces WHERE face_id = ?", (face_id,)).fetchone()
        if row is None:
            raise FaceNotFound(f"face {face_id!r} is not enrolled")
        return face_from_row(row)

    def iter_faces(self) -> Iterator[FaceRecord]:
        for row in self._db.execute(f"SELECT {FACE_COLUMNS} FROM faces ORDER BY rowid"):
            yield face_from_row(row)

    def close(self) -> None:
        self._db.close()


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
