"""1:1: two photos (``/verify``, ``/explain``), or a photo against an enrolled subject (``/gallery/{subject}/verify``).

Two photos are compared by the default weights; a photo against a subject by the weights its collection is
matched with, so that the subject's stored faces and the probe come from one model.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.align import FaceSelection
from model.calibration import PRESETS
from service.engine import FaceFeatures
from service.errors import SubjectHasNoFaces
from service.render import explanation_png
from service.schemas import (
    Correspondence,
    ExplainResponse,
    FaceEvidence,
    FaceInfo,
    OcclusionAttributes,
    Quality,
    ScoreBreakdown,
    SubjectVerifyResponse,
    VerifyResponse,
)
from service.state import AppState
from service.store import DEFAULT_COLLECTION
from service.usecases.common import (
    FoundFace,
    Photo,
    crop_jpeg,
    face_info,
    find_face,
    probe_gate,
    verify_threshold,
)

__all__ = ["PairRequest", "verify", "explain", "verify_subject", "EXPLAIN_LINES"]


@dataclass(frozen=True)
class _Pair:
    """What a verification computed: the answer, and the faces it came from."""

    response: VerifyResponse
    faces: tuple[FoundFace, FoundFace]
    features: tuple[FaceFeatures, FaceFeatures]


@dataclass(frozen=True)
class PairRequest:
    """What `/verify` and `/explain` ask: two photos, which face of each, the threshold, aligned or not."""

    a: Photo
    b: Photo
    threshold: str | None = None
    face_a: FaceSelection = "largest"
    face_b: FaceSelection = "largest"
    aligned: bool = False


async def _verify_pair(state: AppState, request: PairRequest) -> _Pair:
    engine = state.engine
    model = engine.models.default  # two photos, no gallery: the default weights decide
    thr, preset = verify_threshold(model, request.threshold)
    fa_face, fb_face = await asyncio.gather(
        find_face(state, request.a, request.face_a, request.aligned),
        find_face(state, request.b, request.face_b, request.aligned),
    )
    fa, fb = await engine.embed(np.stack([fa_face.crop, fb_face.crop]), model.version)
    probe_gate(state, fa, fa_face.detection, request.a.field, model)
    probe_gate(state, fb, fb_face.detection, request.b.field, model)
    s = await engine.run_device(engine.pair_scores, fa, fb, model.version)
    cal = model.calibration
    response = VerifyResponse(
        match=s["fused"] > thr,
        score=round(s["fused"], 5),
        probability=round(s["probability"], 5),
        threshold=round(thr, 5),
        threshold_probability=round(cal.probability_at(thr), 5),
        threshold_preset=preset,
        scores=ScoreBreakdown(
            adaface=round(s["adaface"], 5),
            qaconv=round(s["qaconv"], 5),
            weights={k: round(v, 4) for k, v in cal.weights(s["visibility"], s["norm"]).items()},
        ),
        face_a=face_info(model, fa, fa_face.detection),
        face_b=face_info(model, fb, fb_face.detection),
        model_version=model.version,
    )
    return _Pair(response, (fa_face, fb_face), (fa, fb))


async def verify_subject(
    state: AppState,
    subject: str,
    photo: Photo,
    threshold: str | None,
    select: FaceSelection,
    aligned: bool,
    collection: str = DEFAULT_COLLECTION,
) -> SubjectVerifyResponse:
    """1:1 against an enrolled subject ("is this Alice?"): the photo's face against each of the subject's faces,
    the best one decides. A preset keeps its false-accept rate for the subject as a whole: against ``k`` faces
    a stranger has ``k`` chances, so the 1:1 preset's threshold (what /verify uses, and this for one face) is
    raised by what the open-set model says ``k`` chances take. A number stays in score units. The collection's
    own model embeds the photo and decides."""
    engine, gallery = state.engine, state.gallery
    target = await gallery.find(collection)
    model = engine.model_for(target.version)
    verify_threshold(model, threshold)
    index = target.index
    record = await gallery.read(gallery.store.subject, subject, collection)  # 404 for an unknown subject
    faces = await gallery.read(gallery.store.faces_of, subject, collection, model.version)
    face = await find_face(state, photo, select, aligned)
    (feats,) = await engine.embed(face.crop[None], model.version)
    probe_gate(state, feats, face.detection, photo.field, model)
    s = await engine.run_device(
        index.score_faces, [f.face_id for f in faces], feats.embedding, feats.feature_map, feats.occlusion
    )
    if not s["face_ids"]:
        raise SubjectHasNoFaces(f"subject {subject!r} has no enrolled face to verify against")
    k = len(s["face_ids"])
    cal = model.calibration
    thr, preset = model.resolve_threshold(threshold)
    if preset is not None:  # the 1:1 preset's threshold, raised by what k chances instead of one take
        openset, far = cal.identify_model, PRESETS[preset]
        thr += openset.threshold(far, k) - openset.threshold(far, 1)
    else:
        far = cal.identify_model.fpir(thr, k)
    fused = cal.score_found(s, feats.visibility, feats.norm)
    best = int(np.argmax(fused))
    stored = next(f for f in faces if f.face_id == s["face_ids"][best])
    visibility, norm = min(float(s["visibility"][best]), feats.visibility), min(float(s["norm"][best]), feats.norm)
    return SubjectVerifyResponse(
        match=bool(fused[best] > thr),
        score=round(float(fused[best]), 5),
        probability=round(float(cal.probability(fused[best])), 5),
        threshold=round(thr, 5),
        threshold_probability=round(cal.probability_at(thr), 5),
        threshold_preset=preset,
        far=float(f"{far:.4g}"),
        scores=ScoreBreakdown(
            adaface=round(float(s["cosine"][best]), 5),
            qaconv=round(float(s["qaconv"][best]), 5),
            weights={key: round(v, 4) for key, v in cal.weights(visibility, norm).items()},
        ),
        face_a=face_info(model, feats, face.detection),
        face_b=FaceInfo(
            box=stored.box,
            landmarks=None,
            detection_score=stored.detection_score,
            quality=Quality(norm=round(stored.norm, 4), standardised=round(stored.quality, 4)),
            visibility=round(float(stored.occlusion.mean()), 4),
            visibility_map=np.round(stored.occlusion, 4).tolist(),
            occlusion=OcclusionAttributes(**model.card.attributes.describe(stored.occlusion)),
        ),
        subject=subject,
        collection=collection,
        name=record.name,
        face_id=stored.face_id,
        faces_compared=k,
        model_version=model.version,
    )


async def verify(state: AppState, request: PairRequest) -> VerifyResponse:
    """1:1: one face from each photo, fused score against the threshold."""
    return (await _verify_pair(state, request)).response


#: Lines drawn in the explanation picture: the probe locations that contribute most.
EXPLAIN_LINES = 12


async def explain(state: AppState, request: PairRequest, picture: bool) -> tuple[ExplainResponse, bytes | None]:
    """The verify answer and its evidence: crops, visibility maps, QAConv's correspondences and their shares.

    Returns the response and, when ``picture`` is asked for, the explanation PNG (also embedded in the
    response as a data URL).
    """
    pair = await _verify_pair(state, request)
    fa, fb = pair.features
    engine = state.engine
    why = await engine.run_device(engine.explain_pair, fa, fb)
    evidence = [
        _evidence(pair.faces[0].crop, fa, why.probe_match, why.probe_similarity, why.probe_weight, why.probe_shares),
        _evidence(
            pair.faces[1].crop, fb, why.gallery_match, why.gallery_similarity, why.gallery_weight, why.gallery_shares
        ),
    ]
    png = None
    if picture:
        r = pair.response
        strongest = np.argsort(-why.probe_shares.numpy())[:EXPLAIN_LINES]
        lines = [(int(s), int(why.probe_match[s]), float(why.probe_similarity[s])) for s in strongest]
        caption = [
            f"{'MATCH' if r.match else 'NO MATCH'}: fused score {r.score:.2f} vs threshold {r.threshold:.2f}"
            f" ({r.threshold_preset or 'custom'})",
            f"probability {r.probability:.3f} (a match needs more than {r.threshold_probability:.3f})",
            f"AdaFace cosine {r.scores.adaface:.3f}; QAConv {r.scores.qaconv:.2f}; visibility "
            f"{r.face_a.visibility:.2f} / {r.face_b.visibility:.2f}; lines: the {len(lines)} strongest local matches",
        ]
        png = await engine.run_cpu(
            explanation_png,
            pair.faces[0].crop,
            pair.faces[1].crop,
            fa.occlusion.numpy(),
            fb.occlusion.numpy(),
            lines,
            caption,
        )
    response = ExplainResponse(
        **pair.response.model_dump(),
        qaconv_bias=round(why.bias, 6),
        evidence_a=evidence[0],
        evidence_b=evidence[1],
        picture=("data:image/png;base64," + base64.b64encode(png).decode()) if png is not None else None,
    )
    return response, png


def _evidence(
    crop: np.ndarray, feats: FaceFeatures, match: Any, similarity: Any, weight: Any, shares: Any
) -> FaceEvidence:
    return FaceEvidence(
        crop="data:image/jpeg;base64," + base64.b64encode(crop_jpeg(crop)).decode(),
        visibility_map=np.round(feats.occlusion.numpy(), 4).tolist(),
        correspondences=[
            Correspondence(
                location=i,
                match=int(match[i]),
                similarity=float(similarity[i]),
                weight=float(weight[i]),
                share=float(shares[i]),
            )
            for i in range(len(shares))
        ],
    )
