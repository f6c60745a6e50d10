"""A Python client for the OAML service: one method per route, typed answers, retries, typed errors.

It needs only ``httpx`` (``pip install '.[client]'`` in a checkout) and imports nothing of the server (no torch,
numpy or FastAPI), so it runs wherever the service's callers do::

    from oaml.client import OAMLClient

    with OAMLClient("http://127.0.0.1:8000", api_key="...") as oaml:
        oaml.enrol("alice", "alice.jpg", name="Alice")
        found = oaml.identify("door-camera.jpg")
        print(found.match.subject if found.match else "unknown", found.fpir)

:class:`AsyncOAMLClient` has the same methods, as coroutines.

**Images** are given as bytes, a path (``str`` or :class:`os.PathLike`) or a binary file object; each is read
once, before the first attempt, so a retry sends the same bytes.

**Retries.** ``retries`` (default 3) more attempts after the first, with exponential backoff and jitter
(``backoff`` seconds, doubled per attempt, each delay drawn between half and all of it, at most
``max_backoff``), on:

- 503 (``OVERLOADED``, ``NOT_READY``, ``STORE_UNAVAILABLE``...) and 429 answers, waiting at least their
  ``Retry-After``; a ``Retry-After`` longer than ``max_backoff`` is not waited for: the error is raised;
- connection errors before the request was sent (refused, DNS, connect timeout), for every request;
- connection errors after it was sent (a reset, a read timeout) for idempotent requests only: reads,
  ``PATCH``, ``DELETE``, the enrolment (below), and the matching ``POST`` routes (``/verify``, ``/explain``,
  ``/identify``, ``/gallery/{subject}/verify``, ``POST /occlusion``), which change nothing on the server and
  are safe to send twice. Creating a collection and the migration actions are not retried then: the error is
  raised, and :meth:`OAMLClient.get_collection` / :meth:`OAMLClient.migration_status` say what happened.

**Idempotent enrolment.** :meth:`OAMLClient.enrol` sends an ``Idempotency-Key`` (a new UUID4 unless one is
given) and the same key on every retry: when an answer is lost after the service committed the enrolment, the
retry gets the stored answer (``EnrolResponse.replayed`` is true) instead of enrolling the faces twice. The
service keeps keys 24 hours; the same key on a different request is 422 ``IDEMPOTENCY_KEY_REUSED``.

**Errors.** Every error answer raises an :class:`OAMLAPIError` subclass chosen by its problem+json ``code``
(e.g. :class:`NoFace`, :class:`SubjectNotFound`, :class:`Overloaded`), else by its status (:class:`NotFound`,
:class:`Conflict`, :class:`ValidationFailed`, :class:`Unavailable`...); each carries ``status``, ``code``,
``detail``, ``field`` and the whole ``body`` (``rejected`` for ``NO_USABLE_FACE``). An error body that is not
problem+json (a proxy's page) raises with its text as ``detail``. A connection that fails after the retries
raises :class:`OAMLConnectionError`.

**Answers** are frozen dataclasses mirroring the service's response models (``tests/test_client.py`` holds
them to the service's OpenAPI document); each keeps the whole JSON object in ``raw``, so fields added by a
newer service are there, never refused.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import mimetypes
import os
import random
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import IO, Any, ClassVar, Generic, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints
from urllib.parse import quote

import httpx

__all__ = [
    "OAMLClient",
    "AsyncOAMLClient",
    "OPERATIONS",
    "ImageInput",
    # answers
    "Quality",
    "OcclusionAttributes",
    "FaceInfo",
    "ScoreBreakdown",
    "VerifyResponse",
    "Correspondence",
    "FaceEvidence",
    "ExplainResponse",
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
    "SkippedFace",
    "IdentifyAllResponse",
    "SubjectVerifyResponse",
    "PresetInfo",
    "IdentifyPresetInfo",
    "GallerySearchInfo",
    "SelfCheckInfo",
    "BackbonePathInfo",
    "InfoResponse",
    "HealthResponse",
    "ReadyResponse",
    "CollectionInfo",
    "CollectionPage",
    "CollectionDeleted",
    "MigrationStatus",
    "DuplicatePair",
    "MixedSubject",
    "IdentityReview",
    "AuditEntryInfo",
    "AuditPage",
    "ImportResult",
    # errors
    "OAMLError",
    "OAMLConnectionError",
    "OAMLAPIError",
    "BadRequest",
    "InvalidImage",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "SubjectNotFound",
    "FaceNotFound",
    "CollectionNotFound",
    "MethodNotAllowed",
    "RequestTimeout",
    "Conflict",
    "PayloadTooLarge",
    "ImageTooLarge",
    "UnsupportedMedia",
    "ValidationFailed",
    "NoFace",
    "MultipleFaces",
    "FaceIndexOutOfRange",
    "NoUsableFace",
    "LowQuality",
    "FaceTooSmall",
    "IdempotencyKeyReused",
    "RateLimited",
    "QuotaExceeded",
    "ModelVersionMismatch",
    "ServerError",
    "Unavailable",
    "Overloaded",
    "NotReady",
    "StoreUnavailable",
    "StoreReadOnly",
    "error_from_response",
]

T = TypeVar("T")
M = TypeVar("M", bound="Model")

#: An image: its bytes, a path to it, or a binary file object open on it.
ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]

DEFAULT_TIMEOUT = 60.0
USER_AGENT = "oaml-client/1"


# --------------------------------------------------------------------------------------------------- answers


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _convert(tp: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses built, lists and dicts walked, ints made floats."""
    if value is None:
        return None
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if origin is list:
        (item,) = get_args(tp)
        return [_convert(item, v) for v in value] if isinstance(value, list) else value
    if origin is dict:
        _, item = get_args(tp)
        return {k: _convert(item, v) for k, v in value.items()} if isinstance(value, dict) else value
    if isinstance(tp, type) and is_dataclass(tp) and issubclass(tp, Model):
        return tp.from_json(value) if isinstance(value, dict) else value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True, kw_only=True)
class Model:
    """An answer of the service: its documented fields, and the whole JSON object in ``raw`` (fields a newer
    service added are kept there). A field the service did not send is its default, or None."""

    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    #: The fields built from the answer (all but ``raw`` and those the client adds).
    _client_fields: ClassVar[frozenset[str]] = frozenset({"raw"})

    @classmethod
    def from_json(cls: type[M], data: Mapping[str, Any]) -> M:
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in cls._client_fields:
                continue
            if f.name in data:
                values[f.name] = _convert(hints[f.name], data[f.name])
            elif f.default is MISSING and f.default_factory is MISSING:  # required, yet not sent (an older service)
                values[f.name] = None
        return cls(raw=dict(data), **values)


@dataclass(frozen=True, kw_only=True)
class Quality(Model):
    norm: float
    standardised: float


@dataclass(frozen=True, kw_only=True)
class OcclusionAttributes(Model):
    regions: dict[str, float]
    occluded: dict[str, bool]
    mask_like: bool
    glasses_like: bool


@dataclass(frozen=True, kw_only=True)
class FaceInfo(Model):
    quality: Quality
    visibility: float
    visibility_map: list[list[float]]
    box: list[float] | None = None
    landmarks: list[list[float]] | None = None
    detection_score: float | None = None
    occlusion: OcclusionAttributes | None = None


@dataclass(frozen=True, kw_only=True)
class ScoreBreakdown(Model):
    adaface: float
    qaconv: float
    weights: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class VerifyResponse(Model):
    match: bool
    score: float
    probability: float
    threshold: float
    threshold_probability: float
    threshold_preset: str | None
    scores: ScoreBreakdown
    face_a: FaceInfo
    face_b: FaceInfo
    model_version: str


