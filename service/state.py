"""Application state owned by the lifespan: engine, store, index, metrics. No module-level globals."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.config import Settings
from service.engine import Engine
from service.errors import SubjectNotFound
from service.index import GalleryIndex
from service.store import FaceRecord, GalleryStore, SQLiteGalleryStore
from service.store_pg import Change, ChangeFollower, PostgresGalleryStore

__all__ = ["Metrics", "AppState", "open_store", "load_index", "apply_changes"]

logger = logging.getLogger(__name__)


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one process)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "oaml_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "oaml_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram(
            "oaml_batch_size",
            "faces per model forward pass",
            registry=self.registry,
            buckets=[b for b in buckets if b <= max_batch],
        )
        self.batch_seconds = Histogram("oaml_batch_seconds", "model time per batch", registry=self.registry)
        self.queue_depth = Gauge("oaml_queue_depth", "faces waiting for the model", registry=self.registry)
        self.gallery_faces = Gauge("oaml_gallery_faces", "enrolled faces", registry=self.registry)
        self.gallery_subjects = Gauge("oaml_gallery_subjects", "enrolled subjects", registry=self.registry)
        self.body_bytes = Counter(
            "oaml_request_body_bytes", "request body bytes read (refused requests stop early)", registry=self.registry
        )

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    store: GalleryStore
    index: GalleryIndex
    metrics: Metrics
    names: dict[str, str | None] = field(default_factory=dict)  # subject -> display name
    enrol_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: bool = False
    follower: ChangeFollower | None = None  # with a shared (PostgreSQL) store: applies other replicas' changes


def open_store(settings: Settings, model_version: str) -> SQLiteGalleryStore | PostgresGalleryStore:
    """The configured store of record: PostgreSQL when ``gallery_url`` is set, else SQLite in ``data_dir``."""
    if settings.gallery_url:
        return PostgresGalleryStore(settings.gallery_url, model_version)
    return SQLiteGalleryStore(settings.data_dir / "gallery.sqlite3", model_version)


def load_index(store: GalleryStore, index: GalleryIndex, engine: Engine, chunk: int = 2048) -> int:
    """Fill the in-memory index from the store, ``chunk`` faces at a time so memory stays bounded; the
    inverted file of a large gallery is trained once, on all of it, at the end."""
    batch: list[FaceRecord] = []
    engine.call_device(index.begin_loading)
    for face in store.iter_faces():
        batch.append(face)
        if len(batch) >= chunk:
            engine.call_device(index.add_records, batch)
            batch = []
    engine.call_device(index.add_records, batch)
    engine.call_device(index.finish_loading)
    return len(index)


def apply_changes(state: AppState, store: PostgresGalleryStore, changes: list[Change]) -> None:
    """Bring this replica's index and subject names up to ``changes`` (other replicas' and its own).

    Idempotent: a face this replica already indexed is not added twice, a face it already removed
    is not removed twice. Faces are read from the store when their ``add`` is applied; one deleted
    since is no longer there, so catching up never resurrects a deletion.
    """
    removed = {c.face_id for c in changes if c.op == "delete" and c.face_id}
    wanted = [c.face_id for c in changes if c.op == "add" and c.face_id and c.face_id not in removed]
    records = store.faces_by_id([fid for fid in wanted if fid not in state.index])
    state.engine.call_device(state.index.remove, sorted(removed))
    state.engine.call_device(state.index.add_records, records)
    for subject in sorted({c.subject for c in changes}):
        try:
            state.names[subject] = store.subject(subject).name
        except SubjectNotFound:
            state.names.pop(subject, None)
