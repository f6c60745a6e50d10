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


@dataclass
class AugmentedFace:
    """An augmented crop, its visibility mask and what was done (for the distillation target)."""

    image: np.ndarray  # [112, 112, 3] uint8 RGB
    visible: np.ndarray  # [112, 112] float32 in [0, 1]
    flipped: bool
    occluder: str | None


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Mirror 5 landmarks horizontally and swap left/right so the order stays eye-eye-nose-mouth-mouth."""
    lm = np.asarray(landmarks, dtype=np.float64).copy()
    lm[:, 0] = width - 1 - lm[:, 0]
    return lm[[1, 0, 2, 4, 3]]


class FaceAugmenter:
    """Applies the AdaFace augmentations and the occlusion augmenter to aligned crops."""

    def __init__(self, config: AugmentConfig, occlusion: OcclusionAugmenter | None) -> None:
        self.config = config
        self.occlusion = occlusion

    def __call__(self, image: np.ndarray, landmarks: np.ndarray | None, rng: np.random.Generator) -> AugmentedFace:
        cfg = self.config
        h, w = image.shape[:2]
        visible = np.ones((h, w), dtype=np.float32)
        flipped = bool(rng.random() < cfg.flip)
        if flipped:
            image = image[:, ::-1]
            landmarks = flip_landmarks(landmarks, w) if landmarks is not None else None
        image = np.ascontiguousarray(image)
        occluder = None
        if self.occlusion is not None and cfg.occlusion > 0 and rng.random() < cfg.occlusion:
            image, vis, occluder = self.occlusion.occlude(image, landmarks, rng)
            visible = visible * vis
        if rng.random() < cfg.crop:
            image, keep = self._crop(image, rng)
            visible = visible * keep
        if rng.random() < cfg.photometric:
            image = self._photometric(image, rng)
        if rng.random() < cfg.low_res:
            image = self._low_res(image, rng)
        return AugmentedFace(image, visible, flipped, occluder)

    def _crop(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Keep a random box (area scale and aspect as RandomResizedCrop), zero the rest."""
        h, w = image.shape[:2]
        area = h * w
        for _ in range(10):
            target = area * rng.uniform(*self.config.crop_scale)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                break
        else:
            return image, np.ones((h, w), dtype=np.float32)
        out = np.zeros_like(image)
        out[y : y + ch, x : x + cw] = image[y : y + ch, x : x + cw]
        keep = np.zeros((h, w), dtype=np.float32)
        keep[y : y + ch, x : x + cw] = 1.0
        return out, keep

    def _photometric(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.config.photometric_strength
        img = image.astype(np.float32)
        for op in rng.permutation(3):
            factor = rng.uniform(max(0.0, 1 - s), 1 + s)
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

    def _low_res(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        ratio = rng.uniform(*self.config.low_res_scale)
        small = (max(1, int(w * ratio)), max(1, int(h * ratio)))
        down = cv2.resize(image, small, interpolation=_INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))])
        return cv2.resize(down, (w, h), interpolation=_INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))])
