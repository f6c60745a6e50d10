"""The gallery's subjects: enrol (idempotent), list, read, rename, delete a subject or one face.

An enrolment embeds each face with every model version its collection holds (its own; a running migration's
target; the previous one kept for rollback), so a switch of version, either way, finds every face.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.align import FaceSelection
from service import audit
from service.engine import FaceFeatures
from service.errors import IdempotencyKeyReused, QuotaExceeded
from service.models import ServedModel
from service.problems import ApiError
from service.schemas import (
    DeleteResponse,
    EnrolledFace,
    EnrolResponse,
    Quality,
    RejectedImage,
    SubjectDetail,
    SubjectFace,
    SubjectPage,
    SubjectSummary,
)
from service.state import AppState
from service.store import (
    DEFAULT_COLLECTION,
    Enrolment,
    FaceEmbedding,
    FaceRecord,
    StoredAnswer,
    SubjectRecord,
    new_face_id,
)
from service.usecases.common import PER_PHOTO_ERRORS, FoundFace, Photo, crop_jpeg, find_face, write_audited

__all__ = [
    "Enrolled",
    "enrol",
    "list_subjects",
    "get_subject",
    "update_subject",
    "delete_subject",
    "delete_face",
    "merge_subjects",
    "move_faces",
]


@dataclass(frozen=True)
class Enrolled:
    """An enrolment's answer; ``replayed`` when it is the stored answer to an earlier request with its key."""

    response: EnrolResponse
    replayed: bool = False


def _fingerprint(
    subject: str,
    photos: list[Photo],
    name: str | None,
    metadata: dict[str, Any] | None,
    select: FaceSelection,
    aligned: bool,
    collection: str = DEFAULT_COLLECTION,
) -> str:
    """What makes two enrolment requests the same request (an ``Idempotency-Key`` must not answer another)."""
    fields: list[Any] = [subject, name, metadata, select, aligned]
    if collection != DEFAULT_COLLECTION:  # the default's fingerprints stay those stored before collections existed
        fields.append(collection)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for photo in photos:
        digest.update(hashlib.sha256(photo.data).digest())
        digest.update((photo.error.code if photo.error is not None else "").encode())
    return digest.hexdigest()


def _replay(answer: StoredAnswer, request_hash: str) -> Enrolled:
    if answer.request_hash != request_hash:
        raise IdempotencyKeyReused(
            "this Idempotency-Key already answered a different enrolment request; use a new key for a new request"
        )
    if not answer.body:  # the subject was deleted since: a late retry must not enrol it again
        raise IdempotencyKeyReused(
            "the enrolment made with this Idempotency-Key has been deleted since; use a new key to enrol again"
        )
    return Enrolled(EnrolResponse.model_validate_json(answer.body), replayed=True)