@dataclass(frozen=True, kw_only=True)
class Correspondence(Model):
    location: int
    match: int
    similarity: float
    weight: float
    share: float


@dataclass(frozen=True, kw_only=True)
class FaceEvidence(Model):
    crop: str
    visibility_map: list[list[float]]
    correspondences: list[Correspondence]


@dataclass(frozen=True, kw_only=True)
class ExplainResponse(VerifyResponse):
    qaconv_bias: float
    evidence_a: FaceEvidence
    evidence_b: FaceEvidence
    picture: str | None = None


@dataclass(frozen=True, kw_only=True)
class EnrolledFace(Model):
    face_id: str
    image_index: int
    filename: str | None
    box: list[float] | None
    detection_score: float | None
    quality: Quality
    visibility: float


@dataclass(frozen=True, kw_only=True)
class RejectedImage(Model):
    image_index: int
    filename: str | None
    code: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class EnrolResponse(Model):
    subject: str
    name: str | None
    faces: list[EnrolledFace]
    rejected: list[RejectedImage]
    face_count: int
    total_faces: int
    collection: str = "default"
    #: The answer was stored by an earlier request with the same ``Idempotency-Key`` (``Idempotent-Replayed``).
    replayed: bool = False
    #: The ``Idempotency-Key`` sent.
    idempotency_key: str | None = None

    _client_fields: ClassVar[frozenset[str]] = frozenset({"raw", "replayed", "idempotency_key"})


@dataclass(frozen=True, kw_only=True)
class SubjectSummary(Model):
    subject: str
    name: str | None
    metadata: dict[str, Any]
    face_count: int
    faces: int
    created_at: float
    collection: str = "default"


@dataclass(frozen=True, kw_only=True)
class SubjectFace(Model):
    face_id: str
    quality: Quality
    visibility: float
    detection_score: float | None
    box: list[float] | None
    created_at: float


@dataclass(frozen=True, kw_only=True)
class SubjectDetail(SubjectSummary):
    face_list: list[SubjectFace]


@dataclass(frozen=True, kw_only=True)
class SubjectPage(Model):
    subjects: list[SubjectSummary]
    total: int
    offset: int
    limit: int
    collection: str = "default"


@dataclass(frozen=True, kw_only=True)
class DeleteResponse(Model):
    subject: str
    deleted_faces: list[str]
    collection: str = "default"


@dataclass(frozen=True, kw_only=True)
class Candidate(Model):
    subject: str
    name: str | None
    face_id: str
    score: float
    probability: float
    scores: ScoreBreakdown
    adaface: float
    qaconv: float
    match: bool


@dataclass(frozen=True, kw_only=True)
class IdentifyResponse(Model):
    match: Candidate | None
    candidates: list[Candidate]
    threshold: float
    threshold_preset: str | None
    fpir: float
    threshold_probability: float
    probability_unknown: float
    probability_prior: float
    face: FaceInfo
    gallery_faces: int
    gallery_subjects: int
    timings_ms: dict[str, float]
    model_version: str
    collection: str = "default"


@dataclass(frozen=True, kw_only=True)
class SkippedFace(Model):
    box: list[float] | None
    code: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class IdentifyAllResponse(Model):
    faces: list[IdentifyResponse]
    faces_found: int
    faces_identified: int
    model_version: str
    skipped: list[SkippedFace] = field(default_factory=list)
    collection: str = "default"


@dataclass(frozen=True, kw_only=True)
class SubjectVerifyResponse(VerifyResponse):
    far: float
    subject: str
    name: str | None
    face_id: str
    faces_compared: int
    collection: str = "default"


@dataclass(frozen=True, kw_only=True)
class PresetInfo(Model):
    far: float
    threshold: float
    probability: float
    lfw_tar: float | None = None
    lfw_far: float | None = None


@dataclass(frozen=True, kw_only=True)
class IdentifyPresetInfo(Model):
    fpir: float
    threshold: float


@dataclass(frozen=True, kw_only=True)
class GallerySearchInfo(Model):
    method: str
    shortlist: int
    ann_min_faces: int
    ann_lists: int | None
    ann_probe: int
    map_storage: str = "native"  # `int8` or `native`; services older than OAML_MAP_STORAGE kept native maps


@dataclass(frozen=True, kw_only=True)
class SelfCheckInfo(Model):
    path: str
    min_cosine: float
    max_score_drift: float
    faces: int
    pairs: int
    seconds: float
    passes: bool
    bounds: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class BackbonePathInfo(Model):
    cpu_class: str
    served: str
    vouched_on: list[str]
    self_check: SelfCheckInfo | None
    fallbacks: list[str]
    forced: bool


@dataclass(frozen=True, kw_only=True)
class InfoResponse(Model):
    model_version: str
    architecture: str
    device: str
    precision: str
    engine: str
    backbone_path: BackbonePathInfo
    calibration: str
    presets: dict[str, PresetInfo]
    probability_prior: float
    identify_presets: dict[str, IdentifyPresetInfo] | None
    identify_model: str
    identify_prior: float
    flip_test: bool
    default_threshold: str
    gallery_subjects: int | None
    gallery_faces: int | None
    collections: int | None
    gallery_store: str
    gallery_search: GallerySearchInfo
    gallery_writable: bool
    detector: str
    detector_passes: str
    detector_backend: str
    max_batch: int
    limits: dict[str, int]
    image_formats: list[str]
    gallery_sync: dict[str, int | bool] | None = None


@dataclass(frozen=True, kw_only=True)
class HealthResponse(Model):
    status: str
    detail: str | None = None


@dataclass(frozen=True, kw_only=True)
class ReadyResponse(HealthResponse):
    gallery_writable: bool


@dataclass(frozen=True, kw_only=True)
class CollectionInfo(Model):
    name: str
    created_at: float
    subject_count: int
    face_count: int
    model_version: str
    store_crops: bool
    previous_version: str | None = None
    migration: dict[str, Any] | None = None
    identify_presets: dict[str, IdentifyPresetInfo] | None = None


@dataclass(frozen=True, kw_only=True)
class CollectionPage(Model):
    collections: list[CollectionInfo]
    total: int


@dataclass(frozen=True, kw_only=True)
class CollectionDeleted(Model):
    name: str
    deleted_subjects: int
    deleted_faces: int


@dataclass(frozen=True, kw_only=True)
class MigrationStatus(Model):
    collection: str
    model_version: str
    previous_version: str | None
    switched_at: float | None
    migration: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class DuplicatePair(Model):
    subjects: list[str]
    score: float
    faces: list[str]


@dataclass(frozen=True, kw_only=True)
class MixedSubject(Model):
    subject: str
    faces: int
    lowest_score: float
    pair: list[str]


@dataclass(frozen=True, kw_only=True)
class IdentityReview(Model):
    collection: str
    model_version: str
    threshold: float
    threshold_preset: str | None
    fpir: float
    faces: int
    probes: int
    duplicates: list[DuplicatePair]
    duplicates_found: int
    mixed: list[MixedSubject]
    mixed_found: int
    mixed_subjects_checked: int
    mixed_threshold: float


@dataclass(frozen=True, kw_only=True)
class AuditEntryInfo(Model):
    seq: int
    at: float
    key_id: str
    action: str
    collection: str | None
    subject: str | None
    other_subject: str | None
    faces: int
    outcome: str
    detail: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class AuditPage(Model):
    entries: list[AuditEntryInfo]
    next: int | None


@dataclass(frozen=True, kw_only=True)
class ImportResult(Model):
    collection: str
    model_version: str
    subjects: int
    faces: int
    embedded_again: int


# ---------------------------------------------------------------------------------------------------- errors


