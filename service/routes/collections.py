"""``/collections``: named, isolated galleries (a site, a customer, an event), created, listed and deleted.

Every gallery route (``/gallery...``, ``/identify``, ``/occlusion?face_id=``) takes ``?collection=``
(the default collection when none is named), and searches, lists and deletes within it only. Keys
may be limited to some collections (``OAML_API_KEYS``: ``key:role:a+b``); such a key sees only
those, and only a key for every collection may create or delete collections.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from service import usecases
from service.problems import ApiError, problem_responses
from service.routes.deps import AdminRole, CollectionAdmin, StateDep, granted_collections
from service.schemas import (
    CollectionCreate,
    CollectionDeleted,
    CollectionInfo,
    CollectionPage,
    CollectionUpdate,
    IdentityReview,
    ImportResult,
    MigrationRequest,
    MigrationStatus,
)
from service.store import COLLECTION_PATTERN

__all__ = ["router"]

router = APIRouter(tags=["collections"], dependencies=[AdminRole])

CollectionName = Annotated[str, Path(pattern=COLLECTION_PATTERN, description="the collection's name")]


def _may_see(request: Request, name: str) -> None:
    allowed = granted_collections(request)
    if allowed is not None and name not in allowed:
        raise ApiError("FORBIDDEN", f"this API key may not use collection {name!r}")


@router.post(
    "/collections",
    response_model=CollectionInfo,
    status_code=201,
    operation_id="create_collection",
    responses=problem_responses(409),
    dependencies=[CollectionAdmin],
)
async def create_collection(state: StateDep, response: Response, body: CollectionCreate) -> CollectionInfo:
    """Create an empty collection (409 `COLLECTION_EXISTS` if the name is taken)."""
    created = await usecases.create_collection(state, body.name, body.store_crops)
    response.headers["Location"] = f"/collections/{created.name}"
    return created


@router.get("/collections", response_model=CollectionPage, operation_id="list_collections")
async def list_collections(state: StateDep, request: Request) -> CollectionPage:
    """The collections this key may use, by name, with their sizes."""
    return await usecases.list_collections(state, granted_collections(request))


@router.get(
    "/collections/{name}",
    response_model=CollectionInfo,
    operation_id="get_collection",
    responses=problem_responses(404),
)
async def get_collection(state: StateDep, request: Request, name: CollectionName) -> CollectionInfo:
    """One collection: its sizes, model version, migration and /identify's preset thresholds for its size."""
    _may_see(request, name)
    return await usecases.get_collection(state, name)


@router.delete(
    "/collections/{name}",
    response_model=CollectionDeleted,
    operation_id="delete_collection",
    responses=problem_responses(404, 409),
    dependencies=[CollectionAdmin],
)
async def delete_collection(state: StateDep, name: CollectionName) -> CollectionDeleted:
    """Delete a collection with every subject and face in it (erased from the store as a subject's deletion
    is). The default collection cannot be deleted (409 `COLLECTION_PROTECTED`)."""
    return await usecases.delete_collection(state, name)


@router.patch(
    "/collections/{name}",
    response_model=CollectionInfo,
    operation_id="update_collection",
    responses=problem_responses(404),
)
async def update_collection(
    state: StateDep, request: Request, name: CollectionName, body: CollectionUpdate
) -> CollectionInfo:
    """Change a collection's settings: `store_crops` keeps (or stops keeping) the crops of faces enrolled from
    now on, which a later migration re-embeds from."""
    _may_see(request, name)
    return await usecases.update_collection(state, name, body.model_dump(exclude_unset=True))


@router.get(
    "/collections/{name}/migration",
    response_model=MigrationStatus,
    operation_id="migration_status",
    responses=problem_responses(404),
)
async def migration_status(state: StateDep, request: Request, name: CollectionName) -> MigrationStatus:
    """The collection's model version, the previous one kept for rollback, and its migration with its progress
    (faces per second, seconds left) and, once every face is re-embedded, its report."""
    _may_see(request, name)
    return await usecases.migration_status(state, name)


@router.post(
    "/collections/{name}/migration",
    response_model=MigrationStatus,
    status_code=202,
    operation_id="start_migration",
    responses=problem_responses(404, 409),
    dependencies=[CollectionAdmin],
)
async def start_migration(state: StateDep, name: CollectionName, body: MigrationRequest) -> MigrationStatus:
    """Re-embed every face of the collection with model `to`, in the background, from the faces' stored crops;
    matching goes on with the collection's own version until the switch (`switch=false`: a dry run that stops
    with its report). 409 `FACES_WITHOUT_CROPS` lists the subjects whose faces cannot be moved, `MODEL_NOT_AVAILABLE`
    when the service has no weights of `to`, `MIGRATION_CONFLICT` when one runs already."""
    return await usecases.start_migration(state, name, body.to, body.switch, body.missing)


