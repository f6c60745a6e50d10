"""Fitting and checking a calibration: fusion weights, preset thresholds, probability reliability.

``oaml calibrate`` fits :class:`model.calibration.Calibration` on labelled pairs of identities a
model never trained on, scored by the served path, and measures how true its probability is
(expected calibration error, in sample and cross-validated by identity). The service only
applies the result (:mod:`model.calibration`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.calibration import PRESETS, PRIOR, Calibration, log_norm, sigmoid
from model.openset import IDENTIFY_PRESETS, MAX_PROBES, OpenSetModel
from model.training.metrics import threshold_at_far

__all__ = [
    "wilson_interval",
    "fit_calibration",
    "fit_open_set",
    "open_set_check",
    "preset_rates",
    "reliability",
    "cross_validated_reliability",
    "draw_reliability",
    "export_check",
    "logistic_fit",
]


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Class-balanced L2-regularised logistic regression by Newton's method."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    pos = y.mean()
    sample_w = np.where(y > 0, 0.5 / max(pos, 1e-9), 0.5 / max(1 - pos, 1e-9))
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = sigmoid(xb @ w)
        grad = xb.T @ (sample_w * (p - y)) / n + reg * w
        hess = (xb * (sample_w * p * (1 - p))[:, None]).T @ xb / n + np.diag(reg)
        step = np.linalg.solve(hess + 1e-9 * np.eye(d + 1), grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def fit_calibration(
    cos: np.ndarray, qa: np.ndarray, visibility: np.ndarray, same: np.ndarray, norm: np.ndarray | None = None
) -> Calibration:
    """Fit standardisation, fusion weights and preset thresholds on labelled pairs: the visibility form, or with
    ``norm`` (each pair's lower feature norm) the quality form (:mod:`model.calibration`).

    The scores must come from the served path (:class:`model.embedder.Embedder`): thresholds are
    quantiles of this very distribution.
    """
    cos, qa, visibility = (np.asarray(a, dtype=np.float64) for a in (cos, qa, visibility))
    logs = None if norm is None else log_norm(norm)
    same = np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("calibration needs genuine and impostor pairs")
    imp = ~same
    cal = Calibration(
        cos_mean=float(cos[imp].mean()),
        cos_std=float(max(cos[imp].std(), 1e-6)),
        qa_mean=float(qa[imp].mean()),
        qa_std=float(max(qa[imp].std(), 1e-6)),
        coef=[0.0] * (4 if logs is None else 7),
        intercept=0.0,
        fitted=True,
        pairs=int(len(same)),
        norm_mean=None if logs is None else float(logs.mean()),
        norm_std=None if logs is None else float(max(logs.std(), 1e-6)),
    )
    coef, intercept = logistic_fit(cal.features(cos, qa, visibility, norm), same.astype(np.float64))
    cal.coef, cal.intercept = [float(c) for c in coef], intercept
    fused = cal.score(cos, qa, visibility, norm)
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
        table.append(
            {
                "bin": [b / bins, (b + 1) / bins],
                "mean_probability": conf,
                "genuine_fraction": frac,
                "weight": weight,
                "pairs": int(m.sum()),
            }
        )
    return {"ece": float(ece), "prior": prior, "bins": table, "pairs": int(len(p))}


def cross_validated_reliability(
    cos: np.ndarray,
    qa: np.ndarray,
    visibility: np.ndarray,
    same: np.ndarray,
    identity_a: np.ndarray,
    identity_b: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    norm: np.ndarray | None = None,
) -> dict[str, Any]:
    """Reliability of probabilities on identities the fit never saw (the quality form with ``norm``).

    Identities are dealt into ``folds`` groups; for each, the calibration is fitted on pairs that
    involve none of the group's identities and applied to pairs whose first face is in it. The
    in-sample ECE flatters a fit; this one is what a new person's pair can expect.
    """
    ids = np.unique(np.r_[identity_a, identity_b])
    group = dict(zip(ids.tolist(), np.random.default_rng([seed, 23]).permutation(len(ids)) % folds, strict=True))
    ga = np.array([group[i] for i in identity_a.tolist()])
    gb = np.array([group[i] for i in identity_b.tolist()])
    prob = np.full(len(same), np.nan)
    for f in range(folds):
        train = (ga != f) & (gb != f)
        test = ga == f
        if not test.any() or same[train].all() or not same[train].any():
            continue  # too few identities for this fold (tiny sets): its pairs go unscored
        fit_norm = None if norm is None else norm[train]
        cal = fit_calibration(cos[train], qa[train], visibility[train], same[train], fit_norm)
        prob[test] = cal.probability(
            cal.score(cos[test], qa[test], visibility[test], None if norm is None else norm[test])
        )
    keep = ~np.isnan(prob)
    report = (
        reliability(prob[keep], same[keep])
        if keep.any()
        else {"ece": float("nan"), "bins": [], "pairs": 0, "prior": PRIOR}
    )
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


def export_check(
    cal: Calibration, reference: dict[str, np.ndarray], served: dict[str, np.ndarray], served_as: dict[str, Any]
) -> dict[str, Any]:
    """Fused-score drift and per-preset TAR/FAR on the same labelled pairs, reference vs served.

    ``reference`` is :func:`model.training.evaluate.validation_scores` of the fp32 weights computed in fp32;
    ``served`` the same pairs through the served path (the exported weights' precision and the
    service's autocast, ``served_as``). The calibration is fitted on ``served``; this says how far
    the numbers would move on a device that serves at full precision.
    """
    a = cal.score(reference["cos"], reference["qa"], reference["visibility"], reference.get("norm"))
    b = cal.score(served["cos"], served["qa"], served["visibility"], served.get("norm"))
    same = reference["same"]
    report: dict[str, Any] = {
        "served_as": served_as,
        "pairs": int(len(same)),
        "max_abs_fused_diff": float(np.abs(a - b).max()),
    }
    for name, t in cal.thresholds.items():
        report[name] = {
            "tar_reference": float((a[same] > t).mean()),
            "tar_served": float((b[same] > t).mean()),
            "far_reference": float((a[~same] > t).mean()),
            "far_served": float((b[~same] > t).mean()),
        }
    return report


def fit_open_set(rows: list[np.ndarray], seed: int = 0, tail_fraction: float = 1e-3) -> OpenSetModel:
    """The stranger population from each probe's impostor fused scores.

    Each probe is standardised by its own mean and spread (probe effects: some strangers score high
    against everybody); the standardised scores of all probes, pooled, give the shared residual
    distribution: empirical down to the ``tail_fraction`` of them that lie highest, an exponential tail
    fitted to those beyond (its maximum-likelihood rate). Up to :data:`~model.openset.MAX_PROBES`
    probes' (mean, spread) are kept.
    """
    rows = [np.asarray(r, dtype=np.float64) for r in rows if len(r) >= 10]
    if not rows:
        raise ValueError("an open-set fit needs probes with at least 10 impostor scores each")
    mu = np.array([r.mean() for r in rows])
    sigma = np.array([max(r.std(ddof=1), 1e-6) for r in rows])
    z = np.sort(np.concatenate([(r - m) / s for r, m, s in zip(rows, mu, sigma, strict=True)]))
    n = len(z)
    exceed = max(int(round(n * tail_fraction)), 50)
    z0 = float(z[n - exceed - 1])
    rate = 1.0 / max(float(np.mean(z[n - exceed :] - z0)), 1e-6)
    # the body: P(Z > z) at ~120 points from the tail's start (exceed of n above) down to the lowest score
    levels = np.unique(np.round(np.geomspace(exceed, n, 120)).astype(int))
    grid_z = z[n - levels][::-1]  # ascending z
    grid_log_sf = np.log(levels / n)[::-1]  # descending survival
    residual = {
        "z": [round(float(v), 5) for v in grid_z],
        "log_sf": [round(float(v), 6) for v in grid_log_sf],
        "z0": round(z0, 5),
        "log_s0": round(float(np.log(exceed / n)), 6),
        "rate": float(f"{rate:.6g}"),  # significant figures: a small rate must not round to 0
        "scores": int(n),
    }
    keep = np.sort(np.random.default_rng([seed, 31]).permutation(len(rows))[:MAX_PROBES])
    return OpenSetModel([float(mu[i]) for i in keep], [float(sigma[i]) for i in keep], residual)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def open_set_check(rows: list[np.ndarray], identities: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """How the model's FPIR compares with the measured one on strangers it was not fitted on.

    The probes are split by identity (a person's photos all on one side): a model fitted on one half
    sets, for gallery sizes up to what the rows allow and FPIR targets from 0.2 down to the presets,
    its thresholds; on the other half, the share of probes whose best of ``n`` impostor scores (a random
    ``n`` of their row) exceeds them is counted, with its 95% Wilson interval. A target is ``measurable``
    when at least 10 false positives are expected; below that the count says little. Also the pooled
    standardised tail against a Gaussian's, which shows why the tail is modelled.
    """
    rng = np.random.default_rng([seed, 37])
    people = np.unique(identities)
    fit_people = set(rng.permutation(people)[: len(people) // 2].tolist())
    fit_half = [r for r, who in zip(rows, identities.tolist(), strict=True) if who in fit_people]
    check_half = [r for r, who in zip(rows, identities.tolist(), strict=True) if who not in fit_people]
    model = fit_open_set(fit_half, seed)
    width = min(len(r) for r in check_half)
    sizes = sorted({n for n in (1, 10, 50, 100, width) if n <= width})
    targets = [0.2, 0.1, 0.05, *IDENTIFY_PRESETS.values()]
    table = []
    for n in sizes:
        best = np.array([np.max(r[rng.permutation(len(r))[:n]]) for r in check_half])
        for target in targets:
            t = model.threshold(target, n)
            hits = int((best > t).sum())
            low, high = wilson_interval(hits, len(best))
            table.append({"n": n, "fpir_target": target, "threshold": round(t, 4), "strangers": len(best),
                          "false_positives": hits, "fpir_measured": hits / len(best),
                          "interval_95": [round(low, 6), round(high, 6)],
                          "measurable": target * len(best) >= 10})  # fmt: skip
    z = np.concatenate([(r - r.mean()) / max(r.std(ddof=1), 1e-6) for r in rows])
    from math import erfc, sqrt

    tail = [
        {"z": k, "measured": float((z > k).mean()), "gaussian": 0.5 * erfc(k / sqrt(2.0))} for k in (2.0, 3.0, 4.0, 5.0)
    ]
    return {"probes_fitted": len(fit_half), "probes_checked": len(check_half), "split": "by identity",
            "gallery_per_probe": width, "fpir": table, "tail": tail}  # fmt: skip
