"""``/gallery``: enrol subjects and their faces, list, inspect and delete them."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile

from service import usecases
from service.problems import ApiError, problem_responses
from service.routes.deps import (
    PHOTO_FORMATS,
    SUBJECT_PATTERN,
    AdminRole,
    CollectionDep,
    StateDep,
    parse_selection,
    read_photo,
)
from service.schemas import (
    DeleteResponse,
    EnrolResponse,
    FacesMove,
    SubjectDetail,
    SubjectMerge,
    SubjectPage,
    SubjectUpdate,
)
from service.store import DEFAULT_COLLECTION

__all__ = ["router"]

router = APIRouter(tags=["gallery"], dependencies=[AdminRole])


#: Subject metadata: at most this many bytes of JSON, nested at most this deep.
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 16
#: An Idempotency-Key: visible ASCII, as the IETF draft on the header suggests, bounded in length.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
#: Largest page offset: far beyond any gallery, far below SQLite's 64-bit integer limit.
MAX_OFFSET = 2**31 - 1


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: a deep document must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    if len(raw.encode()) > MAX_METADATA_BYTES:
        raise ApiError("VALIDATION_ERROR", f"metadata is over {MAX_METADATA_BYTES} bytes", field="metadata")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError("VALIDATION_ERROR", f"metadata is not valid JSON: {exc}", field="metadata") from exc
    except RecursionError as exc:  # nested deeper than the parser's stack: certainly over the depth limit
        raise ApiError(
            "VALIDATION_ERROR", f"metadata is nested deeper than {MAX_METADATA_DEPTH}", field="metadata"
        ) from exc
    if not isinstance(value, dict):
        raise ApiError("VALIDATION_ERROR", "metadata must be a JSON object", field="metadata")
    if _depth(value) > MAX_METADATA_DEPTH:
        raise ApiError("VALIDATION_ERROR", f"metadata is nested deeper than {MAX_METADATA_DEPTH}", field="metadata")
    return value


@router.post(
    "/gallery",
    response_model=EnrolResponse,
    status_code=201,
    operation_id="enrol",
    responses=problem_responses(400, 404, 413, 415),
)
async def enrol(
    state: StateDep,
    response: Response,
    collection: CollectionDep,
    subject: Annotated[str, Form(pattern=SUBJECT_PATTERN, description="subject id: letters, digits, . _ @ : + -")],
    images: Annotated[
        list[UploadFile], File(min_length=1, description=f"one or more photos of the subject ({PHOTO_FORMATS})")
    ],
    name: Annotated[str | None, Form(max_length=256)] = None,
    metadata: Annotated[str | None, Form(description="JSON object stored with the subject")] = None,
    face: Annotated[
        str, Form(description="'single' (reject photos with several faces), 'largest' or an index")
    ] = "single",
    aligned: Annotated[bool, Form()] = False,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description=(
                "any unique string (e.g. a UUID) of at most 255 visible characters: a request repeated with the same "
                "key within 24 hours (a retry after a timeout or a 503) gets the first answer again, with "
                "`Idempotent-Replayed: true`, instead of enrolling the faces twice; the same key on a different "
                "request is 422 IDEMPOTENCY_KEY_REUSED"
            ),
        ),
    ] = None,
) -> EnrolResponse:
    """Enrol every usable face; unusable photos are listed in `rejected` with a reason. The subject and its faces
    are written in one transaction: an error answer means nothing was written."""
    meta = _metadata(metadata)
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise ApiError(
            "VALIDATION_ERROR", "Idempotency-Key must be 1 to 255 visible ASCII characters", field="Idempotency-Key"
        )
    if len(images) > state.settings.max_images_per_request:
        raise ApiError(
            "VALIDATION_ERROR", f"at most {state.settings.max_images_per_request} images per request", field="images"
        )
    select = parse_selection(face, "face")
    photos = [await read_photo(state, upload, f"images[{i}]", collect=True) for i, upload in enumerate(images)]
    done = await usecases.enrol(state, subject, photos, name, meta, select, aligned, idempotency_key, collection)
    if done.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    where = "" if collection == DEFAULT_COLLECTION else f"?collection={collection}"
    response.headers["Location"] = f"/gallery/{subject}{where}"
    return done.response


@router.get("/gallery", response_model=SubjectPage, operation_id="list_subjects", responses=problem_responses(404))
async def list_subjects(
    state: StateDep,
    collection: CollectionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> SubjectPage:
    """Enrolled subjects, ordered by id, a page at a time."""
    return await usecases.list_subjects(state, offset, limit, collection)


@router.get(
    "/gallery/{subject}", response_model=SubjectDetail, operation_id="get_subject", responses=problem_responses(404)
)
async def get_subject(state: StateDep, subject: str, collection: CollectionDep) -> SubjectDetail:
    """One subject and its enrolled faces."""
    return await usecases.get_subject(state, subject, collection)


@router.patch(
    "/gallery/{subject}",
    response_model=SubjectDetail,
    operation_id="update_subject",
    responses=problem_responses(404),
)
async def update_subject(
    state: StateDep, subject: str, update: SubjectUpdate, collection: CollectionDep
) -> SubjectDetail:
    """Change a subject's name or metadata, not its faces: the fields sent are set (`"name": null` clears the
    name; `metadata` replaces the stored object), the others kept."""
    changes = update.model_dump(include=update.model_fields_set)
    if "metadata" in changes:  # null clears it; an object is held to the enrolment form's limits
        changes["metadata"] = _metadata(json.dumps(changes["metadata"])) if changes["metadata"] is not None else {}
    if not changes:
        raise ApiError("VALIDATION_ERROR", "nothing to change: send name and/or metadata", field="body")
    return await usecases.update_subject(state, subject, changes, collection)


@router.delete(
    "/gallery/{subject}", response_model=DeleteResponse, operation_id="delete_subject", responses=problem_responses(404)
)
async def delete_subject(state: StateDep, subject: str, collection: CollectionDep) -> DeleteResponse:
    """Remove a subject and all of its faces."""
    return await usecases.delete_subject(state, subject, collection)


@router.delete(
    "/gallery/{subject}/faces/{face_id}",
    response_model=DeleteResponse,
    operation_id="delete_face",
    responses=problem_responses(404),
)
async def delete_face(state: StateDep, subject: str, face_id: str, collection: CollectionDep) -> DeleteResponse:
    """Remove one face of a subject (the subject stays, even with no faces left)."""
    return await usecases.delete_face(state, subject, face_id, collection)


@router.post(
    "/gallery/{subject}/merge",
    response_model=SubjectDetail,
    operation_id="merge_subjects",
    responses=problem_responses(404),
)
async def merge_subjects(state: StateDep, subject: str, body: SubjectMerge, collection: CollectionDep) -> SubjectDetail:
    """One person enrolled twice: every face of `from` becomes this subject's and `from` is deleted (its name taken
    when this subject has none), in one transaction, on every replica. Answers stored under `from`'s
    Idempotency-Keys are forgotten (a late retry is 422)."""
    return await usecases.merge_subjects(state, subject, body.from_, collection)


@router.post(
    "/gallery/{subject}/faces/move",
    response_model=SubjectDetail,
    operation_id="move_faces",
    responses=problem_responses(404),
)
async def move_faces(state: StateDep, subject: str, body: FacesMove, collection: CollectionDep) -> SubjectDetail:
    """One subject holding two people: the faces named become subject `to`'s (made if new), in one transaction;
    answers the subject that `to` now is."""
    return await usecases.move_faces(state, subject, body.faces, body.to, collection)