async def enrol(
    state: AppState,
    subject: str,
    photos: list[Photo],
    name: str | None,
    metadata: dict[str, Any] | None,
    select: FaceSelection,
    aligned: bool,
    idempotency_key: str | None = None,
    collection: str = DEFAULT_COLLECTION,
) -> Enrolled:
    """Enrol every usable face of ``photos``; list the others in ``rejected`` with a code.

    A face is usable when one was found as ``select`` asks, it is at least ``min_face_size``
    wide and its quality reaches ``min_quality``. The subject and its faces are one transaction,
    durable (committed to the store) before they are searchable (added to the index), and both
    happen before the answer, which is built from what was committed. With an ``idempotency_key``
    the answer is stored in the same transaction, and a request repeating the key gets that answer
    again instead of a second enrolment.
    """
    settings, gallery = state.settings, state.gallery
    target = await gallery.find(collection)  # 404 before any detection for a collection that does not exist
    request_hash = ""
    if idempotency_key is not None:
        request_hash = _fingerprint(subject, photos, name, metadata, select, aligned, collection)
        # keys are each collection's own (a key used in one collection says nothing in another); a space never
        # occurs in a key, so no key of the default collection (stored as sent, as before collections) collides
        idempotency_key = idempotency_key if collection == DEFAULT_COLLECTION else f"{collection} {idempotency_key}"
        earlier = await gallery.read(gallery.store.answer_for, idempotency_key)
        if earlier is not None:
            return _replay(earlier, request_hash)
    await _within_quota(state, len(photos))
    rejected: list[RejectedImage] = []

    def reject(i: int, code: str, reason: str) -> None:
        rejected.append(RejectedImage(image_index=i, filename=photos[i].filename, code=code, reason=reason))

    async def one(i: int) -> tuple[int, FoundFace] | None:
        try:
            face = await find_face(state, photos[i], select, aligned)
        except ApiError as exc:  # the upload itself (type, size, empty)
            reject(i, exc.code, exc.detail)
            return None
        except PER_PHOTO_ERRORS as exc:
            reject(i, exc.code, exc.message)
            return None
        box = face.detection["box"]
        if box is not None and min(box[2] - box[0], box[3] - box[1]) < settings.min_face_size:
            reject(i, "FACE_TOO_SMALL", f"face is {box[2] - box[0]:.0f} px wide, minimum {settings.min_face_size}")
            return None
        return i, face

    found = [r for r in await asyncio.gather(*(one(i) for i in range(len(photos)))) if r is not None]
    # every version the collection holds gets the faces: its own, a migration's target, the previous one kept
    # for rollback (a switch either way then finds them all)
    versions = target.versions_to_write(gallery.default_version)
    crops = np.stack([face.crop for _, face in found]) if found else None
    by_version = [await state.engine.embed(crops, v) if crops is not None else [] for v in versions]
    model = state.engine.model_for(versions[0])
    kept = target.record.store_crops if target.record is not None else None
    store_crops = settings.store_crops if kept is None else kept
    records: list[FaceRecord] = []
    enrolled: list[EnrolledFace] = []
    now = time.time()
    for k, ((i, face), f) in enumerate(zip(found, by_version[0], strict=True)):
        quality = model.quality(f.norm)
        if quality < settings.min_quality:
            reject(i, "LOW_QUALITY", f"standardised quality {quality:.2f} is below {settings.min_quality}")
            continue
        det = face.detection
        record = FaceRecord(
            face_id=new_face_id(),
            subject=subject,
            embedding=f.embedding.numpy(),
            feature_map=f.feature_map.numpy().astype(np.float16),
            occlusion=f.occlusion.numpy(),
            norm=f.norm,
            quality=quality,
            detection_score=det["detection_score"],
            box=det["box"],
            created_at=now,
            crop=crop_jpeg(face.crop) if store_crops else None,
            collection=collection,
            model_version=model.version,
            others=[
                _at(state.engine.model_for(v), other[k]) for v, other in zip(versions[1:], by_version[1:], strict=True)
            ],
        )
        records.append(record)
        enrolled.append(
            EnrolledFace(
                face_id=record.face_id,
                image_index=i,
                filename=photos[i].filename,
                box=det["box"],
                detection_score=det["detection_score"],
                quality=Quality(norm=round(f.norm, 4), standardised=round(quality, 4)),
                visibility=round(f.visibility, 4),
            )
        )
    rejected.sort(key=lambda r: r.image_index)
    if not records:
        raise ApiError("NO_USABLE_FACE", "no image held a usable face", rejected=[r.model_dump() for r in rejected])

    def answer(total: int) -> str:
        """The answer, from what the transaction wrote (runs inside it, holding the gallery's writer lock)."""
        stored_name = name if name is not None else target.names.get(subject)
        return EnrolResponse(
            subject=subject,
            collection=collection,
            name=stored_name,
            faces=enrolled,
            rejected=rejected,
            face_count=total,
            total_faces=total,
        ).model_dump_json()

    entry = audit.AuditEntry("enrol", collection, subject, faces=len(records), detail={"rejected": len(rejected)})
    done = await write_audited(
        state,
        entry,
        gallery.commit,
        Enrolment(subject, name, metadata, records, collection),
        idempotency_key,
        request_hash,
        answer,
    )
    if done.replayed is not None:  # a concurrent request with the same key committed first
        return _replay(done.replayed, request_hash)
    assert done.body is not None
    return Enrolled(EnrolResponse.model_validate_json(done.body))


async def list_subjects(state: AppState, offset: int, limit: int, collection: str = DEFAULT_COLLECTION) -> SubjectPage:
    await state.gallery.find(collection)
    rows, total = await state.gallery.read(state.gallery.store.subjects, offset, limit, collection)
    return SubjectPage(
        collection=collection, subjects=[_summary(r) for r in rows], total=total, offset=offset, limit=limit
    )


async def get_subject(state: AppState, subject: str, collection: str = DEFAULT_COLLECTION) -> SubjectDetail:
    """A subject and its faces, as the collection's model version sees them (quality, visibility)."""
    gallery = state.gallery
    target = await gallery.find(collection)
    version = target.version or gallery.default_version
    record = await gallery.read(gallery.store.subject, subject, collection)
    faces = await gallery.read(gallery.store.faces_of, subject, collection, version)
    return SubjectDetail(
        **_summary(record).model_dump(),
        face_list=[
            SubjectFace(
                face_id=f.face_id,
                quality=Quality(norm=round(f.norm, 4), standardised=round(f.quality, 4)),
                visibility=round(float(f.occlusion.mean()), 4),
                detection_score=f.detection_score,
                box=f.box,
                created_at=f.created_at,
            )
            for f in faces
        ],
    )


