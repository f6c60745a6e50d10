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
from service.schemas import CollectionCreate, CollectionDeleted, CollectionInfo, CollectionPage
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
    created = await usecases.create_collection(state, body.name)
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
    """One collection: its sizes and /identify's preset thresholds for its current size."""
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
