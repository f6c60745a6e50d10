"""What the service does, one function per use case; the HTTP routes call exactly one of these.

Routes own HTTP (form fields, uploads, status codes); these functions own the decisions: which
face to use, how scores are fused and thresholded, how candidates are ranked, which faces are
good enough to enrol, and what an enrolment answers. Device work goes through the engine's worker
(:meth:`service.engine.Engine.run_device`); decoding, detection and rendering through its CPU pool;
the store through the gallery's own threads (:class:`service.gallery.Gallery`), which keep the
store, the index and the names in step and bound every wait.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from model.align import FaceSelection
from model.calibration import PRESETS
from model.errors import (
    FaceIndexError,
    ImageTooLargeError,
    InvalidImageError,
    MultipleFacesError,
    NoFaceError,
    OAMLError,
    UnsupportedImageFormatError,
)
from model.openset import IDENTIFY_PRESETS, IDENTIFY_PRIOR, posterior
from service.engine import Engine, FaceFeatures
from service.errors import FaceNotFound, IdempotencyKeyReused, SubjectHasNoFaces
from service.gallery import Collection
from service.problems import ApiError
from service.render import explanation_png, heatmap_png
from service.schemas import (
    Candidate,
    CollectionDeleted,
    CollectionInfo,
    CollectionPage,
    Correspondence,
    DeleteResponse,
    EnrolledFace,
    EnrolResponse,
    ExplainResponse,
    FaceEvidence,
    FaceInfo,
    IdentifyAllResponse,
    IdentifyPresetInfo,
    IdentifyResponse,
    OcclusionAttributes,
    Quality,
    RejectedImage,
    ScoreBreakdown,
    SkippedFace,
    SubjectDetail,
    SubjectFace,
    SubjectPage,
    SubjectSummary,
    SubjectVerifyResponse,
    VerifyResponse,
)
from service.state import AppState
from service.store import (
    DEFAULT_COLLECTION,
    CollectionRecord,
    Enrolment,
    FaceRecord,
    StoredAnswer,
    SubjectRecord,
    new_face_id,
)

__all__ = [
    "Photo",
    "PairRequest",
    "Heatmap",
    "Enrolled",
    "PER_PHOTO_ERRORS",
    "verify",
    "explain",
    "enrol",
    "identify",
    "identify_all",
    "verify_subject",
    "list_subjects",
    "get_subject",
    "update_subject",
    "delete_subject",
    "delete_face",
    "heatmap_of_face",
    "heatmap_of_photo",
    "OCCLUDED_VISIBILITY",
    "OCCLUDED_SHORTLIST_FACTOR",
]

#: Probes less visible than this get a longer QAConv shortlist: their global cosine is less reliable.
OCCLUDED_VISIBILITY = 0.7
OCCLUDED_SHORTLIST_FACTOR = 3


@dataclass(frozen=True)
class Photo:
    """One uploaded image: its bytes, or the error that made it unusable (enrolment lists those)."""

    field: str
    data: bytes = b""
    filename: str | None = None
    error: ApiError | None = None


@dataclass(frozen=True)
class Heatmap:
    png: bytes
    visibility: float


@dataclass(frozen=True)
class _Face:
    crop: np.ndarray
    detection: dict[str, Any]  # box, landmarks, detection_score (None for aligned input)


def _with_field(exc: OAMLError, field: str) -> OAMLError:
    exc.message = f"{field}: {exc.message}"
    exc.details["field"] = field
    return exc


async def _find_face(state: AppState, photo: Photo, select: FaceSelection, aligned: bool) -> _Face:
    """The aligned crop of one photo's chosen face; domain errors name the photo's field."""
    if photo.error is not None:
        raise photo.error
    engine = state.engine
    try:
        if aligned:
            crop = await engine.aligned_one(photo.data)
            return _Face(crop, {"box": None, "landmarks": None, "detection_score": None})
        found = await engine.detect_one(photo.data, select)
    except OAMLError as exc:
        raise _with_field(exc, photo.field) from exc
    return _Face(found.crop, _detection_of(found))


def _probe_gate(state: AppState, feats: FaceFeatures, detection: dict[str, Any], field: str) -> None:
    """The optional quality gate for faces to match (OAML_PROBE_MIN_QUALITY, OAML_PROBE_MIN_FACE_SIZE): a face too
    small or too poor says so instead of being matched."""
    reason = _probe_failure(state, feats, detection)
    if reason is not None:
        raise ApiError(reason[0], f"{field}: {reason[1]}", field=field)


def _probe_failure(state: AppState, feats: FaceFeatures, detection: dict[str, Any]) -> tuple[str, str] | None:
    settings = state.settings
    box = detection.get("box")
    if box is not None and settings.probe_min_face_size:
        width = min(box[2] - box[0], box[3] - box[1])
        if width < settings.probe_min_face_size:
            return "FACE_TOO_SMALL", f"face is {width:.0f} px wide, matching needs {settings.probe_min_face_size}"
    if settings.probe_min_quality is not None:
        quality = state.engine.quality(feats.norm)
        if quality < settings.probe_min_quality:
            return "LOW_QUALITY", f"standardised quality {quality:.2f} is below {settings.probe_min_quality}"
    return None


def _threshold(state: AppState, value: str | None) -> tuple[float, str | None]:
    try:
        return state.engine.resolve_threshold(value)
    except ValueError as exc:
        raise ApiError("VALIDATION_ERROR", str(exc), field="threshold") from exc


def _face_info(state: AppState, feats: FaceFeatures, detection: dict[str, Any]) -> FaceInfo:
    return FaceInfo(
        **detection,
        quality=Quality(norm=round(feats.norm, 4), standardised=round(state.engine.quality(feats.norm), 4)),
        visibility=round(feats.visibility, 4),
        visibility_map=np.round(feats.occlusion.numpy(), 4).tolist(),
        occlusion=OcclusionAttributes(**state.engine.card.attributes.describe(feats.occlusion.numpy())),
    )


def _crop_jpeg(crop: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# -- verify ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    """What a verification computed: the answer, and the faces it came from."""

    response: VerifyResponse
    faces: tuple[_Face, _Face]
    features: tuple[FaceFeatures, FaceFeatures]


@dataclass(frozen=True)
class PairRequest:
    """What `/verify` and `/explain` ask: two photos, which face of each, the threshold, aligned or not."""

    a: Photo
    b: Photo
    threshold: str | None = None
    face_a: FaceSelection = "largest"
    face_b: FaceSelection = "largest"
    aligned: bool = False


async def _verify_pair(state: AppState, request: PairRequest) -> _Pair:
    thr, preset = _threshold(state, request.threshold)
    fa_face, fb_face = await asyncio.gather(
        _find_face(state, request.a, request.face_a, request.aligned),
        _find_face(state, request.b, request.face_b, request.aligned),
    )
    engine = state.engine
    fa, fb = await engine.embed(np.stack([fa_face.crop, fb_face.crop]))
    _probe_gate(state, fa, fa_face.detection, request.a.field)
    _probe_gate(state, fb, fb_face.detection, request.b.field)
    s = await engine.run_device(engine.pair_scores, fa, fb)
    cal = engine.calibration
    response = VerifyResponse(
        match=s["fused"] > thr,
        score=round(s["fused"], 5),
        probability=round(s["probability"], 5),
        threshold=round(thr, 5),
        threshold_probability=round(cal.probability_at(thr), 5),
        threshold_preset=preset,
        scores=ScoreBreakdown(
            adaface=round(s["adaface"], 5),
            qaconv=round(s["qaconv"], 5),
            weights={k: round(v, 4) for k, v in cal.weights(s["visibility"]).items()},
        ),
        face_a=_face_info(state, fa, fa_face.detection),
        face_b=_face_info(state, fb, fb_face.detection),
        model_version=engine.model_version,
    )
    return _Pair(response, (fa_face, fb_face), (fa, fb))


async def verify_subject(
    state: AppState,
    subject: str,
    photo: Photo,
    threshold: str | None,
    select: FaceSelection,
    aligned: bool,
    collection: str = DEFAULT_COLLECTION,
) -> SubjectVerifyResponse:
    """1:1 against an enrolled subject ("is this Alice?"): the photo's face against each of the subject's faces,
    the best one decides. A preset keeps its false-accept rate for the subject as a whole: against ``k`` faces
    a stranger has ``k`` chances, so the 1:1 preset's threshold (what /verify uses, and this for one face) is
    raised by what the open-set model says ``k`` chances take. A number stays in score units."""
    engine, gallery = state.engine, state.gallery
    try:
        engine.resolve_threshold(threshold)
    except ValueError as exc:
        raise ApiError("VALIDATION_ERROR", str(exc), field="threshold") from exc
    index = (await gallery.find(collection)).index
    record = await gallery.read(gallery.store.subject, subject, collection)  # 404 for an unknown subject
    faces = await gallery.read(gallery.store.faces_of, subject, collection)
    face = await _find_face(state, photo, select, aligned)
    (feats,) = await engine.embed(face.crop[None])
    _probe_gate(state, feats, face.detection, photo.field)
    s = await engine.run_device(
        index.score_faces, [f.face_id for f in faces], feats.embedding, feats.feature_map, feats.occlusion
    )
    if not s["face_ids"]:
        raise SubjectHasNoFaces(f"subject {subject!r} has no enrolled face to verify against")
    k = len(s["face_ids"])
    cal = engine.calibration
    thr, preset = engine.resolve_threshold(threshold)
    if preset is not None:  # the 1:1 preset's threshold, raised by what k chances instead of one take
        model, far = cal.identify_model, PRESETS[preset]
        thr += model.threshold(far, k) - model.threshold(far, 1)
    else:
        far = cal.identify_model.fpir(thr, k)
    fused = cal.score(s["cosine"], s["qaconv"], np.minimum(s["visibility"], feats.visibility))
    best = int(np.argmax(fused))
    stored = next(f for f in faces if f.face_id == s["face_ids"][best])
    visibility = min(float(s["visibility"][best]), feats.visibility)
    return SubjectVerifyResponse(
        match=bool(fused[best] > thr),
        score=round(float(fused[best]), 5),
        probability=round(float(cal.probability(fused[best])), 5),
        threshold=round(thr, 5),
        threshold_probability=round(cal.probability_at(thr), 5),
        threshold_preset=preset,
        far=float(f"{far:.4g}"),
        scores=ScoreBreakdown(
            adaface=round(float(s["cosine"][best]), 5),
            qaconv=round(float(s["qaconv"][best]), 5),
            weights={key: round(v, 4) for key, v in cal.weights(visibility).items()},
        ),
        face_a=_face_info(state, feats, face.detection),
        face_b=FaceInfo(
            box=stored.box,
            landmarks=None,
            detection_score=stored.detection_score,
            quality=Quality(norm=round(stored.norm, 4), standardised=round(stored.quality, 4)),
            visibility=round(float(stored.occlusion.mean()), 4),
            visibility_map=np.round(stored.occlusion, 4).tolist(),
            occlusion=OcclusionAttributes(**engine.card.attributes.describe(stored.occlusion)),
        ),
        subject=subject,
        collection=collection,
        name=record.name,
        face_id=stored.face_id,
        faces_compared=k,
        model_version=engine.model_version,
    )


async def verify(state: AppState, request: PairRequest) -> VerifyResponse:
    """1:1: one face from each photo, fused score against the threshold."""
    return (await _verify_pair(state, request)).response


#: Lines drawn in the explanation picture: the probe locations that contribute most.
EXPLAIN_LINES = 12


async def explain(state: AppState, request: PairRequest, picture: bool) -> tuple[ExplainResponse, bytes | None]:
    """The verify answer and its evidence: crops, visibility maps, QAConv's correspondences and their shares.

    Returns the response and, when ``picture`` is asked for, the explanation PNG (also embedded in the
    response as a data URL).
    """
    pair = await _verify_pair(state, request)
    fa, fb = pair.features
    engine = state.engine
    why = await engine.run_device(engine.explain_pair, fa, fb)
    evidence = [
        _evidence(pair.faces[0].crop, fa, why.probe_match, why.probe_similarity, why.probe_weight, why.probe_shares),
        _evidence(
            pair.faces[1].crop, fb, why.gallery_match, why.gallery_similarity, why.gallery_weight, why.gallery_shares
        ),
    ]
    png = None
    if picture:
        r = pair.response
        strongest = np.argsort(-why.probe_shares.numpy())[:EXPLAIN_LINES]
        lines = [(int(s), int(why.probe_match[s]), float(why.probe_similarity[s])) for s in strongest]
        caption = [
            f"{'MATCH' if r.match else 'NO MATCH'}: fused score {r.score:.2f} vs threshold {r.threshold:.2f}"
            f" ({r.threshold_preset or 'custom'})",
            f"probability {r.probability:.3f} (a match needs more than {r.threshold_probability:.3f})",
            f"AdaFace cosine {r.scores.adaface:.3f}; QAConv {r.scores.qaconv:.2f}; visibility "
            f"{r.face_a.visibility:.2f} / {r.face_b.visibility:.2f}; lines: the {len(lines)} strongest local matches",
        ]
        png = await engine.run_cpu(
            explanation_png,
            pair.faces[0].crop,
            pair.faces[1].crop,
            fa.occlusion.numpy(),
            fb.occlusion.numpy(),
            lines,
            caption,
        )
    response = ExplainResponse(
        **pair.response.model_dump(),
        qaconv_bias=round(why.bias, 6),
        evidence_a=evidence[0],
        evidence_b=evidence[1],
        picture=("data:image/png;base64," + base64.b64encode(png).decode()) if png is not None else None,
    )
    return response, png


def _evidence(
    crop: np.ndarray, feats: FaceFeatures, match: Any, similarity: Any, weight: Any, shares: Any
) -> FaceEvidence:
    return FaceEvidence(
        crop="data:image/jpeg;base64," + base64.b64encode(_crop_jpeg(crop)).decode(),
        visibility_map=np.round(feats.occlusion.numpy(), 4).tolist(),
        correspondences=[
            Correspondence(
                location=i,
                match=int(match[i]),
                similarity=float(similarity[i]),
                weight=float(weight[i]),
                share=float(shares[i]),
            )
            for i in range(len(shares))
        ],
    )


# -- gallery ---------------------------------------------------------------------------------


#: Errors that make one photo unusable (enrolment lists it among the rejected and goes on); any other error
#: (an overloaded queue, an unavailable store) fails the whole request.
PER_PHOTO_ERRORS: tuple[type[OAMLError], ...] = (
    InvalidImageError,
    UnsupportedImageFormatError,
    ImageTooLargeError,
    NoFaceError,
    MultipleFacesError,
    FaceIndexError,
)


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
    rejected: list[RejectedImage] = []

    def reject(i: int, code: str, reason: str) -> None:
        rejected.append(RejectedImage(image_index=i, filename=photos[i].filename, code=code, reason=reason))

    async def one(i: int) -> tuple[int, _Face] | None:
        try:
            face = await _find_face(state, photos[i], select, aligned)
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
    feats = await state.engine.embed(np.stack([face.crop for _, face in found])) if found else []
    records: list[FaceRecord] = []
    enrolled: list[EnrolledFace] = []
    now = time.time()
    for (i, face), f in zip(found, feats, strict=True):
        quality = state.engine.quality(f.norm)
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
            crop=_crop_jpeg(face.crop) if settings.store_crops else None,
            collection=collection,
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

    done = await gallery.write(
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
    gallery = state.gallery
    await gallery.find(collection)
    record = await gallery.read(gallery.store.subject, subject, collection)
    faces = await gallery.read(gallery.store.faces_of, subject, collection)
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
    await state.gallery.write(state.gallery.update_subject, subject, changes, collection)
    return await get_subject(state, subject, collection)


async def delete_subject(state: AppState, subject: str, collection: str = DEFAULT_COLLECTION) -> DeleteResponse:
    ids = await state.gallery.write(state.gallery.delete_subject, subject, collection)
    return DeleteResponse(subject=subject, collection=collection, deleted_faces=ids)


async def delete_face(
    state: AppState, subject: str, face_id: str, collection: str = DEFAULT_COLLECTION
) -> DeleteResponse:
    await state.gallery.write(state.gallery.delete_face, subject, face_id, collection)
    return DeleteResponse(subject=subject, collection=collection, deleted_faces=[face_id])


# -- collections -----------------------------------------------------------------------------


def _collection_info(state: AppState, record: CollectionRecord, presets: bool = False) -> CollectionInfo:
    info = CollectionInfo(
        name=record.name, created_at=record.created_at, subject_count=record.subjects, face_count=record.faces
    )
    if presets:
        held = state.gallery.collections.get(record.name)
        info.identify_presets = identify_presets(state.engine, len(held.index) if held is not None else record.faces)
    return info


async def create_collection(state: AppState, name: str) -> CollectionInfo:
    record = await state.gallery.write(state.gallery.create_collection, name)
    return _collection_info(state, record, presets=True)


async def list_collections(state: AppState, allowed: frozenset[str] | None) -> CollectionPage:
    """Every collection (those in ``allowed`` only, for a key limited to some)."""
    records = await state.gallery.read(state.gallery.store.collections)
    shown = [_collection_info(state, r) for r in records if allowed is None or r.name in allowed]
    return CollectionPage(collections=shown, total=len(shown))


async def get_collection(state: AppState, name: str) -> CollectionInfo:
    record = await state.gallery.read(state.gallery.store.collection, name)
    return _collection_info(state, record, presets=True)


async def delete_collection(state: AppState, name: str) -> CollectionDeleted:
    record = await state.gallery.read(state.gallery.store.collection, name)
    ids = await state.gallery.write(state.gallery.delete_collection, name)
    return CollectionDeleted(name=name, deleted_subjects=record.subjects, deleted_faces=len(ids))


# -- identify --------------------------------------------------------------------------------


async def identify(
    state: AppState,
    photo: Photo,
    top_k: int,
    threshold: str | None,
    select: FaceSelection,
    aligned: bool,
    collection: str = DEFAULT_COLLECTION,
) -> IdentifyResponse:
    """1:N, open-set: cosine shortlist (exact, or an inverted file above OAML_ANN_MIN_FACES), QAConv re-ranking
    of it, fusion, one row per subject; the best passes if it clears a threshold set for a stated false-positive
    identification rate at the gallery's current size (:mod:`model.openset`)."""
    _check_identify_threshold(state, threshold, await state.gallery.find(collection))
    face = await _find_face(state, photo, select, aligned)
    (feats,) = await state.engine.embed(face.crop[None])
    _probe_gate(state, feats, face.detection, photo.field)
    return await _identify_face(state, feats, face.detection, top_k, threshold, collection)


