"""Collections: named, isolated galleries, each matched with one model version, and moving them between
versions (:mod:`service.migration`)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from service import audit, hygiene
from service.migration import Migrations, decode_crops
from service.models import ServedModel
from service.problems import ApiError
from service.schemas import (
    CollectionDeleted,
    CollectionInfo,
    CollectionPage,
    IdentityReview,
    ImportResult,
    MigrationStatus,
)
from service.state import AppState
from service.store import CollectionRecord, Enrolment, FaceRecord, new_face_id
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
    "review_identities",
    "export_collection",
    "import_collection",
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
    entry = audit.AuditEntry("collection_create", name, detail={"model_version": gallery.default_version})
    record = await audit.write(gallery, entry, gallery.create_collection, name, gallery.default_version)
    if store_crops is not None:
        update = audit.AuditEntry("collection_update", name, detail={"store_crops": store_crops})
        record = await audit.write(gallery, update, gallery.update_collection, name, {"store_crops": store_crops})
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
    entry = audit.AuditEntry("collection_update", name, detail=dict(changes))
    record = await audit.write(gallery, entry, gallery.update_collection, name, changes)
    return _collection_info(state, record, presets=True)


async def delete_collection(state: AppState, name: str) -> CollectionDeleted:
    record = await state.gallery.read(state.gallery.store.collection, name)
    entry = audit.AuditEntry("collection_delete", name, detail={"subjects": record.subjects})
    ids = await audit.write(state.gallery, entry, state.gallery.delete_collection, name)
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


async def review_identities(state: AppState, name: str, threshold: str | None, limit: int) -> IdentityReview:
    """Suspected duplicates and mixed subjects of a collection (:mod:`service.hygiene`), with its own model and
    ``/identify``'s threshold at its size (a preset, default ``balanced``, or a number in score units)."""
    gallery = state.gallery
    held = await gallery.find(name)
    model = state.engine.model_for(held.version)
    try:
        thr, preset, fpir = model.resolve_identify_threshold(threshold or "balanced", max(len(held.index), 1))
    except ValueError as exc:
        raise ApiError("VALIDATION_ERROR", str(exc), field="threshold") from exc
    report = await asyncio.to_thread(hygiene.review, held, gallery.store, name, model, thr, 20, limit)
    return IdentityReview(
        collection=name,
        model_version=model.version,
        threshold=round(thr, 4),
        threshold_preset=preset,
        fpir=float(f"{fpir:.4g}"),
        **report,
    )


#: What an export file says it is (its first line).
EXPORT_FORMAT = "oaml-collection"
EXPORT_VERSION = 1


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


async def export_collection(state: AppState, name: str) -> AsyncIterator[bytes]:
    """The collection as JSON lines: a header (format, model version, counts), then its subjects (id, name,
    metadata), then its faces (box, quality, embedding, maps and visibility at the collection's version, crop
    when kept), read a page at a time. Recorded in the audit log before the first byte."""
    gallery = state.gallery
    held = await gallery.find(name)
    version = held.version or gallery.default_version
    record = await gallery.read(gallery.store.collection, name)
    entry = audit.AuditEntry("export", name, faces=record.faces, detail={"subjects": record.subjects})
    await audit.write(gallery, entry, gallery.store.append_audit, entry)
    header = {
        "type": "header",
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "collection": name,
        "model_version": version,
        "exported_at": time.time(),
        "subjects": record.subjects,
        "faces": record.faces,
    }

    async def lines() -> AsyncIterator[bytes]:
        yield (json.dumps(header) + "\n").encode()
        offset = 0
        while True:
            page, _ = await gallery.read(gallery.store.subjects, offset, 1000, name)
            for s in page:
                line = {"type": "subject", "subject": s.subject, "name": s.name, "metadata": s.metadata}
                yield (json.dumps({**line, "created_at": s.created_at}) + "\n").encode()
            if len(page) < 1000:
                break
            offset += len(page)
        faces = gallery.store.faces_for(name, version)
        while True:
            batch = await gallery.read(lambda: list(itertools.islice(faces, 256)))
            for f in batch:
                row: dict[str, Any] = {
                    "type": "face",
                    "face_id": f.face_id,
                    "subject": f.subject,
                    "embedding": _b64(f.embedding.astype(np.float32)),
                    "feature_map": _b64(f.feature_map.astype(np.float16)),
                    "fmap_shape": list(f.feature_map.shape),
                    "occlusion": _b64(f.occlusion.astype(np.float32)),
                    "norm": f.norm,
                    "quality": f.quality,
                    "detection_score": f.detection_score,
                    "box": f.box,
                    "created_at": f.created_at,
                    "crop": base64.b64encode(f.crop).decode() if f.crop else None,
                }
                yield (json.dumps(row) + "\n").encode()
            if len(batch) < 256:
                return

    return lines()


