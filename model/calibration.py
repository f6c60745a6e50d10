"""Score fusion and calibration: AdaFace cosine + occlusion-weighted QAConv -> one score and a probability.

The two matchers live on different scales (cosine in [-1, 1], QAConv an unbounded logit), so each
is first standardised by its *impostor* statistics (``z = (s - mean_imp) / std_imp``). The fused
score is a logistic-regression logit over

    [z_cos, z_qa, z_cos * (1 - v), z_qa * (1 - v)]

where ``v`` is the mean visibility of the less visible face of the pair. The visibility terms let
the fit shift weight from the global cosine to QAConv's visible-region matching as faces get
occluded. Thresholds for the named presets are the fused scores at which the impostor pairs of
the calibration set reach FAR 1e-2 (``lenient``), 1e-3 (``balanced``) and 1e-4 (``strict``).

Probability. The logistic fit weights genuine and impostor pairs equally, so
``probability = sigmoid(score)`` estimates P(same person | scores) for a pair drawn with a 1:1
prior (:data:`PRIOR`): half of all compared pairs genuine. It is a statement about the pair, not
an operating point: the presets ask for far more evidence than 0.5 (``balanced``, FAR 1e-3, sits
near probability 0.99), so a pair can be more likely the same person than not and still be
refused by a strict threshold. ``probability_at`` turns a threshold into the probability it
demands, so a response can show both on one scale. :func:`reliability` measures how true the
probability is (expected calibration error, cross-validated by identity in ``oaml calibrate``).

Fitted on identities held out of training (never on the benchmark) by ``oaml calibrate``, on
scores computed by the served path (:mod:`model.embedder`), and stored in the weights' metadata.
:data:`DEFAULT_CALIBRATION` is used until a fit exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from model.metrics import threshold_at_far

__all__ = [
    "PRESETS",
    "PRIOR",
    "Calibration",
    "DEFAULT_CALIBRATION",
    "fit_calibration",
    "preset_rates",
    "reliability",
    "cross_validated_reliability",
    "draw_reliability",
    "export_check",
]

#: Named operating points: preset -> false-accept rate.
PRESETS: dict[str, float] = {"lenient": 1e-2, "balanced": 1e-3, "strict": 1e-4}

#: P(same person) before looking at the faces, under which ``probability`` is calibrated.
PRIOR = 0.5


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

    def probability(self, score: np.ndarray | float) -> np.ndarray:
        """P(same person) under the 1:1 :data:`PRIOR`; strictly increasing in the score."""
        return _sigmoid(np.asarray(score, dtype=np.float64))

    def probability_at(self, threshold: float) -> float:
        """The probability a score must exceed to pass ``threshold``: ``match == probability > this``."""
        return float(self.probability(threshold))

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
    """Fit standardisation, fusion weights and preset thresholds on labelled pairs.

    The scores must come from the served path (:class:`model.embedder.Embedder`): thresholds are
    quantiles of this very distribution.
    """
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


def preset_rates(cal: Calibration, fused: np.ndarray, same: np.ndarray) -> dict[str, dict[str, float]]:
    """TAR and FAR of the fused score at each preset threshold (accept when ``score > threshold``)."""
    fused, same = np.asarray(fused, dtype=np.float64), np.asarray(same, dtype=bool)
    out = {}
    for name, far in PRESETS.items():
        t = cal.thresholds[name]
        out[name] = {
            "far_target": far,
            "threshold": float(t),
            "tar": float((fused[same] > t).mean()),
            "far": float((fused[~same] > t).mean()),
            "genuine": int(same.sum()),
            "impostor": int((~same).sum()),
        }
    return out


def reliability(probability: np.ndarray, same: np.ndarray, bins: int = 10, prior: float = PRIOR) -> dict[str, Any]:
    """Expected calibration error and the reliability table of ``probability`` under ``prior``.

    Pairs are re-weighted so genuine pairs carry ``prior`` of the total weight and impostors the
    rest, whatever their counts: the probability claims P(same) under that prior, so its truth
    is measured under it. Bins are equal-width in probability; ECE is the weight-averaged
    absolute gap between the mean probability and the genuine fraction of each bin.
    """
    p, y = np.asarray(probability, dtype=np.float64), np.asarray(same, dtype=bool)
    w = np.where(y, prior / max(y.sum(), 1), (1 - prior) / max((~y).sum(), 1))
    which = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        weight = float(w[m].sum())
        if weight == 0:
            continue
        conf = float((w[m] * p[m]).sum() / weight)
        frac = float((w[m] * y[m]).sum() / weight)
        ece += weight * abs(frac - conf)
        table.append({"bin": [b / bins, (b + 1) / bins], "mean_probability": conf, "genuine_fraction": frac,
                      "weight": weight, "pairs": int(m.sum())})
    return {"ece": float(ece), "prior": prior, "bins": table, "pairs": int(len(p))}


def cross_validated_reliability(
    cos: np.ndarray, qa: np.ndarray, visibility: np.ndarray, same: np.ndarray,
    identity_a: np.ndarray, identity_b: np.ndarray, folds: int = 5, seed: int = 0,
) -> dict[str, Any]:
    """Reliability of probabilities on identities the fit never saw.

    Identities are dealt into ``folds`` groups; for each, the calibration is fitted on pairs that
    involve none of the group's identities and applied to pairs whose first face is in it. The
    in-sample ECE flatters a fit; this one is what a new person's pair can expect.
    """
    ids = np.unique(np.r_[identity_a, identity_b])
    group = dict(zip(ids.tolist(), np.random.default_rng([seed, 23]).permutation(len(ids)) % folds))
    ga = np.array([group[i] for i in identity_a.tolist()])
    gb = np.array([group[i] for i in identity_b.tolist()])
    prob = np.full(len(same), np.nan)
    for f in range(folds):
        train = (ga != f) & (gb != f)
        test = ga == f
        if not test.any() or same[train].all() or not same[train].any():
            continue  # too few identities for this fold (tiny sets): its pairs go unscored
        cal = fit_calibration(cos[train], qa[train], visibility[train], same[train])
        prob[test] = cal.probability(cal.score(cos[test], qa[test], visibility[test]))
    keep = ~np.isnan(prob)
    report = reliability(prob[keep], same[keep]) if keep.any() else {"ece": float("nan"), "bins": [], "pairs": 0, "prior": PRIOR}
    report["folds"] = folds  # ECE is NaN when no fold had both kinds of pairs to fit on
    return report


def draw_reliability(reports: dict[str, dict[str, Any]], path: str | Path, size: tuple[int, int] = (560, 560)) -> None:
    """Reliability diagram (genuine fraction against mean probability, one curve per report) as a PNG."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 40, w - 20, h - 60

    def xy(px: float, py: float) -> tuple[float, float]:
        return left + px * (right - left), bottom - py * (bottom - top)

    d.rectangle((left, top, right, bottom), outline="black")
    d.line((*xy(0, 0), *xy(1, 1)), fill=(160, 160, 160), width=1)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = xy(t, t)
        d.line((x, bottom, x, bottom + 5), fill="black")
        d.text((x - 10, bottom + 8), f"{t:.2f}", fill="black")
        d.line((left - 5, y, left, y), fill="black")
        d.text((left - 40, y - 6), f"{t:.2f}", fill="black")
    d.text((w // 2 - 70, h - 30), "probability (bin mean)", fill="black")
    d.text((left, 12), "genuine fraction under a 1:1 prior", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (label, rep) in enumerate(reports.items()):
        colour = colours[i % len(colours)]
        pts = [xy(b["mean_probability"], b["genuine_fraction"]) for b in rep["bins"]]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.text((left + 10, top + 10 + 14 * i), f"{label}: ECE {rep['ece']:.3f}", fill=colour)
    img.save(path)


def export_check(cal: Calibration, reference: dict[str, np.ndarray], served: dict[str, np.ndarray], served_as: dict[str, Any]) -> dict[str, Any]:
    """Fused-score drift and per-preset TAR/FAR on the same labelled pairs, reference vs served.

    ``reference`` is :func:`model.evaluate.validation_scores` of the fp32 weights computed in fp32;
    ``served`` the same pairs through the served path (the exported weights' precision and the
    service's autocast, ``served_as``). The calibration is fitted on ``served``; this says how far
    the numbers would move on a device that serves at full precision.
    """
    a = cal.score(reference["cos"], reference["qa"], reference["visibility"])
    b = cal.score(served["cos"], served["qa"], served["visibility"])
    same = reference["same"]
    report: dict[str, Any] = {"served_as": served_as, "pairs": int(len(same)), "max_abs_fused_diff": float(np.abs(a - b).max())}
    for name, t in cal.thresholds.items():
        report[name] = {
            "tar_reference": float((a[same] > t).mean()), "tar_served": float((b[same] > t).mean()),
            "far_reference": float((a[~same] > t).mean()), "far_served": float((b[~same] > t).mean()),
        }
    return report