class OAMLError(Exception):
    """Anything this client raises for a request that did not get its answer."""


class OAMLConnectionError(OAMLError):
    """The service could not be reached, or the connection failed, after the retries (the cause is httpx's)."""


class OAMLAPIError(OAMLError):
    """An error answer: ``status``, the problem+json ``code``, ``detail`` and ``field``, and the whole ``body``
    (a dict for problem+json, else the text)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        field: str | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.field, self.body = status, code, detail, field, body
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def rejected(self) -> list[RejectedImage]:
        """The photos the service rejected, each with its code and reason (``NO_USABLE_FACE``)."""
        items = self.body.get("rejected") if isinstance(self.body, dict) else None
        return [RejectedImage.from_json(r) for r in items or [] if isinstance(r, dict)]

    @property
    def retry_after(self) -> float | None:
        """Seconds the service asked to wait (``Retry-After``), if it said."""
        return _retry_after(self.headers.get("retry-after"))


class BadRequest(OAMLAPIError):
    """400."""


class InvalidImage(BadRequest):
    """400 ``INVALID_IMAGE``: not a decodable image."""


class Unauthorized(OAMLAPIError):
    """401: no key, or an unknown one."""


class Forbidden(OAMLAPIError):
    """403: the key's role or collections do not allow this."""


class NotFound(OAMLAPIError):
    """404."""


class SubjectNotFound(NotFound):
    """404 ``SUBJECT_NOT_FOUND``."""


class FaceNotFound(NotFound):
    """404 ``FACE_NOT_FOUND``."""


class CollectionNotFound(NotFound):
    """404 ``COLLECTION_NOT_FOUND``."""


class MethodNotAllowed(OAMLAPIError):
    """405."""


class RequestTimeout(OAMLAPIError):
    """408: the request body arrived too slowly."""


class Conflict(OAMLAPIError):
    """409: ``COLLECTION_EXISTS``, ``SUBJECT_HAS_NO_FACES``, ``MIGRATION_CONFLICT``, ``FACES_WITHOUT_CROPS``..."""


class ModelVersionMismatch(Conflict):
    """409 ``MODEL_VERSION_MISMATCH``: an import of another model's faces without the crops to embed them."""


class PayloadTooLarge(OAMLAPIError):
    """413."""


class ImageTooLarge(PayloadTooLarge):
    """413 ``IMAGE_TOO_LARGE``: one image's bytes or pixels."""


class UnsupportedMedia(OAMLAPIError):
    """415: not an image type, or a format the service does not decode."""


class ValidationFailed(OAMLAPIError):
    """422: the request was understood but cannot be done (``VALIDATION_ERROR``, and the face codes below)."""


class NoFace(ValidationFailed):
    """422 ``NO_FACE``."""


class MultipleFaces(ValidationFailed):
    """422 ``MULTIPLE_FACES``."""


class FaceIndexOutOfRange(ValidationFailed):
    """422 ``FACE_INDEX_OUT_OF_RANGE``."""


class NoUsableFace(ValidationFailed):
    """422 ``NO_USABLE_FACE``: an enrolment where no photo held a usable face (see ``rejected``)."""


class LowQuality(ValidationFailed):
    """422 ``LOW_QUALITY``."""


class FaceTooSmall(ValidationFailed):
    """422 ``FACE_TOO_SMALL``."""


class IdempotencyKeyReused(ValidationFailed):
    """422 ``IDEMPOTENCY_KEY_REUSED``: the key answered a different request (or its subject was deleted)."""


class RateLimited(OAMLAPIError):
    """429 ``RATE_LIMITED``: the key's requests per second (``OAML_RATE_LIMITS``), or a proxy's limit."""


class QuotaExceeded(RateLimited):
    """429 ``QUOTA_EXCEEDED``: the key enrolled its faces of the day (``OAML_ENROL_FACES_PER_DAY``);
    ``retry_after`` says when the day turns."""


class ServerError(OAMLAPIError):
    """500 and other 5xx but 503."""


class Unavailable(OAMLAPIError):
    """503: try again later (``retry_after``)."""


class Overloaded(Unavailable):
    """503 ``OVERLOADED``: the inference queue or the decoding budget is full."""


class NotReady(Unavailable):
    """503 ``NOT_READY``: the service is loading."""


class StoreUnavailable(Unavailable):
    """503 ``STORE_UNAVAILABLE``."""


class StoreReadOnly(Unavailable):
    """503 ``STORE_READ_ONLY``: matching is served, writes are refused."""


_BY_CODE: dict[str, type[OAMLAPIError]] = {
    "INVALID_IMAGE": InvalidImage,
    "SUBJECT_NOT_FOUND": SubjectNotFound,
    "FACE_NOT_FOUND": FaceNotFound,
    "COLLECTION_NOT_FOUND": CollectionNotFound,
    "IMAGE_TOO_LARGE": ImageTooLarge,
    "NO_FACE": NoFace,
    "MULTIPLE_FACES": MultipleFaces,
    "FACE_INDEX_OUT_OF_RANGE": FaceIndexOutOfRange,
    "NO_USABLE_FACE": NoUsableFace,
    "LOW_QUALITY": LowQuality,
    "FACE_TOO_SMALL": FaceTooSmall,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
    "OVERLOADED": Overloaded,
    "NOT_READY": NotReady,
    "STORE_UNAVAILABLE": StoreUnavailable,
    "STORE_READ_ONLY": StoreReadOnly,
    "QUOTA_EXCEEDED": QuotaExceeded,
    "MODEL_VERSION_MISMATCH": ModelVersionMismatch,
    "COLLECTION_NOT_EMPTY": Conflict,
}
_BY_STATUS: dict[int, type[OAMLAPIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: ValidationFailed,
    429: RateLimited,
    503: Unavailable,
}
_STATUS_CODES = {401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 429: "RATE_LIMITED", 503: "UNAVAILABLE"}


def error_from_response(response: httpx.Response) -> OAMLAPIError:
    """The exception for an error answer: by its problem+json ``code``, else by its status."""
    status = response.status_code
    body: Any = response.text
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        body = parsed
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        code, detail = body["code"], str(body.get("detail", ""))
        where = body.get("field")
        field_name = where if isinstance(where, str) else None
    else:  # not problem+json: a proxy's page, a load balancer's text
        code = _STATUS_CODES.get(status, f"HTTP_{status}")
        text = body if isinstance(body, str) else json.dumps(body)
        detail, field_name = text.strip()[:2000] or response.reason_phrase, None
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else OAMLAPIError)
    return cls(status, code, detail, field_name, body, response.headers)


# ------------------------------------------------------------------------------------------------- requests


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_image(image: ImageInput, default_name: str) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of an image given as bytes, a path or a binary file object."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return default_name, bytes(image), "application/octet-stream"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), _content_type(path.name)
    data = image.read()
    if not isinstance(data, bytes):
        raise TypeError("an image file object must be opened in binary mode")
    name = Path(str(getattr(image, "name", "") or default_name)).name
    return name, data, _content_type(name)


def _content_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name)
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


