"""Collections: named, isolated galleries, each matched with one model version, and moving them between
versions (:mod:`service.migration`)."""

from __future__ import annotations

from typing import Any

from service.migration import Migrations
from service.schemas import CollectionDeleted, CollectionInfo, CollectionPage, MigrationStatus
from service.state import AppState
from service.store import CollectionRecord
from service.usecases.identify import identify_presets

__all__ = [
    "create_collection",
    "list_collections",
    "get_collection",
    "update_collection",
    "delete_collection",
    "migration_status",
    "start_migration",
    "switch_migration",
    "cancel_migration",
    "rollback",
    "drop_previous",
]


def _migrations(state: AppState) -> Migrations:
    assert state.migrations is not None  # made with the state, at start-up
    return state.migrations


def _collection_info(state: AppState, record: CollectionRecord, presets: bool = False) -> CollectionInfo:
    gallery = state.gallery
    migration = record.migration or {}
    info = CollectionInfo(
        name=record.name,
        created_at=record.created_at,
        subject_count=record.subjects,
        face_count=record.faces,
        model_version=record.model_version or gallery.default_version,
        previous_version=record.previous_version,
        migration=(
            {k: migration.get(k) for k in ("to", "state", "faces", "done", "without_crops")} if migration else None
        ),
        store_crops=record.store_crops if record.store_crops is not None else state.settings.store_crops,
    )
    if presets:
        held = gallery.collections.get(record.name)
        model = state.engine.model_for(record.model_version)
        info.identify_presets = identify_presets(model, len(held.index) if held is not None else record.faces)
    return info


async def create_collection(state: AppState, name: str, store_crops: bool | None = None) -> CollectionInfo:
    """A new collection, matched with the default weights (and keeping crops, or not, as asked)."""
    gallery = state.gallery
    record = await gallery.write(gallery.create_collection, name, gallery.default_version)
    if store_crops is not None:
        record = await gallery.write(gallery.update_collection, name, {"store_crops": store_crops})
    return _collection_info(state, record, presets=True)


async def list_collections(state: AppState, allowed: frozenset[str] | None) -> CollectionPage:
    """Every collection (those in ``allowed`` only, for a key limited to some)."""
    records = await state.gallery.read(state.gallery.store.collections)
    shown = [_collection_info(state, r) for r in records if allowed is None or r.name in allowed]
    return CollectionPage(collections=shown, total=len(shown))


async def get_collection(state: AppState, name: str) -> CollectionInfo:
    record = await state.gallery.read(state.gallery.store.collection, name)
    return _collection_info(state, record, presets=True)


async def update_collection(state: AppState, name: str, changes: dict[str, Any]) -> CollectionInfo:
    """Change a collection's settings (``store_crops``: keep its faces' crops from now on, or not)."""
    gallery = state.gallery
    await gallery.find(name)
    record = await gallery.write(gallery.update_collection, name, changes)
    return _collection_info(state, record, presets=True)


async def delete_collection(state: AppState, name: str) -> CollectionDeleted:
    record = await state.gallery.read(state.gallery.store.collection, name)
    ids = await state.gallery.write(state.gallery.delete_collection, name)
    return CollectionDeleted(name=name, deleted_subjects=record.subjects, deleted_faces=len(ids))


async def migration_status(state: AppState, name: str) -> MigrationStatus:
    await state.gallery.find(name)
    return MigrationStatus(**_migrations(state).status(name))


async def start_migration(state: AppState, name: str, to: str, switch: bool, missing: str) -> MigrationStatus:
    return MigrationStatus(**await _migrations(state).start(name, to, switch, missing))


async def switch_migration(state: AppState, name: str) -> MigrationStatus:
    return MigrationStatus(**await _migrations(state).switch(name))


async def cancel_migration(state: AppState, name: str) -> MigrationStatus:
    return MigrationStatus(**await _migrations(state).cancel(name))


async def rollback(state: AppState, name: str) -> MigrationStatus:
    return MigrationStatus(**await _migrations(state).rollback(name))


async def drop_previous(state: AppState, name: str) -> MigrationStatus:
    return MigrationStatus(**await _migrations(state).drop_previous(name))
