"""``POST /identify``: who, among the enrolled subjects, is in this photo?"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from service import usecases
from service.problems import problem_responses
from service.routes.deps import PHOTO_FORMATS, MatchRole, StateDep, parse_selection, read_photo
from service.schemas import IdentifyResponse

__all__ = ["router"]

router = APIRouter(tags=["match"], dependencies=[MatchRole])


@router.post(
    "/identify", response_model=IdentifyResponse, operation_id="identify", responses=problem_responses(400, 413, 415)
)
async def identify(
    state: StateDep,
    image: Annotated[UploadFile, File(description=f"the probe photo ({PHOTO_FORMATS})")],
    top_k: Annotated[int, Form(ge=1, le=100)] = 5,
    threshold: Annotated[str | None, Form()] = None,
    face: Annotated[str, Form()] = "largest",
    aligned: Annotated[bool, Form()] = False,
) -> IdentifyResponse:
    """1:N search: AdaFace cosine shortlist (over every face, or an inverted file's candidates above
    OAML_ANN_MIN_FACES), QAConv re-ranking of it, one row per subject.

    `match` is the best subject when it passes the threshold, else null (an unknown person).
    """
    select = parse_selection(face, "face")
    photo = await read_photo(state, image, "image")
    return await usecases.identify(state, photo, top_k, threshold, select, aligned)
