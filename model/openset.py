"""Open-set identification: thresholds that mean a stated false-positive identification rate at any gallery size.

A 1:1 threshold bounds the false-accept rate of *one* comparison. ``/identify`` compares a probe
with every enrolled face and keeps the best, so with a 1:1 threshold the chance that a stranger
is matched to *someone* grows with the gallery: roughly ``1 - (1 - FAR)^N`` for independent
impostors. NIST's 1:N evaluations (FRVT/FRTE 1:N) measure instead the false-positive
identification rate (FPIR: the share of strangers matched to anyone) and the detection and
identification rate (DIR: enrolled people matched to themselves) at a stated FPIR.

The model. A stranger's fused scores against the gallery are impostor scores, but not independent
draws from one distribution: some probes score high against everybody (a "wolf": glasses, a
blurred photo), others low. So each probe ``p`` gets its own impostor distribution, Gaussian with
mean ``mu_p`` and spread ``sigma_p``, and the population of probes is kept as a sample of
``(mu_p, sigma_p)`` pairs fitted on identities the model never trained on (``oaml
calibrate-identify``). With ``N`` enrolled faces, treated as independent draws given the probe,

    FPIR(t, N) = mean_p [ 1 - Phi((t - mu_p) / sigma_p) ** N ]

which grows with ``N`` as the best of ``N`` impostors does, and never faster than the
independent-impostor bound. A preset is an FPIR target; its score threshold is the ``t`` solving
``FPIR(t, N) = target`` for the gallery's current size, re-derived as it grows or shrinks. The
shortlist only ever scores fewer faces than ``N``, so the bound holds with it too.

Weights calibrated before this existed get the independent-impostor model implied by their 1:1
presets (one Gaussian through the FAR 1e-2, 1e-3 and 1e-4 thresholds): conservative, since probe
effects make the best of N grow more slowly than independence would.

The posterior. Each candidate's ``probability`` is P(the probe is this subject | the scores of the
candidates) for a probe that is enrolled with prior :data:`IDENTIFY_PRIOR`, uniformly among the
``S`` enrolled subjects, with each fused score read as a log likelihood ratio (what the calibrated
logit is) and a subject's likelihood ratio the mean over its ``k`` enrolled faces (faces not
scored count as nothing: the best of ``k`` would make a subject with many photos look likelier):

    P(i) = (prior / S) * LR_i / ((1 - prior) + (prior / S) * sum_j LR_j),
    LR_i = (1 / k_i) * sum over i's scored faces of exp(score)

summed over the subjects actually scored (the shortlist; the rest, far below it in cosine, add
little). ``probability_unknown`` is the rest: P(the probe is nobody enrolled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["IDENTIFY_PRESETS", "IDENTIFY_PRIOR", "OpenSetModel", "posterior"]

#: Named open-set operating points: preset -> false-positive identification rate (strangers matched to anyone).
IDENTIFY_PRESETS: dict[str, float] = {"lenient": 1e-2, "balanced": 1e-3, "strict": 1e-4}

#: P(the probe is an enrolled person) before looking at the scores, under which candidates' probabilities hold.
IDENTIFY_PRIOR = 0.5

#: Probes kept in a fitted model (their (mu, sigma) pairs): enough for FPIR down to ~1e-4 at any N.
MAX_PROBES = 2000


def _log_sf(z: np.ndarray) -> np.ndarray:
    """log(1 - Phi(z)) per element, accurate far into the tail (torch's log_ndtr of -z, in float64)."""
    return torch.special.log_ndtr(-torch.as_tensor(z, dtype=torch.float64)).numpy()


@dataclass
class OpenSetModel:
    """The stranger population: per-probe impostor score distributions, and what they say about the best of N.

    Each probe's impostor scores are ``mu_p + sigma_p * z`` with ``z`` drawn from one standardised
    residual distribution shared by all probes: the empirical one where the calibration data reach
    (``residual``: ``z`` and ``log P(Z > z)`` on a grid), beyond it an exponential tail
    (``log P(Z > z) = log_s0 - rate * (z - z0)``, the generalised Pareto tail of shape 0 that scores
    of this kind follow; measured face-score tails are far heavier than a Gaussian's). Without a
    residual (a model made from 1:1 presets) ``z`` is standard normal.

    Attributes:
        mu, sigma: one pair per calibration probe (fused-score units).
        residual: ``{"z": [...], "log_sf": [...], "z0", "log_s0", "rate"}``, or None for a Gaussian.
        source: how the model was made (``fitted`` on held-out probes, or ``from_pairwise`` presets).
        validation: the fit's own check (measured against modelled FPIR), when fitted.
    """

    mu: list[float]
    sigma: list[float]
    residual: dict[str, Any] | None = None
    source: str = "fitted"
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.mu or len(self.mu) != len(self.sigma):
            raise ValueError("an open-set model needs one (mu, sigma) per probe, at least one")
        self._mu = np.asarray(self.mu, dtype=np.float64)
        self._sigma = np.asarray(self.sigma, dtype=np.float64)
        if not (np.isfinite(self._mu).all() and np.isfinite(self._sigma).all() and (self._sigma > 0).all()):
            raise ValueError("an open-set model needs finite means and positive spreads")
        if self.residual is not None:
            r = self.residual
            z, log_sf = np.asarray(r["z"], dtype=np.float64), np.asarray(r["log_sf"], dtype=np.float64)
            numbers = np.r_[z, log_sf, r["z0"], r["log_s0"], r["rate"]]
            if (
                not np.isfinite(numbers).all()
                or len(z) != len(log_sf)
                or len(z) < 2
                or np.any(np.diff(z) < 0)
                or np.any(np.diff(log_sf) > 0)
                or log_sf.max() > 0
                or not r["rate"] > 0
            ):
                raise ValueError("an open-set model's residual is malformed (grid, survival or tail rate)")
        self._cache: dict[tuple[float, int], float] = {}

    def log_sf(self, z: np.ndarray) -> np.ndarray:
        """log P(Z > z) of the standardised residual."""
        if self.residual is None:
            return _log_sf(z)
        r = self.residual
        z = np.asarray(z, dtype=np.float64)
        body = np.interp(z, r["z"], r["log_sf"], left=0.0, right=r["log_s0"])
        tail = r["log_s0"] - r["rate"] * (z - r["z0"])
        return np.minimum(np.where(z > r["z0"], tail, body), 0.0)

    def fpir(self, threshold: float, n: int) -> float:
        """Modelled share of strangers whose best score over ``n`` gallery faces exceeds ``threshold``."""
        if n <= 0:
            return 0.0
        log_sf = self.log_sf((threshold - self._mu) / self._sigma)  # log P(one impostor > t), per probe
        # P(best of n <= t) = (1 - sf)^n = exp(n * log1p(-sf)); FPIR = 1 - that, kept accurate when tiny
        log_none = n * np.log1p(-np.minimum(np.exp(log_sf), 1.0 - 1e-16))
        return float(np.mean(-np.expm1(log_none)))

    def threshold(self, fpir: float, n: int) -> float:
        """The fused-score threshold at which the modelled FPIR over ``n`` faces is ``fpir`` (cached)."""
        if not 0.0 < fpir < 1.0:
            raise ValueError(f"an FPIR target is in (0, 1), got {fpir}")
        key = (fpir, max(int(n), 1))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if len(self._cache) > 4096:
            self._cache.clear()
        lo, hi = float(np.min(self._mu) - 10 * np.max(self._sigma)), float(np.max(self._mu))
        step = 10 * float(np.max(self._sigma))
        for _ in range(60):  # heavy tails: widen until the target is inside (validated tails end it)
            if not self.fpir(hi, key[1]) > fpir:
                break
            hi, step = hi + step, 2 * step
        else:
            raise ValueError(f"no threshold reaches FPIR {fpir} over {n} faces: the model's tail is malformed")
        for _ in range(100):  # FPIR falls as the threshold rises: bisect
            mid = 0.5 * (lo + hi)
            if self.fpir(mid, key[1]) > fpir:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-6:
                break
        self._cache[key] = hi
        return hi

    def to_dict(self) -> dict[str, Any]:
        return {
            "mu": [round(v, 5) for v in self.mu],
            "sigma": [round(v, 5) for v in self.sigma],
            "residual": self.residual,
            "source": self.source,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OpenSetModel:
        return cls(
            [float(v) for v in raw["mu"]],
            [float(v) for v in raw["sigma"]],
            raw.get("residual"),
            str(raw.get("source", "fitted")),
            dict(raw.get("validation") or {}),
        )

    @classmethod
    def from_pairwise(cls, thresholds: dict[str, float], fars: dict[str, float]) -> OpenSetModel:
        """Independent impostors: one Gaussian through the 1:1 presets' (FAR, threshold) points (least squares
        on the normal quantiles), for weights without a fitted open-set model."""
        names = [k for k in fars if k in thresholds]
        z = np.array([_normal_quantile(1.0 - fars[k]) for k in names])
        t = np.array([thresholds[k] for k in names])
        if len(names) >= 2 and np.ptp(z) > 0:
            sigma, mu = np.polyfit(z, t, 1)
        else:
            mu, sigma = float(t.mean() - 3.0), 1.0
        return cls([float(mu)], [float(max(sigma, 1e-3))], source="from_pairwise")


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF by bisection on erf (no scipy in the serving core)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def posterior(scores: np.ndarray, subjects: int, prior: float = IDENTIFY_PRIOR) -> tuple[np.ndarray, float]:
    """P(the probe is each candidate subject) and P(it is nobody enrolled), from the candidates' fused scores
    (log likelihood ratios), for a probe enrolled with ``prior``, uniformly among ``subjects`` subjects."""
    s = np.asarray(scores, dtype=np.float64)
    if subjects <= 0 or s.size == 0:
        return np.zeros_like(s), 1.0
    # in log space: weights log(prior / S) + s_i against log(1 - prior)
    logs = np.append(math.log(prior / subjects) + s, math.log(1.0 - prior))
    peak = logs.max()
    w = np.exp(logs - peak)
    w /= w.sum()
    return w[:-1], float(w[-1])
