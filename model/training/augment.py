"""Training augmentation for aligned faces, as in AdaFace, plus synthetic occlusion.

AdaFace's recipe (each with probability 0.2 by default): a random crop whose outside is zeroed
(the face stays in place), photometric jitter (brightness, contrast, saturation 0.5), and
low-resolution (down-scale by 0.2-1.0, up-scale back with a random interpolation); plus a
horizontal flip with probability 0.5. The zeroed region of the crop augmentation counts as not
visible in the occlusion target, so the head learns that black borders hide the face.

Everything draws from the ``numpy.random.Generator`` passed in: the trainer derives one per
sample from (seed, step, index), so augmentations are reproducible and resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.training.occlusion import OcclusionAugmenter

__all__ = ["AugmentConfig", "FaceAugmenter", "AugmentedFace", "flip_landmarks"]

_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)


@dataclass
class AugmentConfig:
    """Probabilities and ranges; defaults follow AdaFace's published runs."""

    flip: float = 0.5
    crop: float = 0.2
    crop_scale: tuple[float, float] = (0.2, 1.0)
    photometric: float = 0.2
    photometric_strength: float = 0.5
    low_res: float = 0.2
    low_res_scale: tuple[float, float] = (0.2, 1.0)
    occlusion: float = 0.5
    # made only by the device augmenter (model/training/device_augment.py, `augment_on = "device"`):
    blur: float = 0.0  # Gaussian blur, sigma drawn from blur_sigma (pixels)
    blur_sigma: tuple[float, float] = (0.3, 1.6)
    jpeg: float = 0.0  # JPEG-like 8x8 DCT blocking at a quality drawn from jpeg_quality
    jpeg_quality: tuple[float, float] = (30.0, 90.0)
    mix: float = 0.0  # mixed views appended per batch, as a fraction of its size (mixup or cutmix)
    mix_cutmix: float = 0.5  # share of the mixed views made by cutmix (the rest by mixup)
    mix_alpha: float = 0.4  # the mixing weight is drawn from a Beta(mix_alpha, mix_alpha)-like law

    def device_only(self) -> list[str]:
        """The augmentations asked for that only the device augmenter makes."""
        return [name for name in ("blur", "jpeg", "mix") if getattr(self, name) > 0]


@dataclass
class AugmentedFace:
    """An augmented crop, its visibility mask and what was done (for the distillation target).

    ``teacher_image``, when asked for, is the same view without the occluder: the same flip, crop,
    photometric change and resolution loss applied to the clean crop. Function-matching
    distillation shows the teacher this view, so the student is asked to match the teacher on
    what the student sees, less only what the occluder hides.
    """

    image: np.ndarray  # [112, 112, 3] uint8 RGB
    visible: np.ndarray  # [112, 112] float32 in [0, 1]
    flipped: bool
    occluder: str | None
    teacher_image: np.ndarray | None = None


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Mirror 5 landmarks horizontally and swap left/right so the order stays eye-eye-nose-mouth-mouth."""
    lm = np.asarray(landmarks, dtype=np.float64).copy()
    lm[:, 0] = width - 1 - lm[:, 0]
    return lm[[1, 0, 2, 4, 3]]


class FaceAugmenter:
    """Applies the AdaFace augmentations and the occlusion augmenter to aligned crops.

    Random choices are drawn in a fixed order (flip, occluder, crop box, photometric factors,
    resolution), then applied; drawing does not depend on whether a teacher view is also made,
    so asking for one never changes the student's view.
    """

    def __init__(self, config: AugmentConfig, occlusion: OcclusionAugmenter | None) -> None:
        if config.device_only():
            raise ValueError(
                f"augment {', '.join(config.device_only())}: only the device augmenter makes these "
                '(augment_on = "device")'
            )
        self.config = config
        self.occlusion = occlusion

    def __call__(
        self, image: np.ndarray, landmarks: np.ndarray | None, rng: np.random.Generator, teacher_view: bool = False
    ) -> AugmentedFace:
        cfg = self.config
        h, w = image.shape[:2]
        visible = np.ones((h, w), dtype=np.float32)
        flipped = bool(rng.random() < cfg.flip)
        if flipped:
            image = image[:, ::-1]
            landmarks = flip_landmarks(landmarks, w) if landmarks is not None else None
        clean = image = np.ascontiguousarray(image)
        occluder = None
        if self.occlusion is not None and cfg.occlusion > 0 and rng.random() < cfg.occlusion:
            image, vis, occluder = self.occlusion.occlude(image, landmarks, rng)
            visible = visible * vis
        box = self._crop_box(h, w, rng) if rng.random() < cfg.crop else None
        photometric = self._photometric_plan(rng) if rng.random() < cfg.photometric else None
        low_res = self._low_res_plan(rng) if rng.random() < cfg.low_res else None
        if box is not None:
            keep = np.zeros((h, w), dtype=np.float32)
            keep[box[0] : box[1], box[2] : box[3]] = 1.0
            visible = visible * keep
        views = [self._apply(image, box, photometric, low_res)]
        if teacher_view:
            views.append(self._apply(clean, box, photometric, low_res))
        return AugmentedFace(views[0], visible, flipped, occluder, views[1] if teacher_view else None)

    def _apply(
        self,
        image: np.ndarray,
        box: tuple[int, int, int, int] | None,
        photometric: list[tuple[int, float]] | None,
        low_res: tuple[float, int, int] | None,
    ) -> np.ndarray:
        if box is not None:
            out = np.zeros_like(image)
            out[box[0] : box[1], box[2] : box[3]] = image[box[0] : box[1], box[2] : box[3]]
            image = out
        if photometric is not None:
            image = self._photometric(image, photometric)
        if low_res is not None:
            image = self._low_res(image, *low_res)
        return image

    def _crop_box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """A random box (area scale and aspect as RandomResizedCrop) as (y0, y1, x0, x1); the rest is zeroed."""
        area = h * w
        for _ in range(10):
            target = area * rng.uniform(*self.config.crop_scale)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                return y, y + ch, x, x + cw
        return None

    def _photometric_plan(self, rng: np.random.Generator) -> list[tuple[int, float]]:
        s = self.config.photometric_strength
        return [(int(op), float(rng.uniform(max(0.0, 1 - s), 1 + s))) for op in rng.permutation(3)]

    @staticmethod
    def _photometric(image: np.ndarray, plan: list[tuple[int, float]]) -> np.ndarray:
        img = image.astype(np.float32)
        for op, factor in plan:
            if op == 0:  # brightness
                img = img * factor
            elif op == 1:  # contrast around the mean grey level
                mean = float((img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
                img = (img - mean) * factor + mean
            else:  # saturation around the per-pixel grey
                grey = (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
                img = (img - grey) * factor + grey
            img = np.clip(img, 0, 255)
        return (img + 0.5).astype(np.uint8)

    def _low_res_plan(self, rng: np.random.Generator) -> tuple[float, int, int]:
        ratio = float(rng.uniform(*self.config.low_res_scale))
        down = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))]
        up = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))]
        return ratio, down, up

    @staticmethod
    def _low_res(image: np.ndarray, ratio: float, down: int, up: int) -> np.ndarray:
        h, w = image.shape[:2]
        small = cv2.resize(image, (max(1, int(w * ratio)), max(1, int(h * ratio))), interpolation=down)
        return cv2.resize(small, (w, h), interpolation=up)
