"""HTTP routes: parse the request, call the engine and the gallery, shape the response. No torch here."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from PIL import Image

from model.align import FaceSelection
from model.calibration import PRESETS, PRIOR
from model.errors import OAMLError
from service.engine import FaceFeatures
from service.errors import ApiError
from service.gallery import FaceRecord, new_face_id
from service.render import heatmap_png
from service.schemas import (
    Candidate,
    DeleteResponse,
    EnrolledFace,
    EnrolResponse,
    FaceInfo,
    HealthResponse,
    IdentifyResponse,
    InfoResponse,
    PresetInfo,
    Quality,
    RejectedImage,
    ScoreBreakdown,
    SubjectDetail,
    SubjectFace,
    SubjectPage,
    SubjectSummary,
    VerifyResponse,
)
from service.state import AppState

__all__ = ["public", "protected"]

SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$"
_ACCEPTED_TYPES = ("image/", "application/octet-stream")


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "oaml", None)
    if state is None or not state.ready:
        raise ApiError("NOT_READY", "the service is still loading the model and the gallery")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def require_key(request: Request) -> None:
    """API-key check when ``OAML_API_KEYS`` is set: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    supplied = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if supplied is None and auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    if supplied is None or supplied not in keys:
        raise ApiError("UNAUTHORIZED", "missing or invalid API key (send X-API-Key)")


public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_key)])


# -- helpers ---------------------------------------------------------------------------------


def parse_selection(value: str, field: str) -> FaceSelection:
    if value in ("largest", "single"):
        return value  # type: ignore[return-value]
    if re.fullmatch(r"\d{1,3}", value):
        return int(value)
    raise ApiError("VALIDATION_ERROR", f"{field} must be 'largest', 'single' or a face index (0 = largest), got {value!r}", field=field)


async def read_upload(state: AppState, upload: UploadFile, field: str) -> bytes:
    """Bytes of one uploaded image, with media-type and size checks."""
    ctype = (upload.content_type or "").lower()
    if ctype and not ctype.startswith(_ACCEPTED_TYPES):
        raise ApiError("UNSUPPORTED_MEDIA", f"{field}: {ctype!r} is not an image type", field=field)
    limit = state.settings.max_image_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError("IMAGE_TOO_LARGE", f"{field}: more than {limit} bytes", field=field, max_bytes=limit)
    if not data:
        raise ApiError("INVALID_IMAGE", f"{field}: empty file", field=field)
    return data


def _with_field(exc: OAMLError, field: str) -> OAMLError:
    exc.message = f"{field}: {exc.message}"
    exc.details["field"] = field
    return exc


