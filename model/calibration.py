"""Score fusion and calibration: AdaFace cosine + occlusion-weighted QAConv -> one score and a probability.

The two matchers live on different scales (cosine in [-1, 1], QAConv an unbounded logit), so each
is first standardised by its *impostor* statistics (``z = (s - mean_imp) / std_imp``). The fused
score is a logistic-regression logit over

    [z_cos, z_qa, z_cos * (1 - v), z_qa * (1 - v)]

where ``v`` is the mean visibility of the less visible face of the pair. The visibility terms let
the fit shift weight from the global cosine to QAConv's visible-region matching as faces get
occluded.

The **quality form** (``oaml calibrate --fusion quality``) adds the pair's quality: with ``n`` the
lower AdaFace feature norm of the two faces (the less certain one; AdaFace's norm is its image-quality
signal, as in QMagFace), standardised on a log scale as ``z_n``, the features gain

    [z_n, z_cos * z_n, z_qa * z_n]

so that the fit can ask for less cosine from a degraded face and more from a clear one, instead of one
threshold for both. A calibration of this form needs each pair's norms wherever it scores
(:attr:`Calibration.uses_quality`); the stored faces keep theirs.

Thresholds for the named presets are the fused scores at which the impostor pairs of the calibration
set reach FAR 1e-2 (``lenient``), 1e-3 (``balanced``) and 1e-4 (``strict``).

Probability. The logistic fit weights genuine and impostor pairs equally, so
``probability = sigmoid(score)`` estimates P(same person | scores) for a pair drawn with a 1:1
prior (:data:`PRIOR`): half of all compared pairs genuine. It is a statement about the pair, not
an operating point: the presets ask for far more evidence than 0.5 (``balanced``, FAR 1e-3, sits
near probability 0.99), so a pair can be more likely the same person than not and still be
refused by a strict threshold. ``probability_at`` turns a threshold into the probability it
demands, so a response can show both on one scale. :func:`reliability` measures how true the
probability is (expected calibration error, cross-validated by identity in ``oaml calibrate``).

Fitted on identities held out of training (never on the benchmark) by ``oaml calibrate``
(:mod:`model.training.calibrate`), on scores computed by the served path (:mod:`model.embedder`),
and stored in the weights' metadata. :data:`DEFAULT_CALIBRATION` is used until a fit exists. This
module only applies a calibration: it is what the service needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from model.openset import OpenSetModel

__all__ = ["PRESETS", "PRIOR", "Calibration", "DEFAULT_CALIBRATION", "log_norm", "sigmoid"]

#: Named operating points: preset -> false-accept rate.
PRESETS: dict[str, float] = {"lenient": 1e-2, "balanced": 1e-3, "strict": 1e-4}

#: P(same person) before looking at the faces, under which ``probability`` is calibrated.
PRIOR = 0.5


def log_norm(norm: np.ndarray | float) -> np.ndarray:
    """The quality form's scale for a feature norm (its log; norms are positive, floored at 1e-6)."""
    return np.log(np.maximum(np.asarray(norm, dtype=np.float64), 1e-6))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


