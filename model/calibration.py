"""Score fusion and calibration: AdaFace cosine + occlusion-weighted QAConv -> one score and a probability.

The two matchers live on different scales (cosine in [-1, 1], QAConv an unbounded logit), so each
is first standardised by its *impostor* statistics (``z = (s - mean_imp) / std_imp``). The fused
score is a logistic-regression logit over

    [z_cos, z_qa, z_cos * (1 - v), z_qa * (1 - v)]

where ``v`` is the mean visibility of the less visible face of the pair. The visibility terms let
the fit shift weight from the global cosine to QAConv's visible-region matching as faces get
occluded. ``probability = sigmoid(score)``. Thresholds for the named presets are the fused scores
at which the impostor pairs of the calibration set reach FAR 1e-2 (``lenient``), 1e-3
(``balanced``) and 1e-4 (``strict``).

Fitted on the identity-disjoint validation split (never on the benchmark) by ``oaml calibrate``
and stored in the weights' metadata. :data:`DEFAULT_CALIBRATION` is used until a fit exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from model.metrics import threshold_at_far

__all__ = ["PRESETS", "Calibration", "DEFAULT_CALIBRATION", "fit_calibration", "export_check"]

#: Named operating points: preset -> false-accept rate.
PRESETS: dict[str, float] = {"lenient": 1e-2, "balanced": 1e-3, "strict": 1e-4}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


@dataclass
class Calibration:
    """Fusion weights, standardisation, probability map and preset thresholds."""

    cos_mean: float
    cos_std: float
    qa_mean: float
    qa_std: float
    coef: list[float]  # weights of [z_cos, z_qa, z_cos*(1-v), z_qa*(1-v)]
    intercept: float
    thresholds: dict[str, float] = field(default_factory=dict)  # preset -> fused-score threshold
    fitted: bool = False
    pairs: int = 0

    def features(self, cos: np.ndarray, qa: np.ndarray, visibility: np.ndarray) -> np.ndarray:
        zc = (np.asarray(cos, dtype=np.float64) - self.cos_mean) / self.cos_std
        zq = (np.asarray(qa, dtype=np.float64) - self.qa_mean) / self.qa_std
        occ = 1.0 - np.clip(np.asarray(visibility, dtype=np.float64), 0.0, 1.0)
        return np.stack([zc, zq, zc * occ, zq * occ], axis=-1)

    def score(self, cos: np.ndarray, qa: np.ndarray, visibility: np.ndarray) -> np.ndarray:
        """Fused score (a logit): higher = more likely the same person."""
        return self.features(cos, qa, visibility) @ np.asarray(self.coef) + self.intercept

    def probability(self, score: np.ndarray) -> np.ndarray:
        return _sigmoid(np.asarray(score, dtype=np.float64))

    def weights(self, visibility: float) -> dict[str, float]:
        """Effective weights on the standardised cosine and QAConv scores at a visibility."""
        occ = 1.0 - min(max(visibility, 0.0), 1.0)
        return {"adaface": self.coef[0] + self.coef[2] * occ, "qaconv": self.coef[1] + self.coef[3] * occ}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Class-balanced L2-regularised logistic regression by Newton's method."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    pos = y.mean()
    sample_w = np.where(y > 0, 0.5 / max(pos, 1e-9), 0.5 / max(1 - pos, 1e-9))
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (sample_w * (p - y)) / n + reg * w
        hess = (xb * (sample_w * p * (1 - p))[:, None]).T @ xb / n + np.diag(reg)
        step = np.linalg.solve(hess + 1e-9 * np.eye(d + 1), grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def fit_calibration(cos: np.ndarray, qa: np.ndarray, visibility: np.ndarray, same: np.ndarray) -> Calibration:
    """Fit standardisation, fusion weights and preset thresholds on labelled pairs."""
    cos, qa, visibility = (np.asarray(a, dtype=np.float64) for a in (cos, qa, visibility))
    same = np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("calibration needs genuine and impostor pairs")
    imp = ~same
    cal = Calibration(
        cos_mean=float(cos[imp].mean()),
        cos_std=float(max(cos[imp].std(), 1e-6)),
        qa_mean=float(qa[imp].mean()),
        qa_std=float(max(qa[imp].std(), 1e-6)),
        coef=[0.0, 0.0, 0.0, 0.0],
        intercept=0.0,
        fitted=True,
        pairs=int(len(same)),
    )
    coef, intercept = _logistic_fit(cal.features(cos, qa, visibility), same.astype(np.float64))
    cal.coef, cal.intercept = [float(c) for c in coef], intercept
    fused = cal.score(cos, qa, visibility)
    cal.thresholds = {name: threshold_at_far(fused[imp], far) for name, far in PRESETS.items()}
    return cal


def export_check(cal: Calibration, full: dict[str, np.ndarray], rounded: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """Fused-score drift and per-preset TAR/FAR on the same labelled pairs, full precision vs ``dtype``.

    ``full`` and ``rounded`` are :func:`model.evaluate.validation_scores` of the model and of its
    ``dtype``-rounded copy: what serving the exported file costs, in the units users see.
    """
    a = cal.score(full["cos"], full["qa"], full["visibility"])
    b = cal.score(rounded["cos"], rounded["qa"], rounded["visibility"])
    same = full["same"]
    report: dict[str, Any] = {"dtype": dtype, "pairs": int(len(same)), "max_abs_fused_diff": float(np.abs(a - b).max())}
    for name, t in cal.thresholds.items():
        report[name] = {
            "tar_float32": float((a[same] >= t).mean()), f"tar_{dtype}": float((b[same] >= t).mean()),
            "far_float32": float((a[~same] >= t).mean()), f"far_{dtype}": float((b[~same] >= t).mean()),
        }
    return report
