"""1:N, open-set: who among a collection's people is this (``/identify``), and every face of a group photo.

Each collection is searched with the model version it is matched with (:class:`service.gallery.Collection`),
the probe embedded by that model, and its thresholds are that model's FPIR presets at the collection's size.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from model.align import FaceSelection
from model.errors import NoFaceError, OAMLError
from model.openset import IDENTIFY_PRESETS, IDENTIFY_PRIOR, posterior
from service.engine import FaceFeatures
from service.gallery import Collection
from service.models import ServedModel
from service.problems import ApiError
from service.schemas import (
    Candidate,
    IdentifyAllResponse,
    IdentifyPresetInfo,
    IdentifyResponse,
    ScoreBreakdown,
    SkippedFace,
)
from service.state import AppState
from service.store import DEFAULT_COLLECTION
from service.usecases.common import (
    OCCLUDED_SHORTLIST_FACTOR,
    OCCLUDED_VISIBILITY,
    Photo,
    detection_of,
    face_info,
    find_face,
    probe_failure,
    probe_gate,
    with_field,
)

__all__ = ["identify", "identify_all", "identify_presets", "MAX_GROUP_FACES"]


async def identify(
    state: AppState,
    photo: Photo,
    top_k: int,
    threshold: str | None,
    select: FaceSelection,
    aligned: bool,
    collection: str = DEFAULT_COLLECTION,
) -> IdentifyResponse:
    """1:N, open-set: cosine shortlist (exact, or an inverted file above OAML_ANN_MIN_FACES), QAConv re-ranking
    of it, fusion, one row per subject; the best passes if it clears a threshold set for a stated false-positive
    identification rate at the gallery's current size (:mod:`model.openset`). The collection is resolved once,
    here, with the model version it is matched with: the probe is embedded by that model and searched in that
    collection as it was when the request came."""
    searched = await state.gallery.find(collection)
    model = state.engine.model_for(searched.version)
    _check_identify_threshold(model, threshold, searched)
    face = await find_face(state, photo, select, aligned)
    (feats,) = await state.engine.embed(face.crop[None], model.version)
    probe_gate(state, feats, face.detection, photo.field, model)
    return await _identify_face(state, model, searched, feats, face.detection, top_k, threshold)


#: The most faces of one group photo that `/identify` with ``face=all`` identifies (the largest first).
MAX_GROUP_FACES = 32


async def identify_all(
    state: AppState, photo: Photo, top_k: int, threshold: str | None, collection: str = DEFAULT_COLLECTION
) -> IdentifyAllResponse:
    """Every face of a group photo, each identified as :func:`identify` does one (largest first, at most
    :data:`MAX_GROUP_FACES`), with its box."""
    searched = await state.gallery.find(collection)
    model = state.engine.model_for(searched.version)
    _check_identify_threshold(model, threshold, searched)
    if photo.error is not None:
        raise photo.error
    try:
        # only these are refined and aligned, each holding a place in the queue (never more than it has)
        limit = min(MAX_GROUP_FACES, state.settings.queue_size)
        used, found = await state.engine.detect_all(photo.data, limit)
    except OAMLError as exc:
        raise with_field(exc, photo.field) from exc
    if not used:
        raise with_field(NoFaceError("no face found in the image"), photo.field)
    feats = await state.engine.embed(np.stack([f.crop for f in used]), model.version)
    results, skipped = [], []
    for face, f in zip(used, feats, strict=True):
        detection = detection_of(face)
        failure = probe_failure(state, f, detection, model)
        if failure is None:
            results.append(await _identify_face(state, model, searched, f, detection, top_k, threshold))
        else:
            skipped.append(SkippedFace(box=detection["box"], code=failure[0], reason=failure[1]))
    return IdentifyAllResponse(
        faces=results,
        skipped=skipped,
        faces_found=found,
        faces_identified=len(results),
        collection=collection,
        model_version=model.version,
    )


def identify_presets(served: ServedModel, faces: int) -> dict[str, IdentifyPresetInfo]:
    """/identify's presets with their thresholds for a collection of ``faces`` faces matched with ``served``."""
    model = served.calibration.identify_model
    return {
        name: IdentifyPresetInfo(fpir=fpir, threshold=round(model.threshold(fpir, max(faces, 1)), 5))
        for name, fpir in IDENTIFY_PRESETS.items()
    }


