"""Wire models: every endpoint returns one of these (never raw dicts of numpy values)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "FaceInfo",
    "Quality",
    "ScoreBreakdown",
    "VerifyResponse",
    "EnrolledFace",
    "RejectedImage",
    "EnrolResponse",
    "SubjectSummary",
    "SubjectFace",
    "SubjectDetail",
    "SubjectPage",
    "DeleteResponse",
    "Candidate",
    "IdentifyResponse",
    "PresetInfo",
    "InfoResponse",
    "HealthResponse",
]


class Quality(BaseModel):
    norm: float = Field(description="AdaFace feature norm (higher = clearer face)")
    standardised: float = Field(description="(norm - training mean) / training std")


class FaceInfo(BaseModel):
    box: list[float] | None = Field(None, description="[x1, y1, x2, y2] in the uploaded photo (null for aligned input)")
    landmarks: list[list[float]] | None = Field(None, description="5 points: eyes, nose, mouth corners")
    detection_score: float | None = None
    quality: Quality
    visibility: float = Field(description="mean of the 7x7 occlusion map (1 = fully visible)")
    visibility_map: list[list[float]] = Field(description="7x7, row-major from the top-left, 1 = visible")


class ScoreBreakdown(BaseModel):
    adaface: float = Field(description="cosine of the AdaFace embeddings")
    qaconv: float = Field(description="occlusion-weighted QAConv logit")
    weights: dict[str, float] = Field(description="effective fusion weights on the standardised scores at this pair's visibility")


class VerifyResponse(BaseModel):
    match: bool
    score: float = Field(description="fused score (a logit)")
    probability: float = Field(description="calibrated probability of the same person")
    threshold: float
    threshold_preset: str | None
    scores: ScoreBreakdown
    face_a: FaceInfo
    face_b: FaceInfo
    model_version: str


class EnrolledFace(BaseModel):
    face_id: str
    image_index: int
    filename: str | None
    box: list[float] | None
    detection_score: float | None
    quality: Quality
    visibility: float


class RejectedImage(BaseModel):
    image_index: int
    filename: str | None
    code: str
    reason: str


class EnrolResponse(BaseModel):
    subject: str
    name: str | None
    faces: list[EnrolledFace]
    rejected: list[RejectedImage]
    total_faces: int


class SubjectSummary(BaseModel):
    subject: str
    name: str | None
    metadata: dict[str, Any]
    faces: int
    created_at: float


class SubjectFace(BaseModel):
    face_id: str
    quality: Quality
    visibility: float
    detection_score: float | None
    box: list[float] | None
    created_at: float


class SubjectDetail(SubjectSummary):
    face_list: list[SubjectFace]


class SubjectPage(BaseModel):
    subjects: list[SubjectSummary]
    total: int
    offset: int
    limit: int


class DeleteResponse(BaseModel):
    subject: str
    deleted_faces: list[str]


class Candidate(BaseModel):
    subject: str
    name: str | None
    face_id: str = Field(description="the subject's best-matching enrolled face")
    score: float
    probability: float
    adaface: float
    qaconv: float
    match: bool


class IdentifyResponse(BaseModel):
    match: Candidate | None = Field(description="best subject above the threshold, or null (unknown person)")
    candidates: list[Candidate]
    threshold: float
    threshold_preset: str | None
    face: FaceInfo
    gallery_faces: int
    timings_ms: dict[str, float]
    model_version: str


class PresetInfo(BaseModel):
    far: float
    threshold: float


class InfoResponse(BaseModel):
    model_version: str
    architecture: str
    device: str
    precision: str
    calibration: str
    presets: dict[str, PresetInfo]
    default_threshold: str
    gallery_subjects: int
    gallery_faces: int
    detector: str
    max_batch: int
    limits: dict[str, int]


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
