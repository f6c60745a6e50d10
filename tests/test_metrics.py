"""Verification metrics and calibration against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import DEFAULT_CALIBRATION, PRESETS, Calibration, fit_calibration
from model.metrics import (
    auc,
    best_threshold,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
    threshold_at_far,
    verification_report,
)

# genuine: 0.9, 0.8, 0.6; impostor: 0.7, 0.5, 0.4
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
LABELS = np.array([1, 1, 0, 1, 0, 0], dtype=bool)


class TestToyScores:
    def test_auc_counts_ordered_pairs(self) -> None:
        # 0.9 and 0.8 beat all 3 impostors, 0.6 beats 2: 8 of 9
        assert auc(SCORES, LABELS) == pytest.approx(8 / 9)

    def test_auc_counts_ties_as_half(self) -> None:
        assert auc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)

    def test_tar_at_far(self) -> None:
        # FAR 1/3 allows one impostor (0.7) through: threshold 0.5, every genuine accepted
        assert threshold_at_far(SCORES[~LABELS], 1 / 3) == pytest.approx(0.5)
        assert tar_at_far(SCORES, LABELS, 1 / 3) == pytest.approx(1.0)
        # FAR 0 (1e-2 of 3 impostors): threshold at the top impostor 0.7, so 0.6 is rejected
        assert tar_at_far(SCORES, LABELS, 1e-2) == pytest.approx(2 / 3)

    def test_best_threshold_and_accuracy(self) -> None:
        thr = best_threshold(SCORES, LABELS)
        assert 0.5 < thr < 0.6  # 5 of 6 right; only the 0.7 impostor is wrong
        report = verification_report(SCORES, LABELS)
        assert report["accuracy"] == pytest.approx(5 / 6)

    def test_roc_curve_ends_at_one_one(self) -> None:
        far, tar, thr = roc_curve(SCORES, LABELS)
        assert far[0] == 0 and tar[0] == 0 and far[-1] == 1 and tar[-1] == 1
        assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
        assert thr[1] == pytest.approx(0.9)

    def test_kfold_chooses_thresholds_on_the_other_folds(self) -> None:
        scores = np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.7])
        labels = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
        folds = np.array([0, 0, 1, 1, 2, 2])
        result = kfold_accuracy(scores, labels, folds)
        # fold 2 is inverted: a threshold learned on folds 0 and 1 (between 0.2 and 0.8) gets it all wrong
        assert result.accuracies == [1.0, 1.0, 0.0]
        assert result.mean == pytest.approx(2 / 3)


class TestCalibration:
    def make_pairs(self, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, ...]:
        """Cosine is informative only when visible; QAConv stays informative under occlusion."""
        rng = np.random.default_rng(seed)
        same = rng.random(n) < 0.5
        vis = np.where(rng.random(n) < 0.5, 1.0, 0.3)
        cos = np.where(same, 0.5 * vis, 0.0) + rng.normal(0, 0.2, n)
        qa = np.where(same, 2.0, 0.0) + rng.normal(0, 1.0, n)
        return cos, qa, vis, same

    def test_fit_meets_its_far_targets_and_orders_presets(self) -> None:
        cos, qa, vis, same = self.make_pairs(30000)
        cal = fit_calibration(cos, qa, vis, same)
        fused = cal.score(cos, qa, vis)
        for name, far in PRESETS.items():
            assert (fused[~same] > cal.thresholds[name]).mean() <= far + 1e-12
        assert cal.thresholds["strict"] > cal.thresholds["balanced"] > cal.thresholds["lenient"]
        assert cal.fitted and cal.pairs == 30000

    def test_fused_beats_each_matcher_and_leans_on_qaconv_when_occluded(self) -> None:
        cos, qa, vis, same = self.make_pairs()
        cal = fit_calibration(cos, qa, vis, same)
        fused = cal.score(cos, qa, vis)
        assert auc(fused, same) > max(auc(cos, same), auc(qa, same))
        low, high = cal.weights(0.3), cal.weights(1.0)
        assert low["adaface"] / low["qaconv"] < high["adaface"] / high["qaconv"]
        probs = cal.probability(fused)
        assert probs[same].mean() > 0.7 and probs[~same].mean() < 0.3

    def test_round_trips_through_a_dict(self) -> None:
        cos, qa, vis, same = self.make_pairs(500)
        cal = fit_calibration(cos, qa, vis, same)
        assert Calibration.from_dict(cal.to_dict()) == cal
        assert Calibration.from_dict({**cal.to_dict(), "source": "validation split"}) == cal  # as stored in metadata
        assert not DEFAULT_CALIBRATION.fitted

    def test_needs_both_kinds_of_pairs(self) -> None:
        with pytest.raises(ValueError):
            fit_calibration(np.ones(3), np.ones(3), np.ones(3), np.ones(3, dtype=bool))
