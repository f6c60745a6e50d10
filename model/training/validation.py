"""A training run's validation: fixed verification pairs of held-out people, clean and with one face occluded.

One definition serves the run's own curve (``epochs.csv``), the score of the weights it started from (its
baseline, the bar a release has to clear) and any other weights measured on the same people, so their numbers
compare. The people are the run's validation identities less those its initial weights trained on
(:mod:`model.training.lineage`); the pairs and the occluded copies are functions of the seed and of those faces,
and :attr:`ValidationSet.digest` names them, so a run notices when its validation changed under it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.embedder import Embedder, score_pairs
from model.training.metrics import accuracy, best_threshold
from model.training.occlusion import OcclusionAugmenter

if TYPE_CHECKING:
    from model.net import OAMLNet

__all__ = ["ValidationSet"]


@dataclass(frozen=True)
class ValidationSet:
    """Genuine and impostor pairs of the faces validated, and one fixed occluded copy of each face."""

    images: np.ndarray  # [N, 112, 112, 3] the clean faces
    occluded: np.ndarray  # [N, 112, 112, 3] each with one training occluder drawn on its landmarks
    pairs: np.ndarray  # [P, 2] positions into images; the second face is the occluded one in occluded pairs
    same: np.ndarray  # [P] bool
    identities: tuple[str, ...]  # the people validated (``cache/identity``)
    digest: str  # SHA-256 of the people, the pairs and the faces, clean and occluded: what the scores measured

    @classmethod
    def build(
        cls,
        images: np.ndarray,
        landmarks: np.ndarray,
        labels: np.ndarray,
        names: list[str],
        occluders: str | Path | None,
        seed: int,
        max_pairs: int,
    ) -> ValidationSet:
        """Pairs of ``images`` (labels index ``names``): up to ``max_pairs`` genuine and as many impostor ones,
        drawn from ``seed``; the occluded copies from ``occluders`` (seeded per face; None: the built-in
        synthetic occluders)."""
        rng = np.random.default_rng([seed, 11])
        genuine = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels)) if labels[i] == labels[j]]
        rng.shuffle(genuine)
        genuine = genuine[:max_pairs]
        impostor: set[tuple[int, int]] = set()
        _, counts = np.unique(labels, return_counts=True)
        cross = (len(labels) ** 2 - int((counts**2).sum())) // 2  # pairs of two people: the most there can be
        while len(impostor) < min(max_pairs, len(labels) * (len(labels) - 1) // 4, cross):
            i, j = rng.integers(0, len(labels), 2)
            if labels[i] != labels[j]:
                impostor.add((int(min(i, j)), int(max(i, j))))
        pairs = np.array(genuine + sorted(impostor), dtype=np.int64).reshape(-1, 2)
        same = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
        occluder = OcclusionAugmenter.from_folder(occluders, probability=1.0)
        occluded = (
            np.stack(
                [
                    occluder.occlude(images[n], landmarks[n], np.random.default_rng([seed, 13, n]))[0]
                    for n in range(len(images))
                ]
            )
            if len(images)
            else images.copy()
        )
        people = tuple(sorted({names[int(c)] for c in labels}))
        digest = hashlib.sha256(json.dumps({"identities": people, "seed": seed}).encode())
        for part in (pairs, same, images, occluded):  # bytes: another crop, occluder or machine's warp shows
            digest.update(np.ascontiguousarray(part).tobytes())
        return cls(images, occluded, pairs, same, people, digest.hexdigest())

    def score(self, model: OAMLNet, device: torch.device, precision: str) -> dict[str, float]:
        """Identity-disjoint verification on the served path (``precision``, no flip): clean pairs, and pairs
        whose second face is occluded.

        Score = mean best-threshold accuracy of (cosine clean, cosine occluded, QAConv occluded); NaN with
        nobody to validate.
        """
        if len(self.pairs) == 0:
            return {"score": float("nan"), "faces": float(len(self.images))}
        embed = Embedder(model, device=device, precision=precision, batch_size=64)
        clean = embed(self.images)
        occl = embed(self.occluded)
        a, b = self.pairs[:, 0], self.pairs[:, 1]
        cos_clean = (clean.embedding[a] * clean.embedding[b]).sum(1).numpy()
        occluded = score_pairs(model.qaconv, clean, occl, a, b)
        cos_occ, qa_occ = occluded.cos, occluded.qa
        result = {
            "acc_cos_clean": accuracy(cos_clean, self.same, best_threshold(cos_clean, self.same)),
            "acc_cos_occluded": accuracy(cos_occ, self.same, best_threshold(cos_occ, self.same)),
            "acc_qaconv_occluded": accuracy(qa_occ, self.same, best_threshold(qa_occ, self.same)),
            "visibility_clean": float(clean.occlusion.mean()),
            "visibility_occluded": float(occl.occlusion.mean()),
            "faces": float(len(self.images)),
        }
        result["score"] = float(
            np.mean([result["acc_cos_clean"], result["acc_cos_occluded"], result["acc_qaconv_occluded"]])
        )
        return result