def _seg(value: str) -> str:
    """A path segment, percent-encoded (subject ids may hold ``@``, ``:`` and ``+``)."""
    return quote(value, safe="")


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _form(**values: Any) -> dict[str, str]:
    """Form fields, None ones left out (the service's default applies)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = _flag(value) if isinstance(value, bool) else str(value)
    return out


def _params(collection: str | None, **values: Any) -> dict[str, str]:
    return _form(collection=collection, **values)


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.from_json(response.json())


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _text(response: httpx.Response) -> str:
    return response.text


#: What an export is written to: a path (created or truncated) or a binary file object (left open).
Destination = str | os.PathLike[str] | IO[bytes]
#: What an import reads: the export's bytes, a path, or a binary file object.
Source = bytes | str | os.PathLike[str] | IO[bytes]
_CHUNK = 1 << 20


class _Sink:
    """The destination of a download: a path opened (and closed) here, or the caller's file object."""

    def __init__(self, destination: Destination) -> None:
        self._own = isinstance(destination, (str, os.PathLike))
        if isinstance(destination, (str, os.PathLike)):
            self.file: IO[bytes] = open(destination, "wb")  # noqa: SIM115  # closed by close()
        else:
            self.file = destination
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.written += len(chunk)

    def close(self) -> None:
        if self._own:
            self.file.close()


def _chunks(source: Source) -> Iterator[bytes]:
    """An import's body, a megabyte at a time (a file is never read whole)."""
    if isinstance(source, bytes):
        yield source
        return
    file: IO[bytes] = open(source, "rb") if isinstance(source, (str, os.PathLike)) else source  # noqa: SIM115
    try:
        while chunk := file.read(_CHUNK):
            yield chunk
    finally:
        if file is not source:
            file.close()


async def _achunks(source: Source) -> AsyncIterator[bytes]:
    """:func:`_chunks` for the async client, each read in a worker thread."""
    chunks = _chunks(source)
    while chunk := await asyncio.to_thread(next, chunks, b""):
        yield chunk


_UNSET: Any = object()


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request, as both clients send it."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    #: A raw body (bytes or an iterator of them: an import read from a file as it is sent).
    content: Any = None
    #: Safe to send again after a connection error that may have come after the service got it.
    idempotent: bool = True
    #: Retried at all (``ready()`` is not: a loading service answers 503 and that is the answer).
    retry: bool = True


class _Routes:
    """Builds each route's request; :class:`OAMLClient` and :class:`AsyncOAMLClient` send them."""

    @staticmethod
    def verify(
        image_a: ImageInput,
        image_b: ImageInput,
        threshold: str | float | None,
        face_a: str | int,
        face_b: str | int,
        aligned: bool,
    ) -> _Call[VerifyResponse]:
        return _Call(
            "POST",
            "/verify",
            _model(VerifyResponse),
            data=_form(threshold=threshold, face_a=face_a, face_b=face_b, aligned=aligned),
            files=[("image_a", _read_image(image_a, "image_a")), ("image_b", _read_image(image_b, "image_b"))],
        )

    @staticmethod
    def explain(
        image_a: ImageInput,
        image_b: ImageInput,
        threshold: str | float | None,
        face_a: str | int,
        face_b: str | int,
        aligned: bool,
        fmt: Literal["json", "png"],
        picture: bool,
    ) -> _Call[Any]:
        parse: Callable[[httpx.Response], Any] = _bytes if fmt == "png" else _model(ExplainResponse)
        return _Call(
            "POST",
            "/explain",
            parse,
            data=_form(threshold=threshold, face_a=face_a, face_b=face_b, aligned=aligned, format=fmt, picture=picture),
            files=[("image_a", _read_image(image_a, "image_a")), ("image_b", _read_image(image_b, "image_b"))],
        )

    @staticmethod
    def enrol(
        subject: str,
        images: ImageInput | Sequence[ImageInput],
        name: str | None,
        metadata: Mapping[str, Any] | None,
        face: str | int,
        aligned: bool,
        collection: str | None,
        idempotency_key: str | None,
    ) -> _Call[EnrolResponse]:
        many: list[ImageInput]
        if isinstance(images, (bytes, bytearray, memoryview, str)) or not isinstance(images, Sequence):
            many = [images]
        else:
            many = list(cast("Sequence[ImageInput]", images))
        if not many:
            raise ValueError("enrol needs at least one image")
        key = idempotency_key or str(uuid.uuid4())

        def parse(response: httpx.Response) -> EnrolResponse:
            answer = EnrolResponse.from_json(response.json())
            replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
            return replace(answer, replayed=replayed, idempotency_key=key)

        return _Call(
            "POST",
            "/gallery",
            parse,
            params=_params(collection),
            data=_form(
                subject=subject,
                name=name,
                metadata=json.dumps(dict(metadata)) if metadata is not None else None,
                face=face,
                aligned=aligned,
            ),
            files=[("images", _read_image(img, f"image{i}")) for i, img in enumerate(many)],
            headers={"Idempotency-Key": key},
            idempotent=True,  # the key makes a repeat answer the first answer, never a second enrolment
        )

    @staticmethod
    def list_subjects(offset: int, limit: int, collection: str | None) -> _Call[SubjectPage]:
        return _Call("GET", "/gallery", _model(SubjectPage), params=_params(collection, offset=offset, limit=limit))

    @staticmethod
    def get_subject(subject: str, collection: str | None) -> _Call[SubjectDetail]:
        return _Call("GET", f"/gallery/{_seg(subject)}", _model(SubjectDetail), params=_params(collection))

    @staticmethod
    def update_subject(subject: str, name: Any, metadata: Any, collection: str | None) -> _Call[SubjectDetail]:
        body: dict[str, Any] = {}
        if name is not _UNSET:
            body["name"] = name
        if metadata is not _UNSET:
            body["metadata"] = dict(metadata) if metadata is not None else None
        if not body:
            raise ValueError("update_subject: give name and/or metadata")
        return _Call("PATCH", f"/gallery/{_seg(subject)}", _model(SubjectDetail), params=_params(collection), json=body)

    @staticmethod
    def delete_subject(subject: str, collection: str | None) -> _Call[DeleteResponse]:
        return _Call("DELETE", f"/gallery/{_seg(subject)}", _model(DeleteResponse), params=_params(collection))

    @staticmethod
    def delete_face(subject: str, face_id: str, collection: str | None) -> _Call[DeleteResponse]:
        path = f"/gallery/{_seg(subject)}/faces/{_seg(face_id)}"
        return _Call("DELETE", path, _model(DeleteResponse), params=_params(collection))

    @staticmethod
    def verify_subject(
        subject: str,
        image: ImageInput,
        threshold: str | float | None,
        face: str | int,
        aligned: bool,
        collection: str | None,
    ) -> _Call[SubjectVerifyResponse]:
        return _Call(
            "POST",
            f"/gallery/{_seg(subject)}/verify",
            _model(SubjectVerifyResponse),
            params=_params(collection),
            data=_form(threshold=threshold, face=face, aligned=aligned),
            files=[("image", _read_image(image, "image"))],
        )

    @staticmethod
    def identify(
        image: ImageInput,
        top_k: int,
        threshold: str | float | None,
        face: str | int,
        aligned: bool,
        collection: str | None,
    ) -> _Call[Any]:
        parse: Callable[[httpx.Response], Any] = (
            _model(IdentifyAllResponse) if face == "all" else _model(IdentifyResponse)
        )
        return _Call(
            "POST",
            "/identify",
            parse,
            params=_params(collection),
            data=_form(top_k=top_k, threshold=threshold, face=face, aligned=aligned),
            files=[("image", _read_image(image, "image"))],
        )

    @staticmethod
    def heatmap(image: ImageInput, face: str | int, aligned: bool, scale: int) -> _Call[bytes]:
        return _Call(
            "POST",
            "/occlusion",
            _bytes,
            data=_form(face=face, aligned=aligned, scale=scale),
            files=[("image", _read_image(image, "image"))],
        )

    @staticmethod
    def heatmap_of_face(face_id: str, scale: int, collection: str | None) -> _Call[bytes]:
        return _Call("GET", "/occlusion", _bytes, params=_params(collection, face_id=face_id, scale=scale))

    @staticmethod
    def create_collection(name: str, store_crops: bool | None) -> _Call[CollectionInfo]:
        body: dict[str, Any] = {"name": name}
        if store_crops is not None:
            body["store_crops"] = store_crops
        return _Call("POST", "/collections", _model(CollectionInfo), json=body, idempotent=False)

    @staticmethod
    def update_collection(name: str, store_crops: bool | None) -> _Call[CollectionInfo]:
        return _Call("PATCH", f"/collections/{_seg(name)}", _model(CollectionInfo), json={"store_crops": store_crops})

    @staticmethod
    def collection(method: str, name: str, suffix: str, cls: type[M], idempotent: bool = True) -> _Call[M]:
        return _Call(method, f"/collections/{_seg(name)}{suffix}", _model(cls), idempotent=idempotent)

    @staticmethod
    def merge_subjects(subject: str, from_: str, collection: str | None) -> _Call[SubjectDetail]:
        path = f"/gallery/{_seg(subject)}/merge"
        return _Call("POST", path, _model(SubjectDetail), _params(collection), json={"from": from_}, idempotent=False)

    @staticmethod
    def move_faces(subject: str, faces: Sequence[str], to: str, collection: str | None) -> _Call[SubjectDetail]:
        return _Call(
            "POST",
            f"/gallery/{_seg(subject)}/faces/move",
            _model(SubjectDetail),
            _params(collection),
            json={"faces": list(faces), "to": to},
            idempotent=False,
        )

    @staticmethod
    def review_identities(name: str, threshold: str | float | None, limit: int) -> _Call[IdentityReview]:
        params = {"limit": str(limit)} | ({} if threshold is None else {"threshold": str(threshold)})
        return _Call("GET", f"/collections/{_seg(name)}/duplicates", _model(IdentityReview), params)

    @staticmethod
    def audit_params(
        since: float | None, until: float | None, action: str | None, collection: str | None
    ) -> dict[str, str]:
        given = {"since": since, "until": until, "action": action, "collection": collection}
        return {k: str(v) for k, v in given.items() if v is not None}

    @staticmethod
    def import_collection(name: str, body: Any) -> _Call[ImportResult]:
        return _Call(
            "POST",
            f"/collections/{_seg(name)}/import",
            _model(ImportResult),
            content=body,
            headers={"Content-Type": "application/x-ndjson"},
            idempotent=False,
            retry=False,
        )

    @staticmethod
    def start_migration(name: str, to: str, switch: bool, missing: str) -> _Call[MigrationStatus]:
        return _Call(
            "POST",
            f"/collections/{_seg(name)}/migration",
            _model(MigrationStatus),
            json={"to": to, "switch": switch, "missing": missing},
            idempotent=False,
        )


