"""``/collections``: named, isolated galleries (a site, a customer, an event), created, listed and deleted.

Every gallery route (``/gallery...``, ``/identify``, ``/occlusion?face_id=``) takes ``?collection=``
(the default collection when none is named), and searches, lists and deletes within it only. Keys
may be limited to some collections (``OAML_API_KEYS``: ``key:role:a+b``); such a key sees only
those, and only a key for every collection may create or delete collections.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from service import usecases
from service.problems import ApiError, problem_responses
from service.routes.deps import AdminRole, CollectionAdmin, StateDep, granted_collections
from service.schemas import (
    CollectionCreate,
    CollectionDeleted,
    CollectionInfo,
    CollectionPage,
    CollectionUpdate,
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