@router.post(
    "/collections/{name}/migration/switch",
    response_model=MigrationStatus,
    operation_id="switch_migration",
    responses=problem_responses(404, 409),
    dependencies=[CollectionAdmin],
)
async def switch_migration(state: StateDep, name: CollectionName) -> MigrationStatus:
    """Switch a migration that is `ready` (a dry run's) now."""
    return await usecases.switch_migration(state, name)


@router.delete(
    "/collections/{name}/migration",
    response_model=MigrationStatus,
    operation_id="cancel_migration",
    responses=problem_responses(404, 409),
    dependencies=[CollectionAdmin],
)
async def cancel_migration(state: StateDep, name: CollectionName) -> MigrationStatus:
    """Stop a migration and erase what it wrote; the collection stays on its version."""
    return await usecases.cancel_migration(state, name)


@router.post(
    "/collections/{name}/rollback",
    response_model=MigrationStatus,
    operation_id="rollback_collection",
    responses=problem_responses(404, 409),
    dependencies=[CollectionAdmin],
)
async def rollback(state: StateDep, name: CollectionName) -> MigrationStatus:
    """Match the collection with its previous model version again (instant: that version's data was kept)."""
    return await usecases.rollback(state, name)


@router.delete(
    "/collections/{name}/previous",
    response_model=MigrationStatus,
    operation_id="drop_previous_version",
    responses=problem_responses(404, 409),
    dependencies=[CollectionAdmin],
)
async def drop_previous(state: StateDep, name: CollectionName) -> MigrationStatus:
    """Erase the previous model version's data of the collection (no rollback after this)."""
    return await usecases.drop_previous(state, name)


@router.get(
    "/collections/{name}/duplicates",
    response_model=IdentityReview,
    operation_id="review_identities",
    responses=problem_responses(404),
)
async def review_identities(
    state: StateDep,
    request: Request,
    name: CollectionName,
    threshold: Annotated[
        str | None, Query(description="a preset (`lenient`, `balanced`, `strict`: /identify's FPIR) or a score")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> IdentityReview:
    """Identity hygiene: pairs of subjects that are probably one person (their faces match across subjects above
    /identify's threshold at this collection's size), and subjects whose own faces do not match each other
    (probably two people). Merge the first (`POST /gallery/{subject}/merge`), split the second (`POST
    /gallery/{subject}/faces/move`)."""
    _may_see(request, name)
    return await usecases.review_identities(state, name, threshold, limit)


@router.get(
    "/collections/{name}/export",
    operation_id="export_collection",
    responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "the collection as JSON lines"},
        **problem_responses(404),
    },
    response_class=StreamingResponse,
)
async def export_collection(state: StateDep, request: Request, name: CollectionName) -> StreamingResponse:
    """The collection as JSON lines, for a backup or another OAML service: a header (format, model version,
    counts), each subject (id, name, metadata), each face (box, quality, embedding, maps and visibility at the
    collection's model version, and its crop when kept). Biometric data: the export is written to the audit log.
    `POST /collections/{name}/import` reads it back."""
    _may_see(request, name)
    lines = await usecases.export_collection(state, name)
    disposition = f'attachment; filename="{name}.oaml.jsonl"'
    return StreamingResponse(lines, media_type="application/x-ndjson", headers={"Content-Disposition": disposition})


@router.post(
    "/collections/{name}/import",
    response_model=ImportResult,
    status_code=201,
    operation_id="import_collection",
    responses=problem_responses(404, 409, 413, 422),
    dependencies=[CollectionAdmin],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def import_collection(state: StateDep, request: Request, name: CollectionName) -> ImportResult:
    """Read an export (`GET /collections/{name}/export`, the body as sent) into collection `name`, new or
    empty. Faces keep their data when the file's model version is the collection's; otherwise they are embedded
    again from their crops, and a file whose faces lack crops gets 409 `MODEL_VERSION_MISMATCH`. All or nothing:
    a failed import leaves the collection as it was. At most `OAML_MAX_IMPORT_MB` (413 beyond)."""
    return await usecases.import_collection(state, name, request.stream())