async def import_collection(state: AppState, name: str, body: AsyncIterator[bytes]) -> ImportResult:
    """A file of :func:`export_collection` into collection ``name``, new or empty. Faces keep their data when the
    file's model version is the collection's (a new collection takes the file's version when the service has
    its weights); otherwise they are embedded again from their crops by the collection's model, and a file
    whose faces lack crops is refused (409 ``MODEL_VERSION_MISMATCH``). Faces get new ids; all or nothing: a
    failed import leaves no collection behind (one it made) or an empty one."""
    gallery, engine = state.gallery, state.engine
    lines = _lines(body)
    try:
        header = json.loads(await anext(lines))
    except (StopAsyncIteration, ValueError) as exc:
        raise ApiError("VALIDATION_ERROR", "not an export of a collection: no header line", field="body") from exc
    if header.get("format") != EXPORT_FORMAT or header.get("version") != EXPORT_VERSION:
        raise ApiError("VALIDATION_ERROR", f"not an {EXPORT_FORMAT} file of version {EXPORT_VERSION}", field="body")
    source = str(header.get("model_version"))
    made = name not in gallery.collections
    if made:
        version = source if source in engine.models.available() else gallery.default_version
        await asyncio.to_thread(gallery.prepare_version, version)
        entry = audit.AuditEntry("collection_create", name, detail={"model_version": version, "import": True})
        await audit.write(gallery, entry, gallery.create_collection, name, version)
    held = await gallery.find(name)
    if len(held.index) or held.names:
        raise ApiError("COLLECTION_NOT_EMPTY", f"collection {name!r} has faces: import into a new or empty one")
    version = held.version or gallery.default_version
    model = engine.model_for(version)
    entry = audit.AuditEntry("import", name, detail={"from_model_version": source, "model_version": version})
    faces = subjects = embedded = 0
    try:
        pending_subjects: list[Enrolment] = []
        pending_faces: list[tuple[dict[str, Any], FaceRecord | None]] = []

        async def flush() -> None:
            nonlocal faces, embedded
            records = [r for _, r in pending_faces if r is not None]
            bare = [row for row, r in pending_faces if r is None]
            if bare:  # another model's data: embedded again from the crops
                crops = await engine.run_cpu(decode_crops, [base64.b64decode(row["crop"]) for row in bare])
                for row, f in zip(bare, await engine.embed(crops, version), strict=True):
                    records.append(_imported(row, name, model, f))
                embedded += len(bare)
            by_subject: dict[str, list[FaceRecord]] = {}
            for r in records:
                by_subject.setdefault(r.subject, []).append(r)
            batch = [*pending_subjects, *(Enrolment(s, None, None, fs, name) for s, fs in by_subject.items())]
            await gallery.write(gallery.store.enrol_many, batch)
            faces += len(records)
            pending_subjects.clear()
            pending_faces.clear()

        async for line in lines:
            row = json.loads(line)
            if row.get("type") == "subject":
                pending_subjects.append(Enrolment(row["subject"], row.get("name"), row.get("metadata") or {}, [], name))
                subjects += 1
            elif row.get("type") == "face":
                if source == version:
                    pending_faces.append((row, _stored(row, name, version)))
                elif row.get("crop"):
                    pending_faces.append((row, None))
                else:
                    raise ApiError(
                        "MODEL_VERSION_MISMATCH",
                        f"the file's faces are of model {source}, collection {name!r} is matched with {version}, "
                        "and face(s) without a crop cannot be embedded again",
                    )
            if len(pending_faces) + len(pending_subjects) >= 256:
                await flush()
        await flush()
    except BaseException:
        if made:  # all or nothing: the collection this import made goes with it
            await gallery.write(gallery.delete_collection, name)
        raise
    record = await gallery.read(gallery.store.collection, name)
    await gallery.write(gallery._reload, record)
    entry.faces = faces
    entry.detail.update(subjects=subjects, embedded_again=embedded)
    await gallery.write(gallery.store.append_audit, entry)
    return ImportResult(collection=name, model_version=version, subjects=subjects, faces=faces, embedded_again=embedded)


async def _lines(body: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The non-empty lines of a streamed body (bounded memory: a line at a time)."""
    rest = b""
    async for chunk in body:
        rest += chunk
        *done, rest = rest.split(b"\n")
        for line in done:
            if line.strip():
                yield line.decode()
    if rest.strip():
        yield rest.decode()


def _array(text: str, dtype: Any, shape: Any) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).reshape(shape).copy()


def _stored(row: dict[str, Any], collection: str, version: str) -> FaceRecord:
    """A face line as a record, its data as exported (the same model version)."""
    try:
        return FaceRecord(
            face_id=new_face_id(),
            subject=row["subject"],
            embedding=_array(row["embedding"], np.float32, (-1,)),
            feature_map=_array(row["feature_map"], np.float16, row["fmap_shape"]),
            occlusion=_array(row["occlusion"], np.float32, (7, 7)),
            norm=float(row["norm"]),
            quality=float(row["quality"]),
            detection_score=row.get("detection_score"),
            box=row.get("box"),
            created_at=float(row.get("created_at") or time.time()),
            crop=base64.b64decode(row["crop"]) if row.get("crop") else None,
            collection=collection,
            model_version=version,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ApiError("VALIDATION_ERROR", f"a face line of the file is malformed: {exc}", field="body") from exc


def _imported(row: dict[str, Any], collection: str, model: ServedModel, f: Any) -> FaceRecord:
    """A face line embedded again from its crop by ``model``."""
    return FaceRecord(
        face_id=new_face_id(),
        subject=row["subject"],
        embedding=f.embedding.numpy(),
        feature_map=f.feature_map.numpy().astype(np.float16),
        occlusion=f.occlusion.numpy(),
        norm=f.norm,
        quality=model.quality(f.norm),
        detection_score=row.get("detection_score"),
        box=row.get("box"),
        created_at=float(row.get("created_at") or time.time()),
        crop=base64.b64decode(row["crop"]),
        collection=collection,
        model_version=model.version,
    )