def _check_identify_threshold(model: ServedModel, threshold: str | None, searched: Collection) -> None:
    """A bad threshold is refused before any work (the decision then uses the size the search saw)."""
    try:
        model.resolve_identify_threshold(threshold, len(searched.index))
    except ValueError as exc:
        raise ApiError("VALIDATION_ERROR", str(exc), field="threshold") from exc


async def _identify_face(
    state: AppState,
    model: ServedModel,
    searched: Collection,
    feats: FaceFeatures,
    detection: dict[str, Any],
    top_k: int,
    threshold: str | None,
) -> IdentifyResponse:
    """Search one collection (matched with ``model``) for one face that model embedded, and decide (see
    :func:`identify`)."""
    engine = state.engine
    factor = OCCLUDED_SHORTLIST_FACTOR if feats.visibility < OCCLUDED_VISIBILITY else 1
    t0 = time.perf_counter()
    found = await engine.run_device(
        searched.index.search, feats.embedding, feats.feature_map, feats.occlusion, state.settings.shortlist * factor
    )
    faces, subjects = found["gallery_faces"], max(len(searched.names), 1)
    thr, preset, fpir = model.resolve_identify_threshold(threshold, faces)
    cal = model.calibration
    fused = cal.score_found(found, feats.visibility, feats.norm)
    best: dict[str, int] = {}
    for i, subject in enumerate(found["subjects"]):
        if subject not in best or fused[i] > fused[best[subject]]:
            best[subject] = i
    ranked = sorted(best.items(), key=lambda kv: -fused[kv[1]])
    # a subject's evidence for the posterior is the mean likelihood ratio over all its enrolled faces (those not
    # shortlisted count as ~0): the best of k faces would make a stranger look k times likelier to be someone
    # enrolled more often
    evidence = {s: np.logaddexp.reduce(fused[[i for i, x in enumerate(found["subjects"]) if x == s]]) for s in best}
    log_lr = np.array([evidence[s] - np.log(max(found["subject_faces"].get(s, 1), 1)) for s, _ in ranked])
    probs, unknown = posterior(log_lr, subjects)
    candidates = [
        Candidate(
            subject=s,
            name=searched.names.get(s),
            face_id=found["face_ids"][i],
            score=round(float(fused[i]), 5),
            probability=round(float(p), 5),
            scores=ScoreBreakdown(
                adaface=round(float(found["cosine"][i]), 5),
                qaconv=round(float(found["qaconv"][i]), 5),
                weights={
                    k: round(v, 4)
                    for k, v in cal.weights(
                        min(float(found["visibility"][i]), feats.visibility), min(float(found["norm"][i]), feats.norm)
                    ).items()
                },
            ),
            adaface=round(float(found["cosine"][i]), 5),
            qaconv=round(float(found["qaconv"][i]), 5),
            match=bool(fused[i] > thr),
        )
        for (s, i), p in zip(ranked[:top_k], probs[:top_k], strict=True)
    ]
    timings = {k: round(v, 3) for k, v in found["ms"].items()}
    timings["matching"] = round(1000 * (time.perf_counter() - t0), 3)
    return IdentifyResponse(
        match=candidates[0] if candidates and candidates[0].match else None,
        candidates=candidates,
        threshold=round(thr, 5),
        threshold_preset=preset,
        fpir=float(f"{fpir:.4g}"),
        threshold_probability=round(float(posterior(np.array([thr]), subjects)[0][0]), 5),
        probability_unknown=round(unknown, 5),
        probability_prior=IDENTIFY_PRIOR,
        face=face_info(model, feats, detection),
        collection=searched.name,
        gallery_faces=faces,
        gallery_subjects=len(searched.names),
        timings_ms=timings,
        model_version=model.version,
    )