def _summary(record: SubjectRecord) -> SubjectSummary:
    return SubjectSummary(
        subject=record.subject,
        collection=record.collection,
        name=record.name,
        metadata=record.metadata,
        face_count=record.faces,
        faces=record.faces,
        created_at=record.created_at,
    )


async def update_subject(
    state: AppState, subject: str, changes: dict[str, Any], collection: str = DEFAULT_COLLECTION
) -> SubjectDetail:
    """Set a subject's name (None clears it) or metadata; the faces are untouched."""
    entry = audit.AuditEntry("update_subject", collection, subject, detail={"fields": sorted(changes)})
    await write_audited(state, entry, state.gallery.update_subject, subject, changes, collection)
    return await get_subject(state, subject, collection)


async def delete_subject(state: AppState, subject: str, collection: str = DEFAULT_COLLECTION) -> DeleteResponse:
    entry = audit.AuditEntry("delete_subject", collection, subject)
    ids = await write_audited(state, entry, state.gallery.delete_subject, subject, collection)
    return DeleteResponse(subject=subject, collection=collection, deleted_faces=ids)


async def delete_face(
    state: AppState, subject: str, face_id: str, collection: str = DEFAULT_COLLECTION
) -> DeleteResponse:
    entry = audit.AuditEntry("delete_face", collection, subject, faces=1, detail={"face_id": face_id})
    await write_audited(state, entry, state.gallery.delete_face, subject, face_id, collection)
    return DeleteResponse(subject=subject, collection=collection, deleted_faces=[face_id])


async def merge_subjects(
    state: AppState, subject: str, source: str, collection: str = DEFAULT_COLLECTION
) -> SubjectDetail:
    """Every face of ``source`` becomes ``subject``'s and ``source`` is deleted (one person enrolled twice)."""
    if source == subject:
        raise ApiError("VALIDATION_ERROR", "a subject cannot be merged into itself", field="from")
    await state.gallery.find(collection)
    entry = audit.AuditEntry("merge_subjects", collection, subject, other_subject=source)
    await write_audited(state, entry, state.gallery.merge_subjects, collection, subject, source)
    return await get_subject(state, subject, collection)


async def move_faces(
    state: AppState, subject: str, face_ids: list[str], to: str, collection: str = DEFAULT_COLLECTION
) -> SubjectDetail:
    """Faces of ``subject`` become ``to``'s (a subject made if new): one subject that held two people."""
    if to == subject:
        raise ApiError("VALIDATION_ERROR", "the faces already belong to that subject", field="to")
    await state.gallery.find(collection)
    entry = audit.AuditEntry("move_faces", collection, subject, other_subject=to, detail={"face_ids": sorted(face_ids)})
    await write_audited(state, entry, state.gallery.move_faces, collection, face_ids, subject, to)
    return await get_subject(state, to, collection)


#: The window of the enrolment quota.
QUOTA_WINDOW_S = 24 * 3600


async def _within_quota(state: AppState, photos: int) -> None:
    """The key's enrolment quota (``OAML_ENROL_FACES_PER_DAY`` faces in 24 hours, counted from the audit log, so
    shared by every replica of a shared store): 429 ``QUOTA_EXCEEDED`` before any detection when these photos
    could pass it. Without API keys there is no quota."""
    limit = state.settings.enrol_faces_per_day
    if not limit or not state.settings.authenticated:
        return
    key = audit.key_id_var.get()
    gallery = state.gallery
    used = await gallery.read(gallery.store.faces_enrolled_since, key, time.time() - QUOTA_WINDOW_S)
    if used + photos > limit:
        raise QuotaExceeded(
            f"this API key enrolled {used} faces in the last 24 hours, of {limit} allowed (OAML_ENROL_FACES_PER_DAY)",
            retry_after=3600,
            limit=limit,
            remaining=max(0, limit - used),
            policy=f"{limit};w={QUOTA_WINDOW_S}",
        )


def _at(model: ServedModel, f: FaceFeatures) -> FaceEmbedding:
    """A face's data at ``model``'s version, as the store keeps it."""
    return FaceEmbedding(
        model_version=model.version,
        embedding=f.embedding.numpy(),
        feature_map=f.feature_map.numpy().astype(np.float16),
        occlusion=f.occlusion.numpy(),
        norm=f.norm,
        quality=model.quality(f.norm),
    )
