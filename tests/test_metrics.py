"""Verification metrics and calibration against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import DEFAULT_CALIBRATION, PRESETS, Calibration
from model.training.calibrate import (
    cross_validated_reliability,
    draw_reliability,
    fit_calibration,
    logistic_fit,
    preset_rates,
    reliability,
)
from model.training.metrics import (
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

    def test_the_quality_form_asks_less_of_a_degraded_face(self) -> None:
        """Pairs whose weaker face has a low norm have lower genuine cosines: one threshold for all pairs fits
        neither, the quality form's does both (and it needs the norms wherever it scores)."""
        cos, qa, vis, same = self.make_pairs(20000)
        rng = np.random.default_rng(3)
        norm = np.where(rng.random(len(same)) < 0.5, 8.0, 30.0)
        cos = cos + np.where(same & (norm > 10), 0.4, 0.0)  # a clear face's genuine cosine is higher
        plain, quality = fit_calibration(cos, qa, vis, same), fit_calibration(cos, qa, vis, same, norm)
        assert plain.form == "visibility" and quality.form == "quality" and len(quality.coef) == 7
        assert auc(quality.score(cos, qa, vis, norm), same) > auc(plain.score(cos, qa, vis), same) + 0.003
        assert quality.weights(1.0, 30.0)["adaface"] > quality.weights(1.0, 8.0)["adaface"]
        with pytest.raises(ValueError, match="lower feature norm"):
            quality.score(cos, qa, vis)
        assert Calibration.from_dict(quality.to_dict()) == quality
        assert "norm_mean" not in plain.to_dict()  # the visibility form is stored as before
        with pytest.raises(ValueError, match="quality form with 4 weights"):
            Calibration.from_dict({**quality.to_dict(), "coef": quality.coef[:4]})
        found = {"cosine": cos[:5], "qaconv": qa[:5], "visibility": np.ones(5), "norm": np.full(5, 30.0)}
        np.testing.assert_allclose(
            quality.score_found(found, 0.9, 8.0), quality.score(cos[:5], qa[:5], np.full(5, 0.9), np.full(5, 8.0))
        )

    def test_needs_both_kinds_of_pairs(self) -> None:
        with pytest.raises(ValueError):
            fit_calibration(np.ones(3), np.ones(3), np.ones(3), np.ones(3, dtype=bool))


class TestProbability:
    def gaussian_pairs(self, genuine: int, impostor: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores ~ N(+1, 1) for genuine and N(-1, 1) for impostor pairs: the exact log-odds at a 1:1 prior is 2x."""
        rng = np.random.default_rng(seed)
        x = np.r_[rng.normal(1, 1, genuine), rng.normal(-1, 1, impostor)]
        same = np.r_[np.ones(genuine, bool), np.zeros(impostor, bool)]
        return x, 2 * x, same

    def test_a_true_probability_has_small_error_whatever_the_pair_counts(self) -> None:
        x, logit, same = self.gaussian_pairs(5000, 50000)  # 1:10, but the probability is stated for 1:1
        p = 1 / (1 + np.exp(-logit))
        report = reliability(p, same)
        assert report["ece"] < 0.02 and report["prior"] == 0.5
        assert sum(b["weight"] for b in report["bins"]) == pytest.approx(1.0)
        # counting pairs instead of weighting them to the prior would call it badly calibrated
        unweighted = np.abs(np.mean(p[p > 0.5]) - np.mean(same[p > 0.5]))
        assert unweighted > 0.1

    def test_an_overconfident_probability_has_a_large_error(self) -> None:
        x, logit, same = self.gaussian_pairs(20000, 20000)
        assert reliability(1 / (1 + np.exp(-4 * logit)), same)["ece"] > 0.05

    def test_probability_and_threshold_share_one_scale(self) -> None:
        cal = fit_calibration(*TestCalibration().make_pairs(4000))
        scores = np.random.default_rng(1).normal(0, 5, 1000)
        for t in list(cal.thresholds.values()) + [0.0, -3.5]:
            assert np.array_equal(scores > t, cal.probability(scores) > cal.probability_at(t))
        assert cal.probability_at(cal.thresholds["strict"]) > cal.probability_at(cal.thresholds["lenient"]) > 0.5

    def test_logistic_fusion_is_calibrated_on_identities_it_never_saw(self, tmp_path: pytest.TempPathFactory) -> None:
        cos, qa, vis, same = TestCalibration().make_pairs(20000)
        rng = np.random.default_rng(5)
        ida = rng.integers(0, 200, len(same))
        idb = np.where(same, ida, rng.integers(0, 200, len(same)))
        report = cross_validated_reliability(cos, qa, vis, same, ida, idb, folds=4)
        assert report["ece"] < 0.03 and report["folds"] == 4 and report["pairs"] > 0.5 * len(same)
        draw_reliability({"cross-validated": report}, tmp_path / "r.png")
        from PIL import Image

        assert Image.open(tmp_path / "r.png").size == (560, 560)

    def test_preset_rates_count_accepts_above_each_threshold(self) -> None:
        cos, qa, vis, same = TestCalibration().make_pairs(30000)
        cal = fit_calibration(cos, qa, vis, same)
        fused = cal.score(cos, qa, vis)
        rates = preset_rates(cal, fused, same)
        for name, far in PRESETS.items():
            assert rates[name]["far"] <= far and rates[name]["far_target"] == far
            assert rates[name]["tar"] == pytest.approx((fused[same] > cal.thresholds[name]).mean())
        assert rates["lenient"]["tar"] >= rates["balanced"]["tar"] >= rates["strict"]["tar"]


def test_the_fusion_ceilings_decisions_are_the_suites_accuracy() -> None:
    """bench_fusion_ceiling's paired comparison counts each pair as the suite's k-fold accuracy decides it, and its
    ceiling never scores a fold with a fit that saw it."""
    from bench.bench_fusion_ceiling import ceiling, fold_decisions

    rng = np.random.default_rng(0)
    same = rng.random(600) < 0.5
    folds = np.arange(600) % 10
    scores = same + rng.normal(0, 0.8, 600)
    right = fold_decisions(scores, same, folds, kfold_accuracy(scores, same, folds))
    per_fold = [right[folds == f].mean() for f in range(10)]
    assert np.mean(per_fold) == pytest.approx(kfold_accuracy(scores, same, folds).mean, abs=1e-12)
    # a feature that is the label in one fold and 0 elsewhere: a fit that saw that fold scores it perfectly (checked)
    leak = np.where(folds == 3, 2.0 * same - 1, 0.0)
    features = np.stack([scores, leak], 1)
    mu, sd = features.mean(0), features.std(0)
    w, b = logistic_fit((features - mu) / sd, same.astype(float))
    leaked, fair = ((features - mu) / sd) @ w + b, ceiling(features, same, folds)
    assert fold_decisions(leaked, same, folds, kfold_accuracy(leaked, same, folds))[folds == 3].mean() == 1.0
    assert fold_decisions(fair, same, folds, kfold_accuracy(fair, same, folds))[folds == 3].mean() < 0.9
