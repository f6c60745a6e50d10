"""Synthetic occlusion on aligned faces, with an exact pixel visibility mask.

Every occluder returns the occluded crop and a float mask ``[H, W]`` in [0, 1] that is exactly the
fraction of each pixel left visible (``1 - alpha`` of what was painted over it). The 7x7 target of
the occlusion head is the mean of that mask over each 16x16 cell (:func:`visibility_grid`).

Occluders:

* :class:`MaskOccluder`: MaskTheFace templates (MIT), warped by a homography from their six
  anchor points (a-f in ``masks.cfg``) to points derived from the five face landmarks.
* :class:`SunglassesOccluder`: RGBA sunglasses with 12 annotated points (six per lens outline);
  the lens centres are mapped onto the eyes.
* :class:`ProceduralOccluder`: no files needed: hands/bars/patches, scarves over the lower face,
  random polygons and ellipses, each filled with a random colour or texture.

Positions, scales, rotations and colours are random; all randomness comes from the
``numpy.random.Generator`` passed in, so a seed reproduces an occlusion exactly.
"""

from __future__ import annotations

import abc
import configparser
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model.align import ARCFACE_TEMPLATE

__all__ = [
    "EVAL_MASKS",
    "EVAL_SUNGLASSES",
    "Occluder",
    "MaskOccluder",
    "SunglassesOccluder",
    "ProceduralOccluder",
    "OcclusionAugmenter",
    "visibility_grid",
    "composite",
    "load_mask_templates",
    "load_sunglasses_templates",
]

logger = logging.getLogger(__name__)

#: Occluder instances reserved for evaluation: training never sees them, so occluded-benchmark
#: numbers measure generalisation to unseen masks and glasses, not memorised templates.
EVAL_MASKS = ("surgical_blue", "surgical_blue_left", "surgical_blue_right", "KN95", "KN95_left", "KN95_right")
EVAL_SUNGLASSES = tuple(str(i) for i in range(41, 52))