#: The most faces of one group photo that `/identify` with ``face=all`` identifies (the largest first).
MAX_GROUP_FACES = 32


async def identify_all(
    state: AppState, photo: Photo, top_k: int, threshold: str | None, collection: str = DEFAULT_COLLECTION
) -> IdentifyAllResponse:
    """Every face of a group photo, each identified as :func:`identify` does one (largest first, at most
    :data:`MAX_GROUP_FACES`), with its box."""
    _check_identify_threshold(state, threshold, await state.gallery.find(collection))
    if photo.error is not None:
        raise photo.error
    try:
        # only these are refined and aligned, each holding a place in the queue (never more than it has)
        limit = min(MAX_GROUP_FACES, state.settings.queue_size)
        used, found = await state.engine.detect_all(photo.data, limit)
    except OAMLError as exc:
        raise _with_field(exc, photo.field) from exc
    if not used:
        raise _with_field(NoFaceError("no face found in the image"), photo.field)
    feats = await state.engine.embed(np.stack([f.crop for f in used]))
    results, skipped = [], []
    for face, f in zip(used, feats, strict=True):
        detection = _detection_of(face)
        failure = _probe_failure(state, f, detection)
        if failure is None:
            results.append(await _identify_face(state, f, detection, top_k, threshold, collection))
        else:
            skipped.append(SkippedFace(box=detection["box"], code=failure[0], reason=failure[1]))
    return IdentifyAllResponse(
        faces=results,
        skipped=skipped,
        faces_found=found,
        faces_identified=len(results),
        collection=collection,
        model_version=state.engine.model_version,
    )


