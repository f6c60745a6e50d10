"""What every route shares: the app state, the API-key check, reading uploads, parsing form options."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Query, Request, UploadFile

from model.align import ACCEPTED_FORMATS_TEXT, FaceSelection
from service.config import KeyGrant
from service.problems import ApiError
from service.state import AppState
from service.store import COLLECTION_PATTERN, DEFAULT_COLLECTION
from service.usecases import PairRequest, Photo

__all__ = [
    "StateDep",
    "get_state",
    "require_role",
    "MatchRole",
    "AdminRole",
    "CollectionAdmin",
    "CollectionDep",
    "granted_collections",
    "read_photo",
    "pair_request",
    "parse_selection",
    "SUBJECT_PATTERN",
    "PHOTO_FORMATS",
]

SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$"
_ACCEPTED_TYPES = ("image/", "application/octet-stream")
#: Said in every image field's description (OpenAPI): what is decoded, what is refused.
PHOTO_FORMATS = f"{ACCEPTED_FORMATS_TEXT}; any other format is refused with 415 UNSUPPORTED_MEDIA before it is parsed"


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "oaml", None)
    if state is None or not state.ready:
        raise ApiError("NOT_READY", "the service is still loading the model and the gallery")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _grant(request: Request) -> KeyGrant | None:
    """The request's key's grant; None when the service runs without keys."""
    if not request.app.state.settings.api_keys:
        return None
    grant: KeyGrant | None = getattr(request.state, "oaml_grant", None)
    if grant is None:  # the guard did not run (an app mounted without it): refuse rather than assume
        raise ApiError("UNAUTHORIZED", "missing or invalid API key (send X-API-Key)")
    return grant


def require_role(role: str, every_collection: bool = False) -> Callable[[Request], None]:
    """A dependency: the request's key (checked by :class:`service.guard.RequestGuard`) must hold ``role``
    (and, with ``every_collection``, not be limited to some collections: creating and deleting collections).

    ``admin`` holds every role. Without ``OAML_API_KEYS`` there are no keys and no roles to check.
    """

    def check(request: Request) -> None:
        grant = _grant(request)
        if grant is None:
            return
        if grant.role != role and grant.role != "admin":
            raise ApiError("FORBIDDEN", f"this API key has the {grant.role!r} role; {request.url.path} needs {role!r}")
        if every_collection and grant.collections is not None:
            raise ApiError("FORBIDDEN", "this API key is limited to some collections; it cannot create or delete them")

    return check


MatchRole = Depends(require_role("match"))
AdminRole = Depends(require_role("admin"))
CollectionAdmin = Depends(require_role("admin", every_collection=True))


def granted_collections(request: Request) -> frozenset[str] | None:
    """The collections the request's key is limited to; None for every collection."""
    grant = _grant(request)
    return grant.collections if grant is not None else None


def collection_param(
    request: Request,
    collection: Annotated[
        str,
        Query(
            pattern=COLLECTION_PATTERN,
            description=f"the collection (named gallery) to use; {DEFAULT_COLLECTION!r} when none is named",
        ),
    ] = DEFAULT_COLLECTION,
) -> str:
    """The collection a gallery route works in: one the key may use (else 403); whether it exists is the
    gallery's answer (404 ``COLLECTION_NOT_FOUND``)."""
    grant = _grant(request)
    if grant is not None and not grant.may_use(collection):
        raise ApiError("FORBIDDEN", f"this API key may not use collection {collection!r}", field="collection")
    return collection


CollectionDep = Annotated[str, Depends(collection_param)]


def parse_selection(value: str, field: str) -> FaceSelection:
    if value in ("largest", "single"):
        return value  # type: ignore[return-value]
    if re.fullmatch(r"\d{1,3}", value):
        return int(value)
    raise ApiError(
        "VALIDATION_ERROR",
        f"{field} must be 'largest', 'single' or a face index (0 = largest), got {value!r}",
        field=field,
    )


async def read_photo(state: AppState, upload: UploadFile, field: str, collect: bool = False) -> Photo:
    """One uploaded image with media-type and size checks.

    With ``collect`` a bad upload comes back as a :class:`Photo` holding the error (enrolment
    lists it among the rejected images); otherwise the error is raised.
    """
    try:
        ctype = (upload.content_type or "").lower()
        if ctype and not ctype.startswith(_ACCEPTED_TYPES):
            raise ApiError("UNSUPPORTED_MEDIA", f"{field}: {ctype!r} is not an image type", field=field)
        limit = state.settings.max_image_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise ApiError("IMAGE_TOO_LARGE", f"{field}: more than {limit} bytes", field=field, max_bytes=limit)
        if not data:
            raise ApiError("INVALID_IMAGE", f"{field}: empty file", field=field)
    except ApiError as exc:
        if not collect:
            raise
        return Photo(field, filename=upload.filename, error=exc)
    return Photo(field, data, upload.filename)


async def pair_request(
    state: AppState,
    image_a: UploadFile,
    image_b: UploadFile,
    threshold: str | None,
    face_a: str,
    face_b: str,
    aligned: bool,
) -> PairRequest:
    """The form of `/verify` and `/explain`, checked and read."""
    sel_a, sel_b = parse_selection(face_a, "face_a"), parse_selection(face_b, "face_b")
    a, b = await read_photo(state, image_a, "image_a"), await read_photo(state, image_b, "image_b")
    return PairRequest(a, b, threshold, sel_a, sel_b, aligned)
