"""``POST /identify``: who, among the enrolled subjects, is in this photo?"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from service import usecases
from service.problems import ApiError, problem_responses
from service.routes.deps import PHOTO_FORMATS, CollectionDep, MatchRole, StateDep, parse_selection, read_photo
from service.schemas import IdentifyAllResponse, IdentifyResponse

__all__ = ["router"]

router = APIRouter(tags=["match"], dependencies=[MatchRole])


@router.post(
    "/identify",
    response_model=IdentifyResponse | IdentifyAllResponse,
    operation_id="identify",
    responses=problem_responses(400, 404, 413, 415),
)
async def identify(
    state: StateDep,
    collection: CollectionDep,
    image: Annotated[UploadFile, File(description=f"the probe photo ({PHOTO_FORMATS})")],
    top_k: Annotated[int, Form(ge=1, le=100)] = 5,
    threshold: Annotated[
        str | None, Form(description="preset (an FPIR target: lenient 1e-2, balanced 1e-3, strict 1e-4) or a number")
    ] = None,
    face: Annotated[
        str,
        Form(
            description="'largest', 'single', a face index, or 'all': every face of a group photo (largest 32), "
            "each identified, answered as `faces: [...]`"
        ),
    ] = "largest",
    aligned: Annotated[bool, Form()] = False,
) -> IdentifyResponse | IdentifyAllResponse:
    """1:N search: AdaFace cosine shortlist (over every face, or an inverted file's candidates above
    OAML_ANN_MIN_FACES), QAConv re-ranking of it, one row per subject.

    `match` is the best subject when it passes the threshold, set for a stated false-positive identification
    rate at the gallery's current size, else null (an unknown person).
    """
    photo = await read_photo(state, image, "image")
    if face == "all":
        if aligned:
            raise ApiError(
                "VALIDATION_ERROR", "face=all finds the faces of a photo: not with aligned=true", field="face"
            )
        return await usecases.identify_all(state, photo, top_k, threshold, collection)
    select = parse_selection(face, "face")
    return await usecases.identify(state, photo, top_k, threshold, select, aligned, collection)
