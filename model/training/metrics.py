"""Verification metrics on score lists: accuracy with fold-wise thresholds, ROC, AUC, TAR at FAR.

Convention: higher score = more likely the same person; a pair is accepted when its score is
strictly greater than the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "threshold_at_far",
    "tar_at_far",
    "roc_curve",
    "auc",
    "best_threshold",
    "accuracy",
    "FoldResult",
    "kfold_accuracy",
    "verification_report",
]


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """Smallest threshold that accepts at most ``far`` of the impostor scores."""
    imp = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    if imp.size == 0:
        raise ValueError("no impostor scores")
    allowed = int(np.floor(far * imp.size))
    if allowed >= imp.size:
        return float(imp[-1]) - 1e-12
    # accepting the `allowed` highest impostors means the threshold sits at the next one
    return float(imp[allowed])


def tar_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """True-accept rate of genuine pairs at the threshold that gives false-accept rate ``far``."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    thr = threshold_at_far(scores[~labels], far)
    return float((scores[labels] > thr).mean())


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds), thresholds descending, starting at (0, 0)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(~y)[distinct]
    tar = np.r_[0.0, tp / max(y.sum(), 1)]
    far = np.r_[0.0, fp / max((~y).sum(), 1)]
    return far, tar, np.r_[np.inf, s[distinct]]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (probability a genuine pair outscores an impostor; ties count half)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs genuine and impostor pairs")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    return float(((scores > threshold) == labels).mean())


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold with the highest accuracy: midpoints between consecutive distinct scores."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    s = np.unique(scores)
    candidates = np.r_[s[0] - 1.0, (s[:-1] + s[1:]) / 2, s[-1] + 1.0]
    order = np.argsort(scores)
    sorted_scores, sorted_labels = scores[order], labels[order]
    # accepted = scores > t; correct = genuine above + impostors at or below
    below = np.searchsorted(sorted_scores, candidates, side="right")
    imp_below = np.r_[0, np.cumsum(~sorted_labels)][below]
    gen_below = np.r_[0, np.cumsum(sorted_labels)][below]
    correct = imp_below + (labels.sum() - gen_below)
    return float(candidates[int(np.argmax(correct))])


@dataclass
class FoldResult:
    mean: float
    std: float
    accuracies: list[float]
    thresholds: list[float]


def kfold_accuracy(scores: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> FoldResult:
    """Accuracy per fold with the threshold chosen on the other folds (the LFW protocol)."""
    scores, labels, folds = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), np.asarray(folds)
    accs, thrs = [], []
    for f in np.unique(folds):
        test = folds == f
        thr = best_threshold(scores[~test], labels[~test])
        thrs.append(thr)
        accs.append(accuracy(scores[test], labels[test], thr))
    return FoldResult(float(np.mean(accs)), float(np.std(accs)), accs, thrs)


def verification_report(scores: np.ndarray, labels: np.ndarray, folds: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy (k-fold when folds are given, else best threshold), AUC, TAR at FAR 1e-2 and 1e-3."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if folds is not None:
        folded = kfold_accuracy(scores, labels, folds)
        acc, acc_std = folded.mean, folded.std
    else:
        acc, acc_std = accuracy(scores, labels, best_threshold(scores, labels)), 0.0
    return {
        "accuracy": acc,
        "accuracy_std": acc_std,
        "auc": auc(scores, labels),
        "tar_far_1e-2": tar_at_far(scores, labels, 1e-2),
        "tar_far_1e-3": tar_at_far(scores, labels, 1e-3),
    }
