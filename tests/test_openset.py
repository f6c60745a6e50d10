"""Open-set identification: FPIR presets turned into thresholds for the gallery's size, and the posterior."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import DEFAULT_CALIBRATION, PRESETS
from model.openset import IDENTIFY_PRESETS, OpenSetModel, posterior
from model.training.calibrate import fit_open_set, open_set_check


def strangers(n_probes: int, gallery: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Impostor scores with probe effects: each probe its own mean (a few 'wolves' high) and spread."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(-6.0, 1.0, n_probes)
    sigma = rng.uniform(0.8, 1.4, n_probes)
    rows = [rng.normal(m, s, gallery) for m, s in zip(mu, sigma, strict=True)]
    return rows, mu, sigma


class TestModel:
    def test_a_threshold_gives_back_its_fpir_and_grows_with_the_gallery(self) -> None:
        _, mu, sigma = strangers(500, 1)
        model = OpenSetModel(list(mu), list(sigma))
        previous = -np.inf
        for n in (1, 10, 1000, 100_000, 10_000_000):
            t = model.threshold(1e-3, n)
            assert model.fpir(t, n) == pytest.approx(1e-3, rel=1e-3)
            assert t > previous  # a bigger gallery needs more evidence for the same FPIR
            previous = t
        assert model.fpir(0.0, 100) > model.fpir(1.0, 100) > model.fpir(1.0, 10) > 0

    def test_the_modelled_fpir_holds_for_fresh_strangers(self) -> None:
        """Monte Carlo: strangers drawn from the same population, best of n, at the modelled threshold."""
        _, mu, sigma = strangers(2000, 1, seed=1)
        model = OpenSetModel(list(mu), list(sigma))
        rng = np.random.default_rng(2)
        for n, target in ((50, 0.05), (500, 0.02)):
            t = model.threshold(target, n)
            fresh = rng.integers(0, len(mu), 4000)
            best = rng.normal(mu[fresh, None], sigma[fresh, None], (4000, n)).max(1)
            measured = (best > t).mean()
            assert abs(measured - target) < 4 * np.sqrt(target * (1 - target) / 4000)

    def test_probe_effects_make_the_best_of_n_grow_slower_than_independent_impostors(self) -> None:
        """At the same per-comparison false-accept rate, strangers who differ from each other (wolves and lambs)
        are matched to someone less often than independent impostors would be: 1-(1-FAR)^N overstates FPIR."""
        rows, _, _ = strangers(1000, 300, seed=3)
        fitted = fit_open_set(rows)
        for n in (100, 10_000):
            t = fitted.threshold(1e-3, n)
            far = fitted.fpir(t, 1)  # the marginal per-comparison rate at this threshold
            assert 1 - (1 - far) ** n > 1.01e-3

    def test_the_fit_checks_itself_on_its_probes(self) -> None:
        rows, _, _ = strangers(1600, 200, seed=4)
        report = open_set_check(rows, np.arange(len(rows)) // 4)
        loose = [r for r in report["fpir"] if r["fpir_target"] >= 0.05]
        for r in loose:  # enough strangers to measure these: within sampling error
            assert abs(r["fpir_measured"] - r["fpir_target"]) < 4 * np.sqrt(r["fpir_target"] / r["strangers"])
        assert report["tail"][1]["measured"] == pytest.approx(report["tail"][1]["gaussian"], abs=5e-4)
        assert report["split"] == "by identity" and all(r["interval_95"][0] <= r["fpir_measured"] for r in loose)

    def test_heavy_tails_are_modelled_where_a_gaussian_would_fail(self) -> None:
        """Face-score tails are far heavier than a Gaussian's (measured: 16x at 4 sigma). With Laplace residuals
        the fitted model (empirical body, exponential tail), checked on strangers it was not fitted on, keeps
        every target at every gallery size; a Gaussian per probe would let several times too many through."""
        rng = np.random.default_rng(5)
        mu, spread = rng.normal(-6.0, 1.0, 4000), rng.uniform(0.5, 0.9, 4000)
        rows = [m + s * rng.laplace(0.0, 1.0, 300) for m, s in zip(mu, spread, strict=True)]
        report = open_set_check(rows, np.arange(len(rows)) // 4)
        for r in report["fpir"]:
            if r["fpir_target"] * r["strangers"] >= 10:  # enough expected false positives to measure
                err = np.sqrt(r["fpir_target"] * (1 - r["fpir_target"]) / r["strangers"])
                assert abs(r["fpir_measured"] - r["fpir_target"]) < 4 * err, r
        gaussian = OpenSetModel([float(r.mean()) for r in rows], [float(r.std()) for r in rows])
        best = np.array([r.max() for r in rows])
        t = gaussian.threshold(0.01, 300)
        assert (best > t).mean() > 0.03  # a Gaussian per probe underestimates how often strangers pass

    def test_weights_without_a_fit_use_their_pairwise_presets(self) -> None:
        model = DEFAULT_CALIBRATION.identify_model
        assert model.source == "from_pairwise"
        for name, far in PRESETS.items():  # one comparison: the 1:1 preset, within the Gaussian's fit
            assert model.threshold(far, 1) == pytest.approx(DEFAULT_CALIBRATION.thresholds[name], abs=0.05)
        t = model.threshold(IDENTIFY_PRESETS["balanced"], 1000)
        assert model.fpir(t, 1000) == pytest.approx(1e-3, rel=1e-3)
        assert t > DEFAULT_CALIBRATION.thresholds["balanced"]

    def test_a_model_round_trips_through_metadata(self) -> None:
        rows, _, _ = strangers(50, 40)
        fitted = fit_open_set(rows)
        again = OpenSetModel.from_dict(fitted.to_dict())
        assert again.threshold(1e-2, 77) == pytest.approx(fitted.threshold(1e-2, 77), abs=1e-3)


class TestPosterior:
    def test_probabilities_and_the_unknown_share_sum_to_one(self) -> None:
        p, unknown = posterior(np.array([4.0, 1.0, -3.0]), 100)
        assert p.sum() + unknown == pytest.approx(1.0) and p[0] > p[1] > p[2]

    def test_the_same_score_convinces_less_in_a_larger_gallery(self) -> None:
        small, _ = posterior(np.array([5.0]), 10)
        large, _ = posterior(np.array([5.0]), 100_000)
        assert small[0] > 0.9 > 0.01 > large[0]

    def test_a_lone_candidate_at_log_s_is_even_with_unknown(self) -> None:
        p, unknown = posterior(np.array([np.log(1000.0)]), 1000)  # LR = S: (prior/S)*S = prior = 1 - prior
        assert p[0] == pytest.approx(unknown) == pytest.approx(0.5)