_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


class _Base:
    """What both clients share: options, headers, the retry policy."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        retries: int,
        backoff: float,
        max_backoff: float,
        headers: Mapping[str, str] | None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json, application/problem+json, */*"}
        if api_key:
            self._headers["X-API-Key"] = api_key
        self._headers.update(headers or {})
        self._timeout = timeout

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (0 first), or None when the service asks for longer than
        ``max_backoff``."""
        if retry_after is not None and retry_after > self.max_backoff:
            return None
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        delay = random.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)

    def _after_error(self, call: _Call[Any], attempt: int, exc: httpx.TransportError) -> float:
        """The wait before retrying a failed connection; raises :class:`OAMLConnectionError` when it is not."""
        sent_maybe = not isinstance(exc, _CONNECT_ERRORS)
        if call.retry and attempt < self.retries and (call.idempotent or not sent_maybe):
            delay = self._delay(attempt, None)
            if delay is not None:
                return delay
        raise OAMLConnectionError(f"{call.method} {self.base_url}{call.path}: {exc!r}") from exc

    def _after_answer(self, call: _Call[Any], attempt: int, response: httpx.Response) -> float | None:
        """None: the answer is final; else the wait before retrying it."""
        if response.status_code in (429, 503) and call.retry and attempt < self.retries:
            return self._delay(attempt, _retry_after(response.headers.get("retry-after")))
        return None

    @staticmethod
    def _result(call: _Call[T], response: httpx.Response) -> T:
        if response.is_error:
            raise error_from_response(response)
        return call.parse(response)


#: Each operation of the service's OpenAPI document (its ``operationId``) and the client method that calls it.
OPERATIONS: dict[str, str] = {
    "verify": "verify",
    "explain": "explain",
    "enrol": "enrol",
    "list_subjects": "list_subjects",
    "get_subject": "get_subject",
    "update_subject": "update_subject",
    "delete_subject": "delete_subject",
    "delete_face": "delete_face",
    "verify_subject": "verify_subject",
    "identify": "identify",
    "occlusion_of_photo": "heatmap",
    "occlusion_of_face": "heatmap_of_face",
    "create_collection": "create_collection",
    "list_collections": "list_collections",
    "get_collection": "get_collection",
    "update_collection": "update_collection",
    "delete_collection": "delete_collection",
    "migration_status": "migration_status",
    "start_migration": "start_migration",
    "switch_migration": "switch_migration",
    "cancel_migration": "cancel_migration",
    "rollback_collection": "rollback",
    "drop_previous_version": "drop_previous",
    "health": "health",
    "ready": "ready",
    "info": "info",
    "metrics": "metrics",
    "merge_subjects": "merge_subjects",
    "move_faces": "move_faces",
    "review_identities": "review_identities",
    "audit_log": "audit_log",
    "export_audit_log": "export_audit_log",
    "export_collection": "export_collection",
    "import_collection": "import_collection",
}