async def face_from_upload(state: AppState, data: bytes, select: FaceSelection, aligned: bool, field: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(aligned crop, detection info) for one photo; domain errors carry the field name."""
    engine = state.engine
    try:
        if aligned:
            crop = await engine.run_cpu(engine.aligned_crop, data)
            return crop, {"box": None, "landmarks": None, "detection_score": None}
        face = await engine.run_cpu(engine.detect_one, data, select)
    except OAMLError as exc:
        raise _with_field(exc, field) from exc
    info = {
        "box": [round(v, 1) for v in face.face.box],
        "landmarks": np.round(face.face.landmarks, 1).tolist(),
        "detection_score": round(face.face.score, 4),
    }
    return face.crop, info


def face_info(state: AppState, feats: FaceFeatures, det: dict[str, Any]) -> FaceInfo:
    return FaceInfo(
        **det,
        quality=Quality(norm=round(feats.norm, 4), standardised=round(state.engine.quality(feats.norm), 4)),
        visibility=round(feats.visibility, 4),
        visibility_map=np.round(feats.occlusion.numpy(), 4).tolist(),
    )


def threshold_of(state: AppState, value: str | None) -> tuple[float, str | None]:
    try:
        return state.engine.resolve_threshold(value)
    except ValueError as exc:
        raise ApiError("VALIDATION_ERROR", str(exc), field="threshold") from exc


def _crop_jpeg(crop: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# -- health and info -------------------------------------------------------------------------


@public.get("/health", response_model=HealthResponse, tags=["health"], operation_id="health")
async def health() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse(status="ok")


@public.get("/ready", response_model=HealthResponse, tags=["health"], operation_id="ready", responses={503: {"description": "still loading"}})
async def ready(request: Request) -> Any:
    """Readiness: model loaded and warmed, gallery loaded."""
    state: AppState | None = getattr(request.app.state, "oaml", None)
    if state is None or not state.ready:
        raise ApiError("NOT_READY", "loading model and gallery")
    return HealthResponse(status="ready")


@public.get("/metrics", tags=["health"], operation_id="metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency per route, batch sizes, queue depth, gallery size."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    state: AppState | None = getattr(request.app.state, "oaml", None)
    if state is None:
        raise ApiError("NOT_READY", "loading")
    state.metrics.queue_depth.set(state.engine.queue_depth)
    state.metrics.gallery_faces.set(len(state.index))
    state.metrics.gallery_subjects.set(len(state.names))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@protected.get("/info", response_model=InfoResponse, tags=["health"], operation_id="info")
async def info(state: StateDep) -> InfoResponse:
    """Model version, architecture, device, thresholds per named preset with their FAR, gallery size."""
    engine, cal = state.engine, state.engine.calibration
    return InfoResponse(
        model_version=engine.model_version,
        architecture=engine.model.arch,
        device=str(engine.device),
        precision=str(engine.autocast).removeprefix("torch.") if engine.autocast else "float32",
        calibration="fitted on held-out identities" if cal.fitted else "default (uncalibrated)",
        presets={name: PresetInfo(far=far, threshold=round(cal.thresholds[name], 5), probability=round(cal.probability_at(cal.thresholds[name]), 5),
                                  **engine.preset_lfw(name)) for name, far in PRESETS.items()},
        probability_prior=PRIOR,
        flip_test=engine.embedder.flip,
        default_threshold=state.settings.default_threshold,
        gallery_subjects=len(state.names),
        gallery_faces=len(state.index),
        detector="retinaface_mnet025",
        max_batch=state.settings.max_batch,
        limits={"max_image_bytes": state.settings.max_image_bytes, "max_image_pixels": state.settings.max_image_pixels,
                "max_images_per_request": state.settings.max_images_per_request},
    )


# -- verify ----------------------------------------------------------------------------------


@protected.post("/verify", response_model=VerifyResponse, tags=["match"], operation_id="verify")
async def verify(
    state: StateDep,
    image_a: Annotated[UploadFile, File(description="first photo")],
    image_b: Annotated[UploadFile, File(description="second photo")],
    threshold: Annotated[str | None, Form(description="number, or preset: lenient, balanced, strict")] = None,
    face_a: Annotated[str, Form(description="'largest', 'single' or a face index")] = "largest",
    face_b: Annotated[str, Form()] = "largest",
    aligned: Annotated[bool, Form(description="inputs are aligned 112x112 crops: skip detection")] = False,
) -> VerifyResponse:
    """1:1 verification of two photos: are they the same person?"""
    thr, preset = threshold_of(state, threshold)
    sel_a, sel_b = parse_selection(face_a, "face_a"), parse_selection(face_b, "face_b")
    data_a, data_b = await read_upload(state, image_a, "image_a"), await read_upload(state, image_b, "image_b")
    (crop_a, det_a), (crop_b, det_b) = await asyncio.gather(
        face_from_upload(state, data_a, sel_a, aligned, "image_a"), face_from_upload(state, data_b, sel_b, aligned, "image_b")
    )
    fa, fb = await state.engine.embed(np.stack([crop_a, crop_b]))
    s = await state.engine.run_cpu(state.engine.pair_scores, fa, fb)
    cal = state.engine.calibration
    weights = cal.weights(s["visibility"])
    return VerifyResponse(
        match=s["fused"] > thr,
        score=round(s["fused"], 5),
        probability=round(s["probability"], 5),
        threshold=round(thr, 5),
        threshold_probability=round(cal.probability_at(thr), 5),
        threshold_preset=preset,
        scores=ScoreBreakdown(adaface=round(s["adaface"], 5), qaconv=round(s["qaconv"], 5), weights={k: round(v, 4) for k, v in weights.items()}),
        face_a=face_info(state, fa, det_a),
        face_b=face_info(state, fb, det_b),
        model_version=state.engine.model_version,
    )


# -- gallery ---------------------------------------------------------------------------------


@protected.post("/gallery", response_model=EnrolResponse, status_code=201, tags=["gallery"], operation_id="enrol",
                responses={422: {"description": "no usable face in any image (see `rejected`)"}})
async def enrol(
    state: StateDep,
    subject: Annotated[str, Form(pattern=SUBJECT_PATTERN, description="subject id: letters, digits, . _ @ : + -")],
    images: Annotated[list[UploadFile], File(description="one or more photos of the subject")],
    name: Annotated[str | None, Form(max_length=256)] = None,
    metadata: Annotated[str | None, Form(description="JSON object stored with the subject")] = None,
    face: Annotated[str, Form(description="'single' (reject photos with several faces), 'largest' or an index")] = "single",
    aligned: Annotated[bool, Form()] = False,
) -> EnrolResponse:
    """Enrol every usable face; unusable photos are listed in `rejected` with a reason."""
    settings = state.settings
    meta_obj: dict[str, Any] | None = None
    if metadata:
        try:
            meta_obj = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise ApiError("VALIDATION_ERROR", f"metadata is not valid JSON: {exc}", field="metadata") from exc
        if not isinstance(meta_obj, dict):
            raise ApiError("VALIDATION_ERROR", "metadata must be a JSON object", field="metadata")
    if len(images) > settings.max_images_per_request:
        raise ApiError("VALIDATION_ERROR", f"at most {settings.max_images_per_request} images per request", field="images")
    select = parse_selection(face, "face")
    rejected: list[RejectedImage] = []

    async def one(i: int, upload: UploadFile) -> tuple[int, np.ndarray, dict[str, Any]] | None:
        field = f"images[{i}]"
        try:
            data = await read_upload(state, upload, field)
            crop, det = await face_from_upload(state, data, select, aligned, field)
        except (ApiError, OAMLError) as exc:
            code = exc.code
            reason = exc.detail if isinstance(exc, ApiError) else exc.message
            rejected.append(RejectedImage(image_index=i, filename=upload.filename, code=code, reason=reason))
            return None
        box = det["box"]
        if box is not None and min(box[2] - box[0], box[3] - box[1]) < settings.min_face_size:
            rejected.append(RejectedImage(image_index=i, filename=upload.filename, code="FACE_TOO_SMALL",
                                          reason=f"face is {box[2] - box[0]:.0f} px wide, minimum {settings.min_face_size}"))
            return None
        return i, crop, det

    found = [r for r in await asyncio.gather(*(one(i, u) for i, u in enumerate(images))) if r is not None]
    feats = await state.engine.embed(np.stack([crop for _, crop, _ in found])) if found else []
    records: list[FaceRecord] = []
    enrolled: list[EnrolledFace] = []
    now = time.time()
    for (i, crop, det), f in zip(found, feats):
        quality = state.engine.quality(f.norm)
        if quality < settings.min_quality:
            rejected.append(RejectedImage(image_index=i, filename=images[i].filename, code="LOW_QUALITY",
                                          reason=f"standardised quality {quality:.2f} is below {settings.min_quality}"))
            continue
        fid = new_face_id()
        records.append(FaceRecord(
            face_id=fid, subject=subject, embedding=f.embedding.numpy(), feature_map=f.feature_map.numpy().astype(np.float16),
            occlusion=f.occlusion.numpy(), norm=f.norm, quality=quality, detection_score=det["detection_score"], box=det["box"],
            created_at=now, crop=_crop_jpeg(crop) if settings.store_crops else None,
        ))
        enrolled.append(EnrolledFace(face_id=fid, image_index=i, filename=images[i].filename, box=det["box"], detection_score=det["detection_score"],
                                     quality=Quality(norm=round(f.norm, 4), standardised=round(quality, 4)), visibility=round(f.visibility, 4)))
    rejected.sort(key=lambda r: r.image_index)
    if not records:
        raise ApiError("NO_USABLE_FACE", "no image held a usable face", rejected=[r.model_dump() for r in rejected])

    def commit() -> int:
        with state.enrol_lock:  # store first (durable), then the index: an acknowledged face is on disk
            state.store.upsert_subject(subject, name, meta_obj)
            state.store.add_faces(records)
            state.index.add(
                [r.face_id for r in records], [subject] * len(records),
                torch.from_numpy(np.stack([r.embedding for r in records])),
                torch.from_numpy(np.stack([r.feature_map for r in records]).astype(np.float32)),
                torch.from_numpy(np.stack([r.occlusion for r in records]))[:, None],
            )
            if name is not None or subject not in state.names:
                state.names[subject] = name if name is not None else state.names.get(subject)
            return state.store.subject(subject).faces

    total = await state.engine.run_cpu(commit)
    return EnrolResponse(subject=subject, name=state.names.get(subject), faces=enrolled, rejected=rejected, total_faces=total)


@protected.get("/gallery", response_model=SubjectPage, tags=["gallery"], operation_id="list_subjects")
async def list_subjects(
    state: StateDep, offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> SubjectPage:
    """Enrolled subjects, ordered by id, a page at a time."""
    rows, total = await state.engine.run_cpu(state.store.subjects, offset, limit)
    return SubjectPage(subjects=[SubjectSummary(**vars(r)) for r in rows], total=total, offset=offset, limit=limit)


@protected.get("/gallery/{subject}", response_model=SubjectDetail, tags=["gallery"], operation_id="get_subject")
async def get_subject(state: StateDep, subject: str) -> SubjectDetail:
    """One subject and its enrolled faces."""
    record = await state.engine.run_cpu(state.store.subject, subject)
    faces = await state.engine.run_cpu(state.store.faces_of, subject)
    return SubjectDetail(
        **vars(record),
        face_list=[
            SubjectFace(face_id=f.face_id, quality=Quality(norm=round(f.norm, 4), standardised=round(f.quality, 4)),
                        visibility=round(float(f.occlusion.mean()), 4), detection_score=f.detection_score, box=f.box, created_at=f.created_at)
            for f in faces
        ],
    )


@protected.delete("/gallery/{subject}", response_model=DeleteResponse, tags=["gallery"], operation_id="delete_subject")
async def delete_subject(state: StateDep, subject: str) -> DeleteResponse:
    """Remove a subject and all of its faces."""

    def run() -> list[str]:
        with state.enrol_lock:
            ids = state.store.delete_subject(subject)
            state.index.remove(ids)
            state.names.pop(subject, None)
            return ids

    return DeleteResponse(subject=subject, deleted_faces=await state.engine.run_cpu(run))


@protected.delete("/gallery/{subject}/faces/{face_id}", response_model=DeleteResponse, tags=["gallery"], operation_id="delete_face")
async def delete_face(state: StateDep, subject: str, face_id: str) -> DeleteResponse:
    """Remove one face of a subject (the subject stays, even with no faces left)."""

    def run() -> None:
        with state.enrol_lock:
            state.store.delete_face(subject, face_id)
            state.index.remove([face_id])

    await state.engine.run_cpu(run)
    return DeleteResponse(subject=subject, deleted_faces=[face_id])


# -- identify --------------------------------------------------------------------------------


@protected.post("/identify", response_model=IdentifyResponse, tags=["match"], operation_id="identify")
async def identify(
    state: StateDep,
    image: Annotated[UploadFile, File()],
    top_k: Annotated[int, Form(ge=1, le=100)] = 5,
    threshold: Annotated[str | None, Form()] = None,
    face: Annotated[str, Form()] = "largest",
    aligned: Annotated[bool, Form()] = False,
) -> IdentifyResponse:
    """1:N search: exact AdaFace cosine over every face, QAConv re-ranking of a shortlist, one row per subject.

    `match` is the best subject when it passes the threshold, else null (an unknown person).
    """
    thr, preset = threshold_of(state, threshold)
    data = await read_upload(state, image, "image")
    crop, det = await face_from_upload(state, data, parse_selection(face, "face"), aligned, "image")
    (feats,) = await state.engine.embed(crop[None])
    # occluded probes get a longer shortlist: the global cosine is less reliable for them
    shortlist = state.settings.shortlist * (3 if feats.visibility < 0.7 else 1)
    t0 = time.perf_counter()
    found = await state.engine.run_cpu(state.index.search, feats.embedding, feats.feature_map, feats.occlusion, shortlist)
    cal = state.engine.calibration
    vis = np.minimum(found["visibility"], feats.visibility)
    fused = cal.score(found["cosine"], found["qaconv"], vis)
    best: dict[str, int] = {}
    for i, subject in enumerate(found["subjects"]):
        if subject not in best or fused[i] > fused[best[subject]]:
            best[subject] = i
    order = sorted(best.items(), key=lambda kv: -fused[kv[1]])[:top_k]
    probs = cal.probability(fused)
    candidates = [
        Candidate(subject=s, name=state.names.get(s), face_id=found["face_ids"][i], score=round(float(fused[i]), 5),
                  probability=round(float(probs[i]), 5), adaface=round(float(found["cosine"][i]), 5),
                  qaconv=round(float(found["qaconv"][i]), 5), match=bool(fused[i] > thr))
        for s, i in order
    ]
    timings = {k: round(v, 3) for k, v in found["ms"].items()}
    timings["matching"] = round(1000 * (time.perf_counter() - t0), 3)
    return IdentifyResponse(
        match=candidates[0] if candidates and candidates[0].match else None,
        candidates=candidates, threshold=round(thr, 5), threshold_probability=round(cal.probability_at(thr), 5),
        threshold_preset=preset, face=face_info(state, feats, det),
        gallery_faces=len(state.index), timings_ms=timings, model_version=state.engine.model_version,
    )


# -- occlusion heatmaps ----------------------------------------------------------------------

PNG = {200: {"content": {"image/png": {}}, "description": "aligned crop with its visibility heatmap and a colour bar"}}


@protected.get("/occlusion", tags=["occlusion"], operation_id="occlusion_of_face", response_class=Response, responses=PNG)
async def occlusion_of_face(state: StateDep, face_id: Annotated[str, Query(min_length=1)], scale: Annotated[int, Query(ge=1, le=8)] = 2) -> Response:
    """Heatmap of an enrolled face (1 = visible). Without stored crops (`OAML_STORE_CROPS`), the map is drawn on grey."""
    record = await state.engine.run_cpu(state.store.face, face_id)
    crop = np.asarray(Image.open(io.BytesIO(record.crop)).convert("RGB")) if record.crop else None
    png = await state.engine.run_cpu(heatmap_png, crop, record.occlusion, scale)
    return Response(png, media_type="image/png", headers={"X-OAML-Visibility": f"{float(record.occlusion.mean()):.4f}"})


@protected.post("/occlusion", tags=["occlusion"], operation_id="occlusion_of_photo", response_class=Response, responses=PNG)
async def occlusion_of_photo(
    state: StateDep,
    image: Annotated[UploadFile, File()],
    face: Annotated[str, Form()] = "largest",
    aligned: Annotated[bool, Form()] = False,
    scale: Annotated[int, Form(ge=1, le=8)] = 2,
) -> Response:
    """Heatmap of the face in an uploaded photo."""
    data = await read_upload(state, image, "image")
    crop, _ = await face_from_upload(state, data, parse_selection(face, "face"), aligned, "image")
    (feats,) = await state.engine.embed(crop[None])
    png = await state.engine.run_cpu(heatmap_png, crop, feats.occlusion.numpy(), scale)
    return Response(png, media_type="image/png", headers={"X-OAML-Visibility": f"{feats.visibility:.4f}"})