def _detection_of(found: Any) -> dict[str, Any]:
    return {
        "box": [round(v, 1) for v in found.face.box],
        "landmarks": np.round(found.face.landmarks, 1).tolist(),
        "detection_score": round(found.face.score, 4),
    }


def identify_presets(engine: Engine, faces: int) -> dict[str, IdentifyPresetInfo]:
    """/identify's presets with their thresholds for a collection of ``faces`` faces."""
    model = engine.calibration.identify_model
    return {
        name: IdentifyPresetInfo(fpir=fpir, threshold=round(model.threshold(fpir, max(faces, 1)), 5))
        for name, fpir in IDENTIFY_PRESETS.items()
    }


def _check_identify_threshold(state: AppState, threshold: str | None, searched: Collection) -> None:
    """A bad threshold is refused before any work (the decision then uses the size the search saw)."""
    try:
        state.engine.resolve_identify_threshold(threshold, len(searched.index))
    except ValueError as exc:
        raise ApiError("VALIDATION_ERROR", str(exc), field="threshold") from exc


async def _identify_face(
    state: AppState,
    feats: FaceFeatures,
    detection: dict[str, Any],
    top_k: int,
    threshold: str | None,
    collection: str,
) -> IdentifyResponse:
    """Search one collection for one embedded face and decide (see :func:`identify`)."""
    engine = state.engine
    searched = await state.gallery.find(collection)
    factor = OCCLUDED_SHORTLIST_FACTOR if feats.visibility < OCCLUDED_VISIBILITY else 1
    t0 = time.perf_counter()
    found = await engine.run_device(
        searched.index.search, feats.embedding, feats.feature_map, feats.occlusion, state.settings.shortlist * factor
    )
    faces, subjects = found["gallery_faces"], max(len(searched.names), 1)
    thr, preset, fpir = engine.resolve_identify_threshold(threshold, faces)
    cal = engine.calibration
    fused = cal.score(found["cosine"], found["qaconv"], np.minimum(found["visibility"], feats.visibility))
    best: dict[str, int] = {}
    for i, subject in enumerate(found["subjects"]):
        if subject not in best or fused[i] > fused[best[subject]]:
            best[subject] = i
    ranked = sorted(best.items(), key=lambda kv: -fused[kv[1]])
    # a subject's evidence for the posterior is the mean likelihood ratio over all its enrolled faces (those not
    # shortlisted count as ~0): the best of k faces would make a stranger look k times likelier to be someone
    # enrolled more often
    evidence = {s: np.logaddexp.reduce(fused[[i for i, x in enumerate(found["subjects"]) if x == s]]) for s in best}
    log_lr = np.array([evidence[s] - np.log(max(found["subject_faces"].get(s, 1), 1)) for s, _ in ranked])
    probs, unknown = posterior(log_lr, subjects)
    candidates = [
        Candidate(
            subject=s,
            name=searched.names.get(s),
            face_id=found["face_ids"][i],
            score=round(float(fused[i]), 5),
            probability=round(float(p), 5),
            scores=ScoreBreakdown(
                adaface=round(float(found["cosine"][i]), 5),
                qaconv=round(float(found["qaconv"][i]), 5),
                weights={
                    k: round(v, 4) for k, v in cal.weights(min(float(found["visibility"][i]), feats.visibility)).items()
                },
            ),
            adaface=round(float(found["cosine"][i]), 5),
            qaconv=round(float(found["qaconv"][i]), 5),
            match=bool(fused[i] > thr),
        )
        for (s, i), p in zip(ranked[:top_k], probs[:top_k], strict=True)
    ]
    timings = {k: round(v, 3) for k, v in found["ms"].items()}
    timings["matching"] = round(1000 * (time.perf_counter() - t0), 3)
    return IdentifyResponse(
        match=candidates[0] if candidates and candidates[0].match else None,
        candidates=candidates,
        threshold=round(thr, 5),
        threshold_preset=preset,
        fpir=float(f"{fpir:.4g}"),
        threshold_probability=round(float(posterior(np.array([thr]), subjects)[0][0]), 5),
        probability_unknown=round(unknown, 5),
        probability_prior=IDENTIFY_PRIOR,
        face=_face_info(state, feats, detection),
        collection=collection,
        gallery_faces=faces,
        gallery_subjects=len(searched.names),
        timings_ms=timings,
        model_version=engine.model_version,
    )


# -- occlusion heatmaps ----------------------------------------------------------------------


async def heatmap_of_face(state: AppState, face_id: str, scale: int, collection: str = DEFAULT_COLLECTION) -> Heatmap:
    """An enrolled face's visibility map (over its crop when crops are stored, else over grey); a face of
    another collection is not found (a key limited to one collection sees no other's faces)."""
    record = await state.gallery.read(state.gallery.store.face, face_id)
    if record.collection != collection:
        raise FaceNotFound(f"face {face_id!r} is not enrolled in collection {collection!r}")
    crop = np.asarray(Image.open(io.BytesIO(record.crop), formats=["JPEG"]).convert("RGB")) if record.crop else None
    png = await state.engine.run_cpu(heatmap_png, crop, record.occlusion, scale)
    return Heatmap(png, float(record.occlusion.mean()))


async def heatmap_of_photo(state: AppState, photo: Photo, select: FaceSelection, aligned: bool, scale: int) -> Heatmap:
    face = await _find_face(state, photo, select, aligned)
    (feats,) = await state.engine.embed(face.crop[None])
    png = await state.engine.run_cpu(heatmap_png, face.crop, feats.occlusion.numpy(), scale)
    return Heatmap(png, feats.visibility)
