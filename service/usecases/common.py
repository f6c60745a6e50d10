"""What the use cases share: an uploaded photo, finding its face, the probe gate, a face's description.

A face is described by the model that embedded it (its quality statistics and occlusion attributes): the
default weights' for ``/verify``, a collection's own for what matches against that collection.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from model.align import FaceSelection
from model.errors import (
    FaceIndexError,
    ImageTooLargeError,
    InvalidImageError,
    MultipleFacesError,
    NoFaceError,
    OAMLError,
    UnsupportedImageFormatError,
)
from service import audit
from service.engine import FaceFeatures
from service.models import ServedModel
from service.problems import ApiError
from service.schemas import FaceInfo, OcclusionAttributes, Quality
from service.state import AppState

__all__ = [
    "OCCLUDED_VISIBILITY",
    "OCCLUDED_SHORTLIST_FACTOR",
    "PER_PHOTO_ERRORS",
    "Photo",
    "Heatmap",
    "FoundFace",
    "with_field",
    "find_face",
    "probe_gate",
    "probe_failure",
    "verify_threshold",
    "face_info",
    "crop_jpeg",
    "detection_of",
    "write_audited",
]

T = TypeVar("T")

#: Probes less visible than this get a longer QAConv shortlist: their global cosine is less reliable.
OCCLUDED_VISIBILITY = 0.7
OCCLUDED_SHORTLIST_FACTOR = 3

#: Errors that make one photo unusable (enrolment lists it among the rejected and goes on); any other error
#: (an overloaded queue, an unavailable store) fails the whole request.
PER_PHOTO_ERRORS: tuple[type[OAMLError], ...] = (
    InvalidImageError,
    UnsupportedImageFormatError,
    ImageTooLargeError,
    NoFaceError,
    MultipleFacesError,
    FaceIndexError,
)


@dataclass(frozen=True)
class Photo:
    """One uploaded image: its bytes, or the error that made it unusable (enrolment lists those)."""

    field: str
    data: bytes = b""
    filename: str | None = None
    error: ApiError | None = None


@dataclass(frozen=True)
class Heatmap:
    png: bytes
    visibility: float


@dataclass(frozen=True)
class FoundFace:
    crop: np.ndarray
    detection: dict[str, Any]  # box, landmarks, detection_score (None for aligned input)


def with_field(exc: OAMLError, field: str) -> OAMLError:
    exc.message = f"{field}: {exc.message}"
    exc.details["field"] = field
    return exc


async def find_face(state: AppState, photo: Photo, select: FaceSelection, aligned: bool) -> FoundFace:
    """The aligned crop of one photo's chosen face; domain errors name the photo's field."""
    if photo.error is not None:
        raise photo.error
    engine = state.engine
    try:
        if aligned:
            crop = await engine.aligned_one(photo.data)
            return FoundFace(crop, {"box": None, "landmarks": None, "detection_score": None})
        found = await engine.detect_one(photo.data, select)
    except OAMLError as exc:
        raise with_field(exc, photo.field) from exc
    return FoundFace(found.crop, detection_of(found))


def probe_gate(
    state: AppState, feats: FaceFeatures, detection: dict[str, Any], field: str, model: ServedModel | None = None
) -> None:
    """The optional quality gate for faces to match (OAML_PROBE_MIN_QUALITY, OAML_PROBE_MIN_FACE_SIZE): a face too
    small or too poor says so instead of being matched."""
    reason = probe_failure(state, feats, detection, model)
    if reason is not None:
        raise ApiError(reason[0], f"{field}: {reason[1]}", field=field)


def probe_failure(
    state: AppState, feats: FaceFeatures, detection: dict[str, Any], model: ServedModel | None = None
) -> tuple[str, str] | None:
    """Why a face may not be matched (code, reason), or None; its quality as ``model`` (default: the default
    weights) standardises it."""
    settings = state.settings
    box = detection.get("box")
    if box is not None and settings.probe_min_face_size:
        width = min(box[2] - box[0], box[3] - box[1])
        if width < settings.probe_min_face_size:
            return "FACE_TOO_SMALL", f"face is {width:.0f} px wide, matching needs {settings.probe_min_face_size}"
    if settings.probe_min_quality is not None:
        quality = (model or state.engine.models.default).quality(feats.norm)
        if quality < settings.probe_min_quality:
            return "LOW_QUALITY", f"standardised quality {quality:.2f} is below {settings.probe_min_quality}"
    return None


def verify_threshold(model: ServedModel, value: str | None) -> tuple[float, str | None]:
    """``model``'s 1:1 threshold for a preset or a number (422 naming the field when it is neither)."""
    try:
        return model.resolve_threshold(value)
    except ValueError as exc:
        raise ApiError("VALIDATION_ERROR", str(exc), field="threshold") from exc


def face_info(model: ServedModel, feats: FaceFeatures, detection: dict[str, Any]) -> FaceInfo:
    """A face in an answer, described by the model that embedded it."""
    return FaceInfo(
        **detection,
        quality=Quality(norm=round(feats.norm, 4), standardised=round(model.quality(feats.norm), 4)),
        visibility=round(feats.visibility, 4),
        visibility_map=np.round(feats.occlusion.numpy(), 4).tolist(),
        occlusion=OcclusionAttributes(**model.card.attributes.describe(feats.occlusion.numpy())),
    )


def crop_jpeg(crop: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def detection_of(found: Any) -> dict[str, Any]:
    return {
        "box": [round(v, 1) for v in found.face.box],
        "landmarks": np.round(found.face.landmarks, 1).tolist(),
        "detection_score": round(found.face.score, 4),
    }


async def write_audited(state: AppState, entry: audit.AuditEntry, fn: Callable[..., T], *args: Any) -> T:
    """:func:`service.audit.write` on the service's gallery."""
    return await audit.write(state.gallery, entry, fn, *args)