def visibility_grid(mask: np.ndarray, cells: int = 7) -> np.ndarray:
    """Fraction of each cell left visible: ``[H, W]`` -> ``[cells, cells]`` (H, W multiples of cells)."""
    h, w = mask.shape
    if h % cells or w % cells:
        raise ValueError(f"mask {h}x{w} does not divide into {cells}x{cells} cells")
    return mask.reshape(cells, h // cells, cells, w // cells).mean(axis=(1, 3)).astype(np.float32)


def composite(image: np.ndarray, rgb: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``rgb`` (``[H, W, 3]``) over ``image`` with ``alpha`` in [0, 1]; returns (image, 1 - alpha)."""
    a = np.clip(alpha, 0.0, 1.0).astype(np.float32)[..., None]
    out = image.astype(np.float32) * (1 - a) + rgb.astype(np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), 1.0 - a[..., 0]


@dataclass(frozen=True)
class _Template:
    name: str
    rgba: np.ndarray  # [h, w, 4] uint8
    points: np.ndarray  # [k, 2] template anchor points


class Occluder(abc.ABC):
    """Base: ``__call__(image, landmarks, rng) -> (occluded image, visible mask)``."""

    name = "occluder"

    @abc.abstractmethod
    def __call__(
        self, image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Occlude ``image`` (RGB uint8) given its 5 landmarks; returns (image, visible mask)."""


def _warp_template(
    template: _Template, matrix: np.ndarray, size: tuple[int, int], perspective: bool
) -> tuple[np.ndarray, np.ndarray]:
    h, w = size
    rgba = template.rgba
    if perspective:
        warped = cv2.warpPerspective(
            rgba, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    else:
        warped = cv2.warpAffine(
            rgba, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    return warped[..., :3], warped[..., 3].astype(np.float32) / 255.0


def _tint(rgb: np.ndarray, rng: np.random.Generator, probability: float = 0.5) -> np.ndarray:
    if rng.random() >= probability:
        return rgb
    colour = rng.uniform(0.3, 1.2, size=3)
    return np.clip(rgb.astype(np.float32) * colour, 0, 255).astype(np.uint8)


def load_mask_templates(
    folder: str | Path, names: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[_Template]:
    """Templates and anchors from a MaskTheFace folder (``masks.cfg`` plus PNGs beside it).

    ``names`` keeps only those sections; ``exclude`` drops sections (e.g. :data:`EVAL_MASKS`).
    """
    folder = Path(folder)
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), comment_prefixes=(";", "#"))
    parser.read(folder / "masks.cfg")
    templates = []
    for section in parser.sections():
        if (names is not None and section not in names) or section in exclude:
            continue
        cfg = parser[section]
        if "template" not in cfg:  # MaskTheFace's "empty"/"inpaint" modes carry no template
            continue
        file = folder / Path(cfg["template"]).name
        if not file.exists():
            logger.warning("mask template %s listed in masks.cfg is missing", file)
            continue
        points = np.array([[float(v) for v in cfg[f"mask_{k}"].split(",")] for k in "abcdef"], dtype=np.float64)
        rgba = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
        if rgba is None or rgba.ndim != 3 or rgba.shape[2] != 4:
            logger.warning("mask template %s is not an RGBA image", file)
            continue
        templates.append(_Template(section, cv2.cvtColor(rgba, cv2.COLOR_BGRA2RGBA), points))
    return templates


def load_sunglasses_templates(
    folder: str | Path, names: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[_Template]:
    """RGBA sunglasses and their 12 points (OpenCV XML, first row x, second row y)."""
    folder = Path(folder)
    templates = []
    for xml in sorted(folder.glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
        if (names is not None and xml.stem not in names) or xml.stem in exclude:
            continue
        png = xml.with_suffix(".png")
        numbers = re.search(r"<data>(.*?)</data>", xml.read_text(), re.S)
        rgba = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        if numbers is None or rgba is None or rgba.ndim != 3 or rgba.shape[2] != 4:
            logger.warning("sunglasses template %s is unreadable", xml.stem)
            continue
        values = np.array([float(v) for v in numbers.group(1).split()])
        if values.size != 24:
            logger.warning("sunglasses template %s has %d values, expected 24", xml.stem, values.size)
            continue
        templates.append(_Template(xml.stem, cv2.cvtColor(rgba, cv2.COLOR_BGRA2RGBA), values.reshape(2, 12).T))
    return templates


def mask_anchor_targets(landmarks: np.ndarray) -> np.ndarray:
    """Face points for MaskTheFace anchors a-f, from the 5 landmarks.

    a/c: face sides at the nose bridge; b: nose bridge; d/f: jaw sides below the mouth;
    e: chin. Distances are in units of the inter-ocular distance.
    """
    le, re_, nose, lm, rm = landmarks
    eye_mid, mouth_mid = (le + re_) / 2, (lm + rm) / 2
    across = re_ - le
    ipd = float(np.linalg.norm(across))
    x_axis = across / max(ipd, 1e-6)
    y_axis = np.array([-x_axis[1], x_axis[0]])
    bridge = eye_mid + y_axis * 0.35 * float(np.dot(nose - eye_mid, y_axis))
    chin = mouth_mid + y_axis * 0.95 * float(np.dot(mouth_mid - nose, y_axis))
    jaw = mouth_mid + y_axis * 0.15 * ipd
    return np.array(
        [
            bridge - x_axis * 1.0 * ipd,
            bridge,
            bridge + x_axis * 1.0 * ipd,
            jaw - x_axis * 0.95 * ipd,
            chin,
            jaw + x_axis * 0.95 * ipd,
        ]
    )


class _TemplateOccluder(Occluder):
    """An occluder drawn from a list of RGBA templates, one picked at random per face."""

    def __init__(self, templates: Sequence[_Template]) -> None:
        if not templates:
            raise ValueError(f"{type(self).__name__} needs at least one template")
        self.templates = list(templates)

    def pick(self, rng: np.random.Generator) -> _Template:
        return self.templates[rng.integers(len(self.templates))]


class MaskOccluder(_TemplateOccluder):
    """Face masks warped onto the lower face."""

    name = "mask"

    def __call__(
        self, image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        template = self.pick(rng)
        targets = mask_anchor_targets(landmarks)
        ipd = float(np.linalg.norm(landmarks[1] - landmarks[0]))
        targets = targets + rng.normal(0, 0.04 * ipd, size=targets.shape)
        targets[:3, 1] += rng.uniform(-0.15, 0.2) * ipd  # mask worn higher or lower
        matrix, _ = cv2.findHomography(template.points, targets)
        if matrix is None:
            return image.copy(), np.ones(image.shape[:2], dtype=np.float32)
        rgb, alpha = _warp_template(template, matrix, image.shape[:2], perspective=True)
        return composite(image, _tint(rgb, rng), alpha)


class SunglassesOccluder(_TemplateOccluder):
    """Sunglasses with lens centres on the eyes."""

    name = "sunglasses"

    def __call__(
        self, image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        template = self.pick(rng)
        src = np.stack([template.points[:6].mean(0), template.points[6:].mean(0)])
        dst = landmarks[:2].astype(np.float64).copy()
        centre = dst.mean(0)
        dst = centre + (dst - centre) * rng.uniform(0.95, 1.2) + rng.normal(0, 1.0, size=2)
        matrix = _similarity_from_two(src, dst)
        rgb, alpha = _warp_template(template, matrix, image.shape[:2], perspective=False)
        if rng.random() < 0.3:  # lighter lenses leave the eyes partly visible
            alpha = alpha * rng.uniform(0.75, 0.95)
        return composite(image, _tint(rgb, rng, 0.3), alpha)


def _similarity_from_two(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity transform that maps two points exactly onto two points."""
    s_vec, d_vec = src[1] - src[0], dst[1] - dst[0]
    scale = float(np.linalg.norm(d_vec)) / max(float(np.linalg.norm(s_vec)), 1e-9)
    angle = np.arctan2(d_vec[1], d_vec[0]) - np.arctan2(s_vec[1], s_vec[0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rot, (dst[0] - rot @ src[0])[:, None]])


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A random fill: flat colour, skin tone, stripes, checks or noise."""
    h, w = size
    kind = rng.integers(5)
    base = rng.integers(0, 256, size=3).astype(np.float32)
    if kind == 0:
        return np.broadcast_to(base, (h, w, 3)).astype(np.uint8)
    if kind == 1:  # skin-like, as for a hand
        skin = np.array([rng.uniform(120, 240), rng.uniform(80, 190), rng.uniform(60, 160)], dtype=np.float32)
        shade = rng.normal(0, 8, size=(h, w, 1))
        return np.clip(skin + shade, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    other = rng.integers(0, 256, size=3).astype(np.float32)
    if kind == 2:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0)[..., None]
        return np.where(t, base, other).astype(np.uint8)
    if kind == 3:
        period = int(rng.integers(4, 14))
        t = (((xx // period) + (yy // period)) % 2 == 0)[..., None]
        return np.where(t, base, other).astype(np.uint8)
    noise = rng.normal(0, rng.uniform(10, 60), size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class ProceduralOccluder(Occluder):
    """File-free occluders: a hand or bar, a scarf over the lower face, or a random shape."""

    name = "procedural"
    KINDS = ("hand", "bar", "scarf", "shape")

    def __init__(self, kinds: Sequence[str] = KINDS) -> None:
        unknown = set(kinds) - set(self.KINDS)
        if unknown:
            raise ValueError(f"unknown procedural occluders {sorted(unknown)}; choose from {self.KINDS}")
        self.kinds = tuple(kinds)

    def __call__(
        self, image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        kind = self.kinds[rng.integers(len(self.kinds))]
        alpha = np.zeros((h, w), dtype=np.uint8)
        if kind == "hand":
            centre = landmarks[rng.integers(5)] + rng.normal(0, 8, size=2)
            axes = (int(rng.uniform(14, 34)), int(rng.uniform(22, 44)))
            cv2.ellipse(alpha, _pt(centre), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
            for _ in range(int(rng.integers(0, 5))):  # fingers
                tip = centre + rng.normal(0, 22, size=2)
                cv2.line(alpha, _pt(centre), _pt(tip), 255, int(rng.integers(5, 10)))
        elif kind == "bar":
            thickness = int(rng.uniform(10, 34))
            target = landmarks[rng.integers(5)]
            angle = rng.uniform(-0.6, 0.6) + (np.pi / 2 if rng.random() < 0.3 else 0.0)
            d = np.array([np.cos(angle), np.sin(angle)]) * 200
            cv2.line(alpha, _pt(target - d), _pt(target + d), 255, thickness)
        elif kind == "scarf":
            top = float(rng.uniform(landmarks[2, 1] - 4, (landmarks[3, 1] + landmarks[4, 1]) / 2 + 6))
            xs = np.linspace(-5, w + 5, 12)
            ys = top + rng.normal(0, 3, size=xs.size)
            poly = np.concatenate([np.stack([xs, ys], 1), [[w + 5, h + 5], [-5, h + 5]]])
            cv2.fillPoly(alpha, [poly.round().astype(np.int32)], 255)
        else:
            centre = rng.uniform(20, 92, size=2)
            if rng.random() < 0.5:
                n = int(rng.integers(3, 9))
                angles = np.sort(rng.uniform(0, 2 * np.pi, n))
                radii = rng.uniform(10, 34, n)
                poly = centre + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
                cv2.fillPoly(alpha, [poly.round().astype(np.int32)], 255)
            else:
                axes = (int(rng.uniform(8, 36)), int(rng.uniform(8, 36)))
                cv2.ellipse(alpha, _pt(centre), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        opacity = 1.0 if rng.random() < 0.8 else rng.uniform(0.7, 1.0)
        return composite(image, _texture(rng, (h, w)), alpha.astype(np.float32) / 255.0 * opacity)


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))


class OcclusionAugmenter:
    """Picks an occluder by weight; ``None`` weights mean that family is unavailable.

    Args:
        occluders: ``(occluder, weight)`` pairs.
        probability: chance that a face is occluded at all (clean faces target all-visible).
    """

    def __init__(self, occluders: Sequence[tuple[Occluder, float]], probability: float = 0.5) -> None:
        self.occluders = [(o, w) for o, w in occluders if w > 0]
        if not self.occluders:
            raise ValueError("no occluders with positive weight")
        total = sum(w for _, w in self.occluders)
        self.weights = np.array([w / total for _, w in self.occluders])
        self.probability = probability

    @classmethod
    def from_folder(
        cls,
        occluder_root: str | Path | None,
        probability: float = 0.5,
        weights: dict[str, float] | None = None,
        mask_names: Sequence[str] | None = None,
        sunglasses_names: Sequence[str] | None = None,
        exclude_eval: bool = True,
    ) -> OcclusionAugmenter:
        """Masks and sunglasses from ``occluder_root`` when present, procedural occluders always.

        ``exclude_eval`` (default) leaves out :data:`EVAL_MASKS` and :data:`EVAL_SUNGLASSES`, the
        instances reserved for evaluation; ``weights`` of 0 drop a family.
        """
        weights = {"mask": 0.4, "sunglasses": 0.25, "procedural": 0.35, **(weights or {})}
        pairs: list[tuple[Occluder, float]] = []
        if weights["procedural"] > 0:
            pairs.append((ProceduralOccluder(), weights["procedural"]))
        root = Path(occluder_root) if occluder_root else None
        if root is not None and (root / "masks" / "masks.cfg").exists() and weights["mask"] > 0:
            masks = load_mask_templates(root / "masks", mask_names, EVAL_MASKS if exclude_eval else ())
            if masks:
                pairs.append((MaskOccluder(masks), weights["mask"]))
        if root is not None and (root / "sunglasses").is_dir() and weights["sunglasses"] > 0:
            glasses = load_sunglasses_templates(
                root / "sunglasses", sunglasses_names, EVAL_SUNGLASSES if exclude_eval else ()
            )
            if glasses:
                pairs.append((SunglassesOccluder(glasses), weights["sunglasses"]))
        if not any(isinstance(o, (MaskOccluder, SunglassesOccluder)) for o, _ in pairs):
            logger.info("no mask or sunglasses templates under %s", occluder_root)
        return cls(pairs, probability)

    def __call__(
        self, image: np.ndarray, landmarks: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, str | None]:
        """Returns (image, visible mask, occluder name or None when left clean)."""
        if rng.random() >= self.probability:
            return image, np.ones(image.shape[:2], dtype=np.float32), None
        return self.occlude(image, landmarks, rng)

    def occlude(
        self, image: np.ndarray, landmarks: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Always occlude: pick an occluder by weight and apply it (landmarks default to the template)."""
        lm = (
            ARCFACE_TEMPLATE * (image.shape[0] / 112.0)
            if landmarks is None
            else np.asarray(landmarks, dtype=np.float64)
        )
        occluder = self.occluders[rng.choice(len(self.occluders), p=self.weights)][0]
        out, visible = occluder(image, lm, rng)
        return out, visible, occluder.name
