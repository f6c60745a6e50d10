"""Application state owned by the lifespan: engine, gallery (store, index, names), metrics. No module-level globals."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.config import Settings
from service.engine import Engine
from service.gallery import Gallery
from service.migration import Migrations
from service.store import SQLiteGalleryStore
from service.store_pg import ChangeFollower, PostgresGalleryStore

__all__ = ["Metrics", "AppState", "open_store"]

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
        self.gallery_faces = Gauge("oaml_gallery_faces", "enrolled faces (every collection)", registry=self.registry)
        self.gallery_subjects = Gauge(
            "oaml_gallery_subjects", "enrolled subjects (every collection)", registry=self.registry
        )
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
    gallery: Gallery
    metrics: Metrics
    ready: bool = False
    follower: ChangeFollower | None = None  # with a shared (PostgreSQL) store: applies other replicas' changes
    migrations: Migrations | None = None  # collections moving between model versions


def open_store(settings: Settings, model_version: str) -> SQLiteGalleryStore | PostgresGalleryStore:
    """The configured store of record: PostgreSQL when ``gallery_url`` is set, else SQLite in ``data_dir``."""
    if settings.gallery_url:
        return PostgresGalleryStore(settings.gallery_url, model_version, timeout_s=settings.store_timeout_s)
    return SQLiteGalleryStore(settings.data_dir / "gallery.sqlite3", model_version, timeout_s=settings.store_timeout_s)
