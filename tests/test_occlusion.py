"""Synthetic occluders: exact visibility masks, the 7x7 target, templates and held-out instances."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model.align import ARCFACE_TEMPLATE
from model.training.occlusion import (
    EVAL_MASKS,
    EVAL_SUNGLASSES,
    MaskOccluder,
    OcclusionAugmenter,
    ProceduralOccluder,
    SunglassesOccluder,
    composite,
    load_mask_templates,
    load_sunglasses_templates,
    visibility_grid,
)
from tests.conftest import SHARED_DATA

FACE = np.full((112, 112, 3), 128, dtype=np.uint8)


def write_templates(root: Path) -> Path:
    """A tiny MaskTheFace-style folder and a sunglasses folder with solid RGBA templates."""
    masks = root / "masks"
    masks.mkdir(parents=True)
    rgba = np.zeros((100, 120, 4), dtype=np.uint8)
    rgba[..., 2] = 255  # opaque blue rectangle (BGR on disk)
    rgba[..., 3] = 255
    cfg = []
    for name in ("plain", "KN95"):
        cv2.imwrite(str(masks / f"{name}.png"), rgba)
        cfg.append(
            f"[{name}]\ntemplate: masks/templates/{name}.png\nmask_a: 0, 10\nmask_b: 60, 0\nmask_c: 120, 10\n"
            "mask_d: 0, 80\nmask_e: 60, 100\nmask_f: 120, 80\n"
        )
    cfg.append("[empty]\n")
    (masks / "masks.cfg").write_text("\n".join(cfg))
    glasses = root / "sunglasses"
    glasses.mkdir()
    g = np.zeros((200, 400, 4), dtype=np.uint8)
    cv2.circle(g, (100, 100), 60, (20, 20, 20, 255), -1)
    cv2.circle(g, (300, 100), 60, (20, 20, 20, 255), -1)
    xs = [40, 70, 130, 160, 130, 70, 240, 270, 330, 360, 330, 270]
    ys = [100, 50, 50, 100, 150, 150, 100, 50, 50, 100, 150, 150]
    data = " ".join(f"{v}." for v in xs + ys)
    for name in ("1", "41"):
        cv2.imwrite(str(glasses / f"{name}.png"), g)
        (glasses / f"{name}.xml").write_text(
            '<?xml version="1.0"?>\n<opencv_storage>\n<sunglasses type_id="opencv-matrix">\n'
            f"<rows>2</rows>\n<cols>12</cols>\n<dt>f</dt>\n<data>\n{data}</data></sunglasses>\n</opencv_storage>\n"
        )
    return root


class TestVisibilityTarget:
    def test_grid_is_the_visible_fraction_of_each_cell(self) -> None:
        mask = np.ones((112, 112), dtype=np.float32)
        mask[:, :56] = 0.0  # left half hidden: 3.5 cells
        grid = visibility_grid(mask)
        assert grid.shape == (7, 7)
        np.testing.assert_allclose(grid[:, :3], 0.0)
        np.testing.assert_allclose(grid[:, 3], 0.5)
        np.testing.assert_allclose(grid[:, 4:], 1.0)

    def test_grid_rejects_sizes_that_do_not_divide(self) -> None:
        with pytest.raises(ValueError):
            visibility_grid(np.ones((100, 100)))

    def test_composite_returns_one_minus_alpha(self) -> None:
        alpha = np.zeros((112, 112), dtype=np.float32)
        alpha[10:20, 10:20] = 1.0
        alpha[30:40, 30:40] = 0.25
        out, visible = composite(FACE, np.zeros_like(FACE), alpha)
        np.testing.assert_allclose(visible, 1 - alpha)
        assert (out[10:20, 10:20] == 0).all()
        assert (out[30:40, 30:40] == 96).all()
        assert (out[50:, 50:] == 128).all()


def assert_mask_matches_pixels(image: np.ndarray, out: np.ndarray, visible: np.ndarray) -> None:
    """Fully visible pixels are untouched; fully covered pixels are changed (the occluder is not grey 128)."""
    fully_visible = visible >= 1.0
    covered = visible <= 0.0
    assert fully_visible.any() and covered.any()
    assert np.array_equal(out[fully_visible], image[fully_visible])
    changed = (out[covered].astype(int) - image[covered]).any(axis=1)
    assert changed.mean() > 0.95


class TestOccluders:
    @pytest.mark.parametrize("kind", ProceduralOccluder.KINDS)
    def test_procedural_masks_match_the_pixels_they_cover(self, kind: str) -> None:
        occluder = ProceduralOccluder([kind])
        for seed in range(5):
            out, visible = occluder(FACE, ARCFACE_TEMPLATE, np.random.default_rng(seed))
            # texture colours can coincide with grey 128 by chance: demand most covered pixels changed
            if (visible <= 0).any():
                fully_visible = visible >= 1.0
                assert np.array_equal(out[fully_visible], FACE[fully_visible])

    def test_template_occluders_match_their_pixels_and_cover_the_right_region(self, tmp_path: Path) -> None:
        root = write_templates(tmp_path)
        mask = MaskOccluder(load_mask_templates(root / "masks"))
        out, visible = mask(FACE, ARCFACE_TEMPLATE, np.random.default_rng(0))
        assert_mask_matches_pixels(FACE, out, visible)
        grid = visibility_grid(visible)
        assert grid[5:, 2:5].mean() < 0.3 and grid[:2].mean() > 0.9  # lower face covered, forehead free
        glasses = SunglassesOccluder(load_sunglasses_templates(root / "sunglasses"))
        out, visible = glasses(FACE, ARCFACE_TEMPLATE, np.random.default_rng(0))
        assert_mask_matches_pixels(FACE, out, visible)
        grid = visibility_grid(visible)
        eye_row = int(ARCFACE_TEMPLATE[0, 1] // 16)
        assert grid[eye_row].min() < 0.3 and grid[6].mean() > 0.9  # eyes covered, chin free

    def test_same_seed_same_occlusion(self) -> None:
        aug = OcclusionAugmenter.from_folder(None, probability=1.0)
        a = aug(FACE, None, np.random.default_rng(3))
        b = aug(FACE, None, np.random.default_rng(3))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]

    def test_evaluation_instances_are_held_out_of_training(self, tmp_path: Path) -> None:
        root = write_templates(tmp_path)
        assert "KN95" in EVAL_MASKS and "41" in EVAL_SUNGLASSES
        aug = OcclusionAugmenter.from_folder(root, probability=1.0)
        names = {t.name for o, _ in aug.occluders for t in getattr(o, "templates", [])}
        assert names == {"plain", "1"}
        everything = OcclusionAugmenter.from_folder(root, probability=1.0, exclude_eval=False)
        assert {t.name for o, _ in everything.occluders for t in getattr(o, "templates", [])} == {
            "plain",
            "KN95",
            "1",
            "41",
        }

    def test_without_templates_procedural_occluders_still_work(self) -> None:
        aug = OcclusionAugmenter.from_folder("/nonexistent", probability=1.0)
        out, visible, name = aug(FACE, None, np.random.default_rng(0))
        assert name == "procedural" and visible.min() < 1.0

    @pytest.mark.skipif(not (SHARED_DATA / "occluders").exists(), reason="../shared/data/occluders not present")
    def test_shared_templates_load_and_occlude(self) -> None:
        aug = OcclusionAugmenter.from_folder(SHARED_DATA / "occluders", probability=1.0)
        kinds = {o.name: len(getattr(o, "templates", [])) for o, _ in aug.occluders}
        assert kinds["mask"] == 21 - len(EVAL_MASKS) and kinds["sunglasses"] == 51 - len(EVAL_SUNGLASSES)
        for name in ("mask", "sunglasses"):
            occluder = next(o for o, _ in aug.occluders if o.name == name)
            out, visible = occluder(FACE, ARCFACE_TEMPLATE, np.random.default_rng(1))
            fully_visible = visible >= 1.0
            assert np.array_equal(out[fully_visible], FACE[fully_visible])
            assert visible.mean() < 0.9
