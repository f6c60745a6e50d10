"""``/occlusion``: a face's 7x7 visibility map as a heatmap PNG."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from service import usecases
from service.problems import problem_responses
from service.routes.deps import (
    PHOTO_FORMATS,
    AdminRole,
    CollectionDep,
    MatchRole,
    StateDep,
    parse_selection,
    read_photo,
)

__all__ = ["router"]

router = APIRouter(tags=["occlusion"])

PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "aligned crop with its visibility heatmap and a colour bar"}
}


def _png(heatmap: usecases.Heatmap) -> Response:
    return Response(heatmap.png, media_type="image/png", headers={"X-OAML-Visibility": f"{heatmap.visibility:.4f}"})


@router.get(
    "/occlusion",
    operation_id="occlusion_of_face",
    response_class=Response,
    responses={**PNG, **problem_responses(404)},
    dependencies=[AdminRole],
)
async def occlusion_of_face(
    state: StateDep,
    face_id: Annotated[str, Query(min_length=1)],
    collection: CollectionDep,
    scale: Annotated[int, Query(ge=1, le=8)] = 2,
) -> Response:
    """Heatmap of an enrolled face (1 = visible).

    Without stored crops (`OAML_STORE_CROPS`), the map is drawn on grey.
    """
    return _png(await usecases.heatmap_of_face(state, face_id, scale, collection))


@router.post(
    "/occlusion",
    operation_id="occlusion_of_photo",
    response_class=Response,
    responses={**PNG, **problem_responses(400, 413, 415)},
    dependencies=[MatchRole],
)
async def occlusion_of_photo(
    state: StateDep,
    image: Annotated[UploadFile, File(description=f"a photo ({PHOTO_FORMATS})")],
    face: Annotated[str, Form()] = "largest",
    aligned: Annotated[bool, Form()] = False,
    scale: Annotated[int, Form(ge=1, le=8)] = 2,
) -> Response:
    """Heatmap of the face in an uploaded photo."""
    select = parse_selection(face, "face")
    photo = await read_photo(state, image, "image")
    return _png(await usecases.heatmap_of_photo(state, photo, select, aligned, scale))