class OAMLClient(_Base):
    """The OAML service over HTTP, synchronously (see the module's documentation for retries and errors).

    ``base_url``: the service (``http://127.0.0.1:8000``); ``api_key``: sent as ``X-API-Key``; ``timeout``:
    seconds per attempt (or an :class:`httpx.Timeout`); ``retries``: attempts after the first (0: none);
    ``backoff`` and ``max_backoff``: the first and the longest wait; ``transport``: an httpx transport (tests,
    proxies); ``headers``: sent with every request. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, backoff, max_backoff, headers)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport)

    def __enter__(self) -> OAMLClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    data=call.data,
                    files=call.files,
                    json=call.json,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                time.sleep(self._after_error(call, attempt, exc))
                attempt += 1
                continue
            wait = self._after_answer(call, attempt, response)
            if wait is None:
                return self._result(call, response)
            time.sleep(wait)
            attempt += 1

    # matching

    def verify(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        threshold: str | float | None = None,
        face_a: str | int = "largest",
        face_b: str | int = "largest",
        aligned: bool = False,
    ) -> VerifyResponse:
        """``POST /verify``: are the two photos the same person? ``threshold``: a preset (``lenient``,
        ``balanced``, ``strict``) or a fused score; ``face_*``: ``largest``, ``single`` or an index."""
        return self._send(_Routes.verify(image_a, image_b, threshold, face_a, face_b, aligned))

    def explain(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        threshold: str | float | None = None,
        face_a: str | int = "largest",
        face_b: str | int = "largest",
        aligned: bool = False,
        picture: bool = False,
    ) -> ExplainResponse:
        """``POST /explain``: /verify's answer with the evidence (``picture``: the picture as a data URL too)."""
        call = _Routes.explain(image_a, image_b, threshold, face_a, face_b, aligned, "json", picture)
        result: ExplainResponse = self._send(call)
        return result

    def explain_png(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        threshold: str | float | None = None,
        face_a: str | int = "largest",
        face_b: str | int = "largest",
        aligned: bool = False,
    ) -> bytes:
        """``POST /explain`` with ``format=png``: the explanation picture."""
        png: bytes = self._send(_Routes.explain(image_a, image_b, threshold, face_a, face_b, aligned, "png", False))
        return png

    def identify(
        self,
        image: ImageInput,
        *,
        top_k: int = 5,
        threshold: str | float | None = None,
        face: str | int = "largest",
        aligned: bool = False,
        collection: str | None = None,
    ) -> IdentifyResponse:
        """``POST /identify``: who in the collection is this? (``face='all'``: see :meth:`identify_all`.)"""
        if face == "all":
            raise ValueError("identify(face='all') answers every face: call identify_all")
        found: IdentifyResponse = self._send(_Routes.identify(image, top_k, threshold, face, aligned, collection))
        return found

    def identify_all(
        self,
        image: ImageInput,
        *,
        top_k: int = 5,
        threshold: str | float | None = None,
        collection: str | None = None,
    ) -> IdentifyAllResponse:
        """``POST /identify`` with ``face=all``: every face of a group photo (the largest 32), each identified."""
        found: IdentifyAllResponse = self._send(_Routes.identify(image, top_k, threshold, "all", False, collection))
        return found

    def verify_subject(
        self,
        subject: str,
        image: ImageInput,
        *,
        threshold: str | float | None = None,
        face: str | int = "largest",
        aligned: bool = False,
        collection: str | None = None,
    ) -> SubjectVerifyResponse:
        """``POST /gallery/{subject}/verify``: is this the enrolled subject?"""
        return self._send(_Routes.verify_subject(subject, image, threshold, face, aligned, collection))

    def heatmap(
        self, image: ImageInput, *, face: str | int = "largest", aligned: bool = False, scale: int = 2
    ) -> bytes:
        """``POST /occlusion``: the face's visibility heatmap, a PNG."""
        return self._send(_Routes.heatmap(image, face, aligned, scale))

    def heatmap_of_face(self, face_id: str, *, scale: int = 2, collection: str | None = None) -> bytes:
        """``GET /occlusion?face_id=``: an enrolled face's visibility heatmap, a PNG."""
        return self._send(_Routes.heatmap_of_face(face_id, scale, collection))

    # the gallery

    def enrol(
        self,
        subject: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        face: str | int = "single",
        aligned: bool = False,
        collection: str | None = None,
        idempotency_key: str | None = None,
    ) -> EnrolResponse:
        """``POST /gallery``: enrol the usable faces of one photo or several. An ``Idempotency-Key`` (a new UUID4
        unless given) is sent, the same on every retry, so a retried enrolment is written once; the answer says
        ``replayed`` when the service had it already. Raises :class:`NoUsableFace` (with ``rejected``) when no
        photo held a usable face."""
        return self._send(_Routes.enrol(subject, images, name, metadata, face, aligned, collection, idempotency_key))

    def list_subjects(self, *, offset: int = 0, limit: int = 100, collection: str | None = None) -> SubjectPage:
        """``GET /gallery``: one page of subjects, ordered by id."""
        return self._send(_Routes.list_subjects(offset, limit, collection))

    def iter_subjects(self, *, page_size: int = 1000, collection: str | None = None) -> Iterator[SubjectSummary]:
        """Every subject of the collection, page after page."""
        offset = 0
        while True:
            page = self.list_subjects(offset=offset, limit=page_size, collection=collection)
            yield from page.subjects
            offset += len(page.subjects)
            if not page.subjects or offset >= page.total:
                return

    def get_subject(self, subject: str, *, collection: str | None = None) -> SubjectDetail:
        """``GET /gallery/{subject}``: the subject and its faces."""
        return self._send(_Routes.get_subject(subject, collection))

    def update_subject(
        self, subject: str, *, name: Any = _UNSET, metadata: Any = _UNSET, collection: str | None = None
    ) -> SubjectDetail:
        """``PATCH /gallery/{subject}``: set the fields given (``name=None`` clears the name; ``metadata``
        replaces the stored object, ``None`` clears it); the others are kept."""
        return self._send(_Routes.update_subject(subject, name, metadata, collection))

    def delete_subject(self, subject: str, *, collection: str | None = None) -> DeleteResponse:
        """``DELETE /gallery/{subject}``: the subject and its faces."""
        return self._send(_Routes.delete_subject(subject, collection))

    def delete_face(self, subject: str, face_id: str, *, collection: str | None = None) -> DeleteResponse:
        """``DELETE /gallery/{subject}/faces/{face_id}``."""
        return self._send(_Routes.delete_face(subject, face_id, collection))

    # collections

    def create_collection(self, name: str, *, store_crops: bool | None = None) -> CollectionInfo:
        """``POST /collections`` (409 :class:`Conflict` ``COLLECTION_EXISTS``)."""
        return self._send(_Routes.create_collection(name, store_crops))

    def list_collections(self) -> CollectionPage:
        """``GET /collections``: those this key may use."""
        return self._send(_Call("GET", "/collections", _model(CollectionPage)))

    def get_collection(self, name: str) -> CollectionInfo:
        """``GET /collections/{name}``."""
        return self._send(_Routes.collection("GET", name, "", CollectionInfo))

    def update_collection(self, name: str, *, store_crops: bool | None) -> CollectionInfo:
        """``PATCH /collections/{name}``: keep (or stop keeping) the crops of faces enrolled from now on."""
        return self._send(_Routes.update_collection(name, store_crops))

    def delete_collection(self, name: str) -> CollectionDeleted:
        """``DELETE /collections/{name}`` with its subjects and faces."""
        return self._send(_Routes.collection("DELETE", name, "", CollectionDeleted))

    def migration_status(self, name: str) -> MigrationStatus:
        """``GET /collections/{name}/migration``."""
        return self._send(_Routes.collection("GET", name, "/migration", MigrationStatus))

    def start_migration(
        self, name: str, to: str, *, switch: bool = True, missing: Literal["refuse", "drop"] = "refuse"
    ) -> MigrationStatus:
        """``POST /collections/{name}/migration``: re-embed with model version ``to`` (``switch=False``: a dry
        run that stops ``ready`` with its report)."""
        return self._send(_Routes.start_migration(name, to, switch, missing))

    def switch_migration(self, name: str) -> MigrationStatus:
        """``POST /collections/{name}/migration/switch``: switch a ``ready`` migration now."""
        return self._send(_Routes.collection("POST", name, "/migration/switch", MigrationStatus, idempotent=False))

    def cancel_migration(self, name: str) -> MigrationStatus:
        """``DELETE /collections/{name}/migration``: stop a migration and erase what it wrote."""
        return self._send(_Routes.collection("DELETE", name, "/migration", MigrationStatus))

    def rollback(self, name: str) -> MigrationStatus:
        """``POST /collections/{name}/rollback``: the previous model version again."""
        return self._send(_Routes.collection("POST", name, "/rollback", MigrationStatus, idempotent=False))

    def drop_previous(self, name: str) -> MigrationStatus:
        """``DELETE /collections/{name}/previous``: erase the previous version's data (no rollback after)."""
        return self._send(_Routes.collection("DELETE", name, "/previous", MigrationStatus))

    # identity hygiene, the audit log, exports

    def merge_subjects(self, subject: str, from_: str, *, collection: str | None = None) -> SubjectDetail:
        """``POST /gallery/{subject}/merge``: every face of ``from_`` becomes ``subject``'s and ``from_`` is
        deleted, in one transaction (not sent again after a lost answer: :meth:`get_subject` tells)."""
        return self._send(_Routes.merge_subjects(subject, from_, collection))

    def move_faces(
        self, subject: str, faces: Sequence[str], to: str, *, collection: str | None = None
    ) -> SubjectDetail:
        """``POST /gallery/{subject}/faces/move``: ``faces`` of ``subject`` become ``to``'s (made if new);
        answers ``to``."""
        return self._send(_Routes.move_faces(subject, faces, to, collection))

    def review_identities(self, name: str, *, threshold: str | float | None = None, limit: int = 100) -> IdentityReview:
        """``GET /collections/{name}/duplicates``: subjects that look like one person, and subjects whose faces
        look like two (``threshold``: a preset or a score; the collection's ``balanced`` preset by default)."""
        return self._send(_Routes.review_identities(name, threshold, limit))

    def audit_log(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        collection: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> AuditPage:
        """``GET /audit``: a page of the audit log, oldest first (``after``: the previous page's ``next``)."""
        params = _Routes.audit_params(since, until, action, collection) | {"after": str(after), "limit": str(limit)}
        return self._send(_Call("GET", "/audit", _model(AuditPage), params))

    def iter_audit_log(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        collection: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[AuditEntryInfo]:
        """Every entry of the audit log that the filters keep, page after page."""
        after: int | None = 0
        while after is not None:
            page = self.audit_log(
                since=since, until=until, action=action, collection=collection, after=after, limit=page_size
            )
            yield from page.entries
            after = page.next

    def export_audit_log(
        self,
        destination: Destination,
        *,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        collection: str | None = None,
    ) -> int:
        """``GET /audit/export``: the log as JSON lines written to ``destination``; returns the bytes written."""
        return self._download("/audit/export", _Routes.audit_params(since, until, action, collection), destination)

    def export_collection(self, name: str, destination: Destination) -> int:
        """``GET /collections/{name}/export``: the collection (subjects, faces with their embeddings, maps and
        crops) as JSON lines streamed to ``destination``; returns the bytes written. Biometric data: keep the
        file as the gallery is kept."""
        return self._download(f"/collections/{_seg(name)}/export", {}, destination)

    def import_collection(self, name: str, source: Source) -> ImportResult:
        """``POST /collections/{name}/import``: an export (bytes, a path or a file object, streamed) into
        collection ``name``, new or empty. Not retried (the body is read as it is sent); a failed import leaves
        the collection as it was, so calling again is safe."""
        return self._send(_Routes.import_collection(name, _chunks(source)))

    def _download(self, path: str, params: dict[str, str], destination: Destination) -> int:
        """GET ``path`` streamed to ``destination``; retried as a read until its body starts, not after."""
        call = _Call("GET", path, _bytes, params)
        attempt = 0
        while True:
            try:
                with self._http.stream("GET", path, params=params) as response:
                    wait = self._after_answer(call, attempt, response)
                    if wait is None:
                        if response.is_error:
                            response.read()
                            raise error_from_response(response)
                        sink = _Sink(destination)
                        try:
                            for chunk in response.iter_bytes(_CHUNK):
                                sink.write(chunk)
                        except httpx.TransportError as exc:
                            raise OAMLConnectionError(f"GET {self.base_url}{path}: cut off: {exc!r}") from exc
                        finally:
                            sink.close()
                        return sink.written
            except httpx.TransportError as exc:
                wait = self._after_error(call, attempt, exc)
            time.sleep(wait)
            attempt += 1

    # the service

    def health(self) -> HealthResponse:
        """``GET /health``."""
        return self._send(_Call("GET", "/health", _model(HealthResponse)))

    def ready(self) -> ReadyResponse:
        """``GET /ready`` (not retried: a loading service raises :class:`NotReady`)."""
        return self._send(_Call("GET", "/ready", _model(ReadyResponse), retry=False))

    def info(self) -> InfoResponse:
        """``GET /info``."""
        return self._send(_Call("GET", "/info", _model(InfoResponse)))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus' text."""
        return self._send(_Call("GET", "/metrics", _text))


class AsyncOAMLClient(_Base):
    """:class:`OAMLClient`'s methods as coroutines, over :class:`httpx.AsyncClient` (``transport``: an
    :class:`httpx.AsyncBaseTransport`). Use it with ``async with``, or await :meth:`aclose`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, backoff, max_backoff, headers)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def __aenter__(self) -> AsyncOAMLClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    data=call.data,
                    files=call.files,
                    json=call.json,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                await asyncio.sleep(self._after_error(call, attempt, exc))
                attempt += 1
                continue
            wait = self._after_answer(call, attempt, response)
            if wait is None:
                return self._result(call, response)
            await asyncio.sleep(wait)
            attempt += 1

    # matching

    async def verify(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        threshold: str | float | None = None,
        face_a: str | int = "largest",
        face_b: str | int = "largest",
        aligned: bool = False,
    ) -> VerifyResponse:
        """See :meth:`OAMLClient.verify`."""
        return await self._send(_Routes.verify(image_a, image_b, threshold, face_a, face_b, aligned))

    async def explain(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        threshold: str | float | None = None,
        face_a: str | int = "largest",
        face_b: str | int = "largest",
        aligned: bool = False,
        picture: bool = False,
    ) -> ExplainResponse:
        """See :meth:`OAMLClient.explain`."""
        call = _Routes.explain(image_a, image_b, threshold, face_a, face_b, aligned, "json", picture)
        result: ExplainResponse = await self._send(call)
        return result

    async def explain_png(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        threshold: str | float | None = None,
        face_a: str | int = "largest",
        face_b: str | int = "largest",
        aligned: bool = False,
    ) -> bytes:
        """See :meth:`OAMLClient.explain_png`."""
        call = _Routes.explain(image_a, image_b, threshold, face_a, face_b, aligned, "png", False)
        png: bytes = await self._send(call)
        return png

    async def identify(
        self,
        image: ImageInput,
        *,
        top_k: int = 5,
        threshold: str | float | None = None,
        face: str | int = "largest",
        aligned: bool = False,
        collection: str | None = None,
    ) -> IdentifyResponse:
        """See :meth:`OAMLClient.identify`."""
        if face == "all":
            raise ValueError("identify(face='all') answers every face: call identify_all")
        call = _Routes.identify(image, top_k, threshold, face, aligned, collection)
        found: IdentifyResponse = await self._send(call)
        return found

    async def identify_all(
        self,
        image: ImageInput,
        *,
        top_k: int = 5,
        threshold: str | float | None = None,
        collection: str | None = None,
    ) -> IdentifyAllResponse:
        """See :meth:`OAMLClient.identify_all`."""
        call = _Routes.identify(image, top_k, threshold, "all", False, collection)
        found: IdentifyAllResponse = await self._send(call)
        return found

    async def verify_subject(
        self,
        subject: str,
        image: ImageInput,
        *,
        threshold: str | float | None = None,
        face: str | int = "largest",
        aligned: bool = False,
        collection: str | None = None,
    ) -> SubjectVerifyResponse:
        """See :meth:`OAMLClient.verify_subject`."""
        return await self._send(_Routes.verify_subject(subject, image, threshold, face, aligned, collection))

    async def heatmap(
        self, image: ImageInput, *, face: str | int = "largest", aligned: bool = False, scale: int = 2
    ) -> bytes:
        """See :meth:`OAMLClient.heatmap`."""
        return await self._send(_Routes.heatmap(image, face, aligned, scale))

    async def heatmap_of_face(self, face_id: str, *, scale: int = 2, collection: str | None = None) -> bytes:
        """See :meth:`OAMLClient.heatmap_of_face`."""
        return await self._send(_Routes.heatmap_of_face(face_id, scale, collection))

    # the gallery

    async def enrol(
        self,
        subject: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        face: str | int = "single",
        aligned: bool = False,
        collection: str | None = None,
        idempotency_key: str | None = None,
    ) -> EnrolResponse:
        """See :meth:`OAMLClient.enrol`."""
        return await self._send(
            _Routes.enrol(subject, images, name, metadata, face, aligned, collection, idempotency_key)
        )

    async def list_subjects(self, *, offset: int = 0, limit: int = 100, collection: str | None = None) -> SubjectPage:
        """See :meth:`OAMLClient.list_subjects`."""
        return await self._send(_Routes.list_subjects(offset, limit, collection))

    async def iter_subjects(
        self, *, page_size: int = 1000, collection: str | None = None
    ) -> AsyncIterator[SubjectSummary]:
        """Every subject of the collection, page after page (``async for``)."""
        offset = 0
        while True:
            page = await self.list_subjects(offset=offset, limit=page_size, collection=collection)
            for subject in page.subjects:
                yield subject
            offset += len(page.subjects)
            if not page.subjects or offset >= page.total:
                return

    async def get_subject(self, subject: str, *, collection: str | None = None) -> SubjectDetail:
        """See :meth:`OAMLClient.get_subject`."""
        return await self._send(_Routes.get_subject(subject, collection))

    async def update_subject(
        self, subject: str, *, name: Any = _UNSET, metadata: Any = _UNSET, collection: str | None = None
    ) -> SubjectDetail:
        """See :meth:`OAMLClient.update_subject`."""
        return await self._send(_Routes.update_subject(subject, name, metadata, collection))

    async def delete_subject(self, subject: str, *, collection: str | None = None) -> DeleteResponse:
        """See :meth:`OAMLClient.delete_subject`."""
        return await self._send(_Routes.delete_subject(subject, collection))

    async def delete_face(self, subject: str, face_id: str, *, collection: str | None = None) -> DeleteResponse:
        """See :meth:`OAMLClient.delete_face`."""
        return await self._send(_Routes.delete_face(subject, face_id, collection))

    # collections

    async def create_collection(self, name: str, *, store_crops: bool | None = None) -> CollectionInfo:
        """See :meth:`OAMLClient.create_collection`."""
        return await self._send(_Routes.create_collection(name, store_crops))

    async def list_collections(self) -> CollectionPage:
        """See :meth:`OAMLClient.list_collections`."""
        return await self._send(_Call("GET", "/collections", _model(CollectionPage)))

    async def get_collection(self, name: str) -> CollectionInfo:
        """See :meth:`OAMLClient.get_collection`."""
        return await self._send(_Routes.collection("GET", name, "", CollectionInfo))

    async def update_collection(self, name: str, *, store_crops: bool | None) -> CollectionInfo:
        """See :meth:`OAMLClient.update_collection`."""
        return await self._send(_Routes.update_collection(name, store_crops))

    async def delete_collection(self, name: str) -> CollectionDeleted:
        """See :meth:`OAMLClient.delete_collection`."""
        return await self._send(_Routes.collection("DELETE", name, "", CollectionDeleted))

    async def migration_status(self, name: str) -> MigrationStatus:
        """See :meth:`OAMLClient.migration_status`."""
        return await self._send(_Routes.collection("GET", name, "/migration", MigrationStatus))

    async def start_migration(
        self, name: str, to: str, *, switch: bool = True, missing: Literal["refuse", "drop"] = "refuse"
    ) -> MigrationStatus:
        """See :meth:`OAMLClient.start_migration`."""
        return await self._send(_Routes.start_migration(name, to, switch, missing))

    async def switch_migration(self, name: str) -> MigrationStatus:
        """See :meth:`OAMLClient.switch_migration`."""
        call = _Routes.collection("POST", name, "/migration/switch", MigrationStatus, idempotent=False)
        return await self._send(call)

    async def cancel_migration(self, name: str) -> MigrationStatus:
        """See :meth:`OAMLClient.cancel_migration`."""
        return await self._send(_Routes.collection("DELETE", name, "/migration", MigrationStatus))

    async def rollback(self, name: str) -> MigrationStatus:
        """See :meth:`OAMLClient.rollback`."""
        return await self._send(_Routes.collection("POST", name, "/rollback", MigrationStatus, idempotent=False))

    async def drop_previous(self, name: str) -> MigrationStatus:
        """See :meth:`OAMLClient.drop_previous`."""
        return await self._send(_Routes.collection("DELETE", name, "/previous", MigrationStatus))

    # identity hygiene, the audit log, exports

    async def merge_subjects(self, subject: str, from_: str, *, collection: str | None = None) -> SubjectDetail:
        """See :meth:`OAMLClient.merge_subjects`."""
        return await self._send(_Routes.merge_subjects(subject, from_, collection))

    async def move_faces(
        self, subject: str, faces: Sequence[str], to: str, *, collection: str | None = None
    ) -> SubjectDetail:
        """See :meth:`OAMLClient.move_faces`."""
        return await self._send(_Routes.move_faces(subject, faces, to, collection))

    async def review_identities(
        self, name: str, *, threshold: str | float | None = None, limit: int = 100
    ) -> IdentityReview:
        """See :meth:`OAMLClient.review_identities`."""
        return await self._send(_Routes.review_identities(name, threshold, limit))

    async def audit_log(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        collection: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> AuditPage:
        """See :meth:`OAMLClient.audit_log`."""
        params = _Routes.audit_params(since, until, action, collection) | {"after": str(after), "limit": str(limit)}
        return await self._send(_Call("GET", "/audit", _model(AuditPage), params))

    async def export_audit_log(
        self,
        destination: Destination,
        *,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
        collection: str | None = None,
    ) -> int:
        """See :meth:`OAMLClient.export_audit_log`."""
        params = _Routes.audit_params(since, until, action, collection)
        return await self._download("/audit/export", params, destination)

    async def export_collection(self, name: str, destination: Destination) -> int:
        """See :meth:`OAMLClient.export_collection`."""
        return await self._download(f"/collections/{_seg(name)}/export", {}, destination)

    async def import_collection(self, name: str, source: Source) -> ImportResult:
        """See :meth:`OAMLClient.import_collection`."""
        return await self._send(_Routes.import_collection(name, _achunks(source)))

    async def _download(self, path: str, params: dict[str, str], destination: Destination) -> int:
        """See :meth:`OAMLClient._download`."""
        call = _Call("GET", path, _bytes, params)
        attempt = 0
        while True:
            try:
                async with self._http.stream("GET", path, params=params) as response:
                    wait = self._after_answer(call, attempt, response)
                    if wait is None:
                        if response.is_error:
                            await response.aread()
                            raise error_from_response(response)
                        sink = _Sink(destination)
                        try:
                            async for chunk in response.aiter_bytes(_CHUNK):
                                sink.write(chunk)
                        except httpx.TransportError as exc:
                            raise OAMLConnectionError(f"GET {self.base_url}{path}: cut off: {exc!r}") from exc
                        finally:
                            sink.close()
                        return sink.written
            except httpx.TransportError as exc:
                wait = self._after_error(call, attempt, exc)
            await asyncio.sleep(wait)
            attempt += 1

    # the service

    async def health(self) -> HealthResponse:
        """See :meth:`OAMLClient.health`."""
        return await self._send(_Call("GET", "/health", _model(HealthResponse)))

    async def ready(self) -> ReadyResponse:
        """See :meth:`OAMLClient.ready`."""
        return await self._send(_Call("GET", "/ready", _model(ReadyResponse), retry=False))

    async def info(self) -> InfoResponse:
        """See :meth:`OAMLClient.info`."""
        return await self._send(_Call("GET", "/info", _model(InfoResponse)))

    async def metrics(self) -> str:
        """See :meth:`OAMLClient.metrics`."""
        return await self._send(_Call("GET", "/metrics", _text))
