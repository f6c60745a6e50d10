"""Identity hygiene: subjects that are probably the same person, and subjects whose own faces disagree.

A gallery fed from many sources collects both mistakes: one person enrolled twice under two ids (a lookalike
pair that ``/identify`` will confuse forever), and two people under one id (a subject that matches strangers).
:func:`review` finds both with the collection's own model and thresholds:

- **Duplicates**: every face (or a sample of :data:`MAX_PROBES` faces in a larger collection) is searched as
  ``/identify`` searches (its own face left out); a pair of different subjects whose best cross score passes
  ``/identify``'s threshold (a preset's FPIR at the collection's size) is listed with that score and the two
  faces: probably one person (merge them: ``POST /gallery/{subject}/merge``).
- **Mixed subjects**: a subject with two faces or more whose least similar pair of its own faces scores below
  the 1:1 ``lenient`` threshold (FAR 1e-2: two photos of one person that would not even pass that) is listed
  with that pair (every such subject, or a sample of :data:`MAX_PROBES` of them): probably two people (split
  them: ``POST /gallery/{subject}/faces/move``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.gallery import Collection
from service.models import ServedModel
from service.store import FaceRecord, GalleryStore

__all__ = ["review", "MAX_PROBES"]

#: Faces searched as probes, and subjects checked for mixed faces (a sample beyond this many).
MAX_PROBES = 5000

#: Faces read from the store at a time (bounded memory however large the collection).
PAGE = 256


def _features(faces: list[FaceRecord]) -> Any:
    from model.embedder import Features

    return Features(
        torch.from_numpy(np.stack([f.embedding for f in faces])),
        torch.tensor([f.norm for f in faces], dtype=torch.float32),
        torch.from_numpy(np.stack([f.occlusion for f in faces])),
        torch.from_numpy(np.stack([f.feature_map.astype(np.float32) for f in faces])),
    )


def _sample(items: list[str], rng: np.random.Generator) -> list[str]:
    if len(items) <= MAX_PROBES:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), MAX_PROBES, replace=False).tolist())]


def review(
    held: Collection,
    store: GalleryStore,
    name: str,
    model: ServedModel,
    threshold: float,
    shortlist: int = 20,
    limit: int = 100,
) -> dict[str, Any]:
    """Suspected duplicates (pairs of subjects passing ``threshold``) and mixed subjects of collection ``name``.

    Faces are read from ``store`` at the model's version a page at a time (the index folds visibility into its
    maps, so a probe's own data comes from the store), so memory stays bounded at any size. Runs in a thread of
    its own (not the store's read pool: a large collection takes minutes); every search takes the index's lock
    for its own moment only."""
    rng = np.random.default_rng(0)
    face_ids, own_faces = held.index.members()
    probes = _sample(face_ids, rng)
    versions = {name: model.version}
    pairs: dict[tuple[str, str], tuple[float, str, str]] = {}
    for start in range(0, len(probes), PAGE):
        for face in store.faces_by_id(probes[start : start + PAGE], versions):
            found = held.index.search(
                torch.from_numpy(face.embedding),
                torch.from_numpy(face.feature_map.astype(np.float32)),
                torch.from_numpy(face.occlusion),
                shortlist + 1,
            )
            if not found["face_ids"]:
                continue
            fused = model.calibration.score_found(found, float(face.occlusion.mean()), face.norm)
            for fid, subject, score in zip(found["face_ids"], found["subjects"], fused, strict=True):
                if subject == face.subject or score <= threshold:
                    continue
                key = (min(face.subject, subject), max(face.subject, subject))
                if score > pairs.get(key, (-np.inf, "", ""))[0]:
                    ends = (face.face_id, fid) if key[0] == face.subject else (fid, face.face_id)
                    pairs[key] = (float(score), *ends)
    duplicates = [
        {"subjects": list(k), "score": round(v[0], 4), "faces": [v[1], v[2]]}
        for k, v in sorted(pairs.items(), key=lambda kv: -kv[1][0])
    ]
    lenient = float(model.calibration.thresholds["lenient"])
    several = _sample(sorted(s for s, n in own_faces.items() if n >= 2), rng)
    mixed: list[dict[str, Any]] = []
    for subject in several:
        own = store.faces_of(subject, name, model.version)
        if len(own) < 2:  # deleted, or faces moved, since the index was read
            continue
        ia, ib = np.triu_indices(len(own), 1)
        scores = model.score(_features(own), _features(own), ia, ib)["fused"]
        worst = int(np.argmin(scores))
        if scores[worst] < lenient:
            mixed.append(
                {
                    "subject": subject,
                    "faces": len(own),
                    "lowest_score": round(float(scores[worst]), 4),
                    "pair": [own[ia[worst]].face_id, own[ib[worst]].face_id],
                }
            )
    mixed.sort(key=lambda m: m["lowest_score"])
    return {
        "faces": len(face_ids),
        "probes": len(probes),
        "duplicates": duplicates[:limit],
        "duplicates_found": len(duplicates),
        "mixed": mixed[:limit],
        "mixed_found": len(mixed),
        "mixed_subjects_checked": len(several),
        "mixed_threshold": round(lenient, 4),
    }
