"""``POST /explain``: the verify answer with the evidence behind it, as JSON or as one picture."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from service import usecases
from service.problems import problem_responses
from service.routes.deps import PHOTO_FORMATS, MatchRole, StateDep, pair_request
from service.schemas import ExplainResponse

__all__ = ["router"]

router = APIRouter(tags=["match"], dependencies=[MatchRole])

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {}},
        "description": "JSON (ExplainResponse); with format=png, the picture: both aligned crops with their "
        "visibility, the strongest correspondences as lines coloured by similarity, and a caption",
    },
    **problem_responses(400, 413, 415),
}


@router.post("/explain", response_model=ExplainResponse, operation_id="explain", responses=RESPONSES)
async def explain(
    state: StateDep,
    image_a: Annotated[UploadFile, File(description=f"first photo ({PHOTO_FORMATS})")],
    image_b: Annotated[UploadFile, File(description=f"second photo ({PHOTO_FORMATS})")],
    threshold: Annotated[str | None, Form(description="finite number (fused score), or preset")] = None,
    face_a: Annotated[str, Form(description="'largest', 'single' or a face index")] = "largest",
    face_b: Annotated[str, Form()] = "largest",
    aligned: Annotated[bool, Form(description="inputs are aligned 112x112 crops: skip detection")] = False,
    format: Annotated[Literal["json", "png"], Form(description="json (default) or png: the picture alone")] = "json",
    picture: Annotated[bool, Form(description="with json: also embed the picture as a data URL")] = False,
) -> Any:
    """Why two photos match or not: `/verify`'s answer, each face's aligned crop and visibility map, and for
    every location the other face's location it matched, their similarity, its visibility weight and its
    share of the QAConv score (the shares of both faces plus `qaconv_bias` equal `scores.qaconv`)."""
    request = await pair_request(state, image_a, image_b, threshold, face_a, face_b, aligned)
    response, png = await usecases.explain(state, request, picture or format == "png")
    if format == "png" and png is not None:
        return Response(png, media_type="image/png", headers={"X-OAML-Match": str(response.match).lower()})
    return response
