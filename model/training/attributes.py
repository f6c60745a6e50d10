"""Fitting and measuring the occlusion attributes (``oaml calibrate-attributes``).

``mask_like`` reads the visibility of the lower face (:data:`model.attributes.REGIONS`). Its
threshold is fitted on training-side data, aligned caches of real masked faces and of clean
faces of identities the model never trained on, as the value that best separates them
(balanced accuracy); it is then measured on an evaluation set it never saw: photos with and
without real masks, detected and aligned as the service does (a photo without a detected face
counts as an error of the detector, reported apart). ``glasses_like`` and the per-region flags
keep the default 0.5: there is no labelled real set for them yet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from model.align import FacePipeline, load_image
from model.attributes import AttributeRules, region_visibility
from model.embedder import Embedder
from model.errors import OAMLError

__all__ = ["lower_face_visibility", "fit_mask_threshold", "evaluate_mask_photos", "calibrate_attributes"]

logger = logging.getLogger(__name__)


def _cache_crops(root: Path, limit: int, seed: int) -> np.ndarray:
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    pick = np.sort(np.random.default_rng([seed, 43]).permutation(len(rows))[:limit])
    return np.stack([load_image(root / rows[i]["path"]) for i in pick])


def lower_face_visibility(embedder: Embedder, crops: np.ndarray) -> np.ndarray:
    """The ``lower_face`` region's visibility of each aligned crop, as the served path predicts it."""
    maps = embedder(crops).occlusion.numpy()
    return np.array([region_visibility(m)["lower_face"] for m in maps])


def fit_mask_threshold(masked: np.ndarray, clean: np.ndarray) -> tuple[float, dict[str, float]]:
    """The lower-face visibility below which a face is ``mask_like``: the midpoint of the gap that gives the
    best balanced accuracy (true-positive rate on ``masked`` plus true-negative rate on ``clean``)."""
    candidates = np.unique(np.r_[masked, clean])
    best, best_t = -1.0, 0.5
    for a, b in zip(candidates[:-1], candidates[1:], strict=True):
        t = 0.5 * (a + b)
        score = float((masked < t).mean() + (clean >= t).mean())
        if score > best:
            best, best_t = score, t
    return float(best_t), {
        "tpr": float((masked < best_t).mean()),
        "fpr": float((clean < best_t).mean()),
        "balanced_accuracy": best / 2,
    }


def evaluate_mask_photos(
    embedder: Embedder, pipeline: FacePipeline, root: Path, rules: AttributeRules
) -> dict[str, Any]:
    """``mask_like`` on photos in ``root/mask`` and ``root/no_mask``: found, flagged, rates."""
    out: dict[str, Any] = {}
    for label in ("mask", "no_mask"):
        photos = sorted((root / label).glob("*.jpg"))
        crops, missing = [], 0
        for path in photos:
            try:
                crops.append(pipeline.align_one(load_image(path), "largest").crop)
            except OAMLError:
                missing += 1
        flagged = 0
        if crops:
            maps = embedder(np.stack(crops)).occlusion.numpy()
            flagged = int(sum(rules.describe(m)["mask_like"] for m in maps))
        out[label] = {"photos": len(photos), "no_face": missing, "faces": len(crops), "mask_like": flagged}
    masked, clean = out["mask"], out["no_mask"]
    out["tpr"] = masked["mask_like"] / max(masked["faces"], 1)  # of the masked faces found
    out["fpr"] = clean["mask_like"] / max(clean["faces"], 1)
    correct = masked["mask_like"] + (clean["faces"] - clean["mask_like"])
    out["accuracy"] = correct / max(masked["faces"] + clean["faces"], 1)
    out["accuracy_counting_no_face_as_wrong"] = correct / max(masked["photos"] + clean["photos"], 1)
    return out


def calibrate_attributes(
    embedder: Embedder,
    masked_cache: Path,
    clean_cache: Path,
    mask_photos: Path | None = None,
    pipeline: FacePipeline | None = None,
    limit: int = 3000,
    seed: int = 0,
) -> AttributeRules:
    """Fit ``mask_like``'s threshold on the caches, then measure it on ``mask_photos`` when given."""
    masked = lower_face_visibility(embedder, _cache_crops(masked_cache, limit, seed))
    clean = lower_face_visibility(embedder, _cache_crops(clean_cache, limit, seed))
    threshold, fit = fit_mask_threshold(masked, clean)
    measured: dict[str, Any] = {
        "mask_fit": {
            **fit,
            "masked": f"{len(masked)} faces of {masked_cache.name}",
            "clean": f"{len(clean)} faces of {clean_cache.name}",
        },
        "untested": "glasses_like and the per-region flags: no labelled real photos yet (threshold 0.5)",
    }
    rules = AttributeRules(mask_threshold=threshold, measured=measured)
    if mask_photos is not None and pipeline is not None:
        measured["mask_eval"] = {
            "set": mask_photos.name,
            **evaluate_mask_photos(embedder, pipeline, mask_photos, rules),
        }
    logger.info("mask_like below %.3f lower-face visibility: %s", threshold, measured)
    return rules
