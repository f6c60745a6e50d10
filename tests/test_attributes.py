"""Occlusion attributes read from the visibility map: regions, flags, and the mask threshold's fit."""

from __future__ import annotations

import numpy as np
import pytest

from model.attributes import REGIONS, AttributeRules, region_visibility
from model.card import WeightsCard
from model.training.attributes import fit_mask_threshold


def test_a_hidden_lower_face_is_mask_like_and_hidden_eyes_glasses_like() -> None:
    rules = AttributeRules(mask_threshold=0.6)
    masked = np.ones((7, 7))
    masked[4:, 1:6] = 0.1  # nose and mouth covered
    out = rules.describe(masked)
    assert out["mask_like"] and not out["glasses_like"]
    assert out["occluded"] == {"forehead": False, "eyes": False, "nose": True, "mouth": True}
    shades = np.ones((7, 7))
    shades[2:4, 1:6] = 0.0
    out = rules.describe(shades)
    assert out["glasses_like"] and not out["mask_like"] and out["occluded"]["eyes"]
    assert not any(rules.describe(np.ones((7, 7)))["occluded"].values())


def test_regions_follow_the_aligned_template() -> None:
    grid = np.arange(49, dtype=float).reshape(7, 7)
    seen = region_visibility(grid / 48)
    assert seen["forehead"] < seen["eyes"] < seen["nose"] < seen["mouth"]  # top to bottom
    assert set(REGIONS) >= {"forehead", "eyes", "nose", "mouth", "lower_face"}


def test_the_mask_threshold_is_fitted_between_the_two_groups() -> None:
    rng = np.random.default_rng(0)
    masked, clean = rng.uniform(0.0, 0.6, 500), rng.uniform(0.5, 1.0, 500)
    t, fit = fit_mask_threshold(masked, clean)
    assert 0.5 <= t <= 0.6 and fit["balanced_accuracy"] > 0.9
    assert fit["tpr"] == pytest.approx((masked < t).mean()) and fit["fpr"] == pytest.approx((clean < t).mean())


def test_weights_carry_their_rules_or_the_defaults() -> None:
    base = {"model_version": "ir_18-x", "architecture": "ir_18"}
    assert WeightsCard.from_metadata(base).attributes == AttributeRules()
    card = WeightsCard.from_metadata({**base, "attributes": {"mask_threshold": 0.7, "mask_eval": {"tpr": 0.9}}})
    assert card.attributes.mask_threshold == 0.7 and card.attributes.measured["mask_eval"] == {"tpr": 0.9}