@dataclass
class Calibration:
    """Fusion weights, standardisation, probability map and preset thresholds."""

    cos_mean: float
    cos_std: float
    qa_mean: float
    qa_std: float
    coef: list[float]  # weights of [z_cos, z_qa, z_cos*(1-v), z_qa*(1-v)] (+ [z_n, z_cos*z_n, z_qa*z_n])
    intercept: float
    thresholds: dict[str, float] = field(default_factory=dict)  # preset -> fused-score threshold
    fitted: bool = False
    pairs: int = 0
    open_set: dict[str, Any] | None = None  # the stranger population for /identify (model.openset)
    # the quality form: mean and deviation of log(lower feature norm); None for the visibility form
    norm_mean: float | None = None
    norm_std: float | None = None

    def __post_init__(self) -> None:
        self._open_set: OpenSetModel | None = None
        if len(self.coef) != (7 if self.uses_quality else 4) or (self.norm_mean is None) != (self.norm_std is None):
            raise ValueError(f"a calibration of the {self.form} form with {len(self.coef)} weights")

    @property
    def form(self) -> str:
        """``quality`` or ``visibility`` (see the module's docstring)."""
        return "quality" if self.uses_quality else "visibility"

    @property
    def identify_model(self) -> OpenSetModel:
        """The open-set model behind /identify's thresholds: fitted (``oaml calibrate-identify``), or else the
        independent-impostor model implied by the 1:1 presets."""
        if self._open_set is None:
            self._open_set = (
                OpenSetModel.from_dict(self.open_set)
                if self.open_set
                else OpenSetModel.from_pairwise(self.thresholds, PRESETS)
            )
        return self._open_set

    @property
    def uses_quality(self) -> bool:
        """Whether this is the quality form: its scores need each pair's lower feature norm."""
        return self.norm_mean is not None

    def quality(self, norm: np.ndarray | float) -> np.ndarray:
        """``z_n``: the standardised log of a pair's lower feature norm (the quality form only)."""
        if self.norm_mean is None or self.norm_std is None:
            raise ValueError("this calibration is of the visibility form: it has no quality term")
        return (log_norm(norm) - self.norm_mean) / self.norm_std

    def features(
        self, cos: np.ndarray, qa: np.ndarray, visibility: np.ndarray, norm: np.ndarray | None = None
    ) -> np.ndarray:
        zc = (np.asarray(cos, dtype=np.float64) - self.cos_mean) / self.cos_std
        zq = (np.asarray(qa, dtype=np.float64) - self.qa_mean) / self.qa_std
        occ = 1.0 - np.clip(np.asarray(visibility, dtype=np.float64), 0.0, 1.0)
        columns = [zc, zq, zc * occ, zq * occ]
        if self.uses_quality:
            if norm is None:
                raise ValueError("this calibration weighs the pair's quality: pass its lower feature norm")
            zn = np.broadcast_to(self.quality(norm), zc.shape)
            columns += [zn, zc * zn, zq * zn]
        return np.stack(columns, axis=-1)

    def score(
        self, cos: np.ndarray, qa: np.ndarray, visibility: np.ndarray, norm: np.ndarray | None = None
    ) -> np.ndarray:
        """Fused score (a logit): higher = more likely the same person. ``norm``: each pair's lower feature
        norm (needed by the quality form, ignored by the visibility form)."""
        return self.features(cos, qa, visibility, norm) @ np.asarray(self.coef) + self.intercept

    def score_found(self, found: dict[str, Any], visibility: float, norm: float) -> np.ndarray:
        """Fused scores of one probe (its visibility and feature norm) against the enrolled faces an index search
        found (:meth:`service.index.GalleryIndex.search`: their cosine, QAConv, visibility and norm)."""
        return self.score(
            found["cosine"],
            found["qaconv"],
            np.minimum(found["visibility"], visibility),
            np.minimum(found["norm"], norm),
        )

    def probability(self, score: np.ndarray | float) -> np.ndarray:
        """P(same person) under the 1:1 :data:`PRIOR`; strictly increasing in the score."""
        return sigmoid(np.asarray(score, dtype=np.float64))

    def probability_at(self, threshold: float) -> float:
        """The probability a score must exceed to pass ``threshold``: ``match == probability > this``."""
        return float(self.probability(threshold))

    def weights(self, visibility: float, norm: float | None = None) -> dict[str, float]:
        """Effective weights on the standardised cosine and QAConv scores at a visibility (and, for the quality
        form, the pair's lower feature norm)."""
        occ = 1.0 - min(max(visibility, 0.0), 1.0)
        out = {"adaface": self.coef[0] + self.coef[2] * occ, "qaconv": self.coef[1] + self.coef[3] * occ}
        if self.uses_quality and norm is not None:
            zn = float(self.quality(norm))
            out["adaface"] += self.coef[5] * zn
            out["qaconv"] += self.coef[6] * zn
        return out

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        for optional in ("open_set", "norm_mean", "norm_std"):
            if raw.get(optional) is None:
                raw.pop(optional, None)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        """Build from stored metadata; keys that are not fields (e.g. ``source``) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


#: Documented default until ``oaml calibrate`` has run: equal weights on the z-scores, QAConv
#: gaining weight as visibility drops, impostor statistics typical of a trained IR model
#: (cosine 0.0 +- 0.1; QAConv logit standardised as is), thresholds at the one-sided normal
#: quantiles of the sum. Probabilities from it are not calibrated.
DEFAULT_CALIBRATION = Calibration(
    cos_mean=0.0,
    cos_std=0.1,
    qa_mean=0.0,
    qa_std=1.0,
    coef=[0.5, 0.5, -0.25, 0.25],
    intercept=-2.5,
    # impostor fused score ~ N(-2.5, 0.707) if both z-scores are independent standard normals
    thresholds={"lenient": -0.853, "balanced": -0.315, "strict": 0.130},
)
