"""Liveness, readiness, metrics (public) and the service description (``/info``, behind the key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from model.align import ACCEPTED_FORMATS
from model.calibration import PRESETS, PRIOR
from model.openset import IDENTIFY_PRIOR
from service import usecases
from service.problems import ApiError
from service.routes.deps import MatchRole, StateDep, granted_collections
from service.schemas import (
    BackbonePathInfo,
    GallerySearchInfo,
    HealthResponse,
    InfoResponse,
    PresetInfo,
    ReadyResponse,
)
from service.state import AppState
from service.store import DEFAULT_COLLECTION

__all__ = ["public", "protected"]

public = APIRouter(tags=["health"])
protected = APIRouter(tags=["health"], dependencies=[MatchRole])


@public.get("/health", response_model=HealthResponse, operation_id="health")
async def health() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse(status="ok")


@public.get(
    "/ready", response_model=ReadyResponse, operation_id="ready", responses={503: {"description": "still loading"}}
)
async def ready(request: Request) -> Any:
    """Readiness: model loaded and warmed, gallery loaded (`gallery_writable` false: served read-only)."""
    state: AppState | None = getattr(request.app.state, "oaml", None)
    if state is None or not state.ready:
        raise ApiError("NOT_READY", "loading model and gallery")
    if not state.gallery.writable:
        return ReadyResponse(
            status="ready",
            gallery_writable=False,
            detail="read-only: the gallery database cannot be written; enrolments and deletions are refused",
        )
    return ReadyResponse(status="ready", gallery_writable=True)


@protected.get("/metrics", operation_id="metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency per route, batch sizes, queue depth, gallery size (every
    collection's faces: a key limited to some collections gets 403). With API keys, scrape with a `match` key
    (Prometheus: `authorization: {credentials: <key>}`)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    state: AppState | None = getattr(request.app.state, "oaml", None)
    if state is None:
        raise ApiError("NOT_READY", "loading")
    if granted_collections(request) is not None:
        raise ApiError("FORBIDDEN", "metrics count the faces of every collection: scrape with a key for all of them")
    state.metrics.queue_depth.set(state.engine.queue_depth)
    state.metrics.gallery_faces.set(state.gallery.faces)
    state.metrics.gallery_subjects.set(state.gallery.subjects)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@protected.get("/info", response_model=InfoResponse, operation_id="info")
async def info(state: StateDep, request: Request) -> InfoResponse:
    """Model version, architecture, device, preset thresholds with their FAR and probability, gallery size."""
    engine, cal, settings = state.engine, state.engine.calibration, state.settings
    presets = {}
    for name, far in PRESETS.items():
        lfw = engine.card.lfw_presets.get(name, {})
        presets[name] = PresetInfo(
            far=far,
            threshold=round(cal.thresholds[name], 5),
            probability=round(cal.probability_at(cal.thresholds[name]), 5),
            lfw_tar=lfw.get("tar"),
            lfw_far=lfw.get("far"),
        )
    default = state.gallery.collection(DEFAULT_COLLECTION)
    allowed = granted_collections(request)
    sees_default, sees_all = allowed is None or DEFAULT_COLLECTION in allowed, allowed is None
    return InfoResponse(
        model_version=engine.model_version,
        architecture=engine.card.architecture,
        device=str(engine.device),
        precision=engine.embedder.precision,
        engine=engine.embedder.engine,
        backbone_path=BackbonePathInfo(**engine.served_path.to_dict()),
        calibration="fitted on held-out identities" if cal.fitted else "default (uncalibrated)",
        presets=presets,
        probability_prior=PRIOR,
        identify_presets=(
            usecases.identify_presets(engine.model_for(default.version), len(default.index)) if sees_default else None
        ),
        identify_model=cal.identify_model.source,
        identify_prior=IDENTIFY_PRIOR,
        flip_test=engine.embedder.flip,
        default_threshold=settings.default_threshold,
        gallery_subjects=len(default.names) if sees_default else None,
        gallery_faces=len(default.index) if sees_default else None,
        collections=len(state.gallery.collections) if sees_all else None,
        gallery_store="postgresql" if state.follower is not None else "sqlite",
        gallery_sync=(
            {"seq": state.follower.seq, "connected": state.follower.connected, "reconnects": state.follower.reconnects}
            if state.follower is not None
            else None
        ),
        gallery_search=GallerySearchInfo(shortlist=settings.shortlist, **default.index.describe()),
        gallery_writable=state.gallery.writable,
        detector="retinaface_mnet025",
        detector_backend=engine.detector.backend,
        detector_passes=engine.detector.passes,
        max_batch=settings.max_batch,
        limits={
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_images_per_request": settings.max_images_per_request,
        },
        image_formats=list(ACCEPTED_FORMATS),
    )
