"""``POST /verify``: are two photos the same person?"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from service import usecases
from service.problems import problem_responses
from service.routes.deps import (
    PHOTO_FORMATS,
    CollectionDep,
    MatchRole,
    StateDep,
    pair_request,
    parse_selection,
    read_photo,
)
from service.schemas import SubjectVerifyResponse, VerifyResponse

__all__ = ["router"]

router = APIRouter(tags=["match"], dependencies=[MatchRole])


@router.post(
    "/verify", response_model=VerifyResponse, operation_id="verify", responses=problem_responses(400, 413, 415)
)
async def verify(
    state: StateDep,
    image_a: Annotated[UploadFile, File(description=f"first photo ({PHOTO_FORMATS})")],
    image_b: Annotated[UploadFile, File(description=f"second photo ({PHOTO_FORMATS})")],
    threshold: Annotated[
        str | None, Form(description="finite number (fused score), or preset: lenient, balanced, strict")
    ] = None,
    face_a: Annotated[str, Form(description="'largest', 'single' or a face index")] = "largest",
    face_b: Annotated[str, Form()] = "largest",
    aligned: Annotated[bool, Form(description="inputs are aligned 112x112 crops: skip detection")] = False,
) -> VerifyResponse:
    """1:1 verification of two photos: are they the same person?"""
    return await usecases.verify(state, await pair_request(state, image_a, image_b, threshold, face_a, face_b, aligned))


@router.post(
    "/gallery/{subject}/verify",
    response_model=SubjectVerifyResponse,
    operation_id="verify_subject",
    responses=problem_responses(400, 404, 409, 413, 415),
)
async def verify_subject(
    state: StateDep,
    subject: str,
    collection: CollectionDep,
    image: Annotated[UploadFile, File(description=f"the photo to check ({PHOTO_FORMATS})")],
    threshold: Annotated[
        str | None,
        Form(description="preset (a FAR for the subject: lenient 1e-2, balanced 1e-3, strict 1e-4) or a number"),
    ] = None,
    face: Annotated[str, Form(description="'largest', 'single' or a face index")] = "largest",
    aligned: Annotated[bool, Form(description="the input is an aligned 112x112 crop: skip detection")] = False,
) -> SubjectVerifyResponse:
    """Is this the enrolled subject ("is this Alice?", for a door or a log-in): the photo's face against each of
    the subject's faces, the best deciding, with /verify's answer. A match key may ask; the subject's other
    data stays behind the admin role."""
    select = parse_selection(face, "face")
    photo = await read_photo(state, image, "image")
    return await usecases.verify_subject(state, subject, photo, threshold, select, aligned, collection)
