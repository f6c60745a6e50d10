"""Occlusion heatmaps as PNG: the aligned crop with its 7x7 visibility map over it and a colour bar."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["heatmap_png", "explanation_png", "colormap", "BAR_WIDTH"]

BAR_WIDTH = 48
# red (hidden, 0) -> amber -> green (visible, 1)
_STOPS = np.array([[0.0, 215, 48, 39], [0.5, 254, 224, 139], [1.0, 26, 152, 80]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Visibility in [0, 1] -> RGB uint8 (red = hidden, green = visible)."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def _overlay(crop: np.ndarray, visibility: np.ndarray, size: int, alpha: float) -> np.ndarray:
    """The crop at ``size`` with its 7x7 visibility map blended in (red hidden, green visible)."""
    base = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    vis = cv2.resize(
        np.asarray(visibility, dtype=np.float32).reshape(7, 7), (size, size), interpolation=cv2.INTER_NEAREST
    )
    return (base.astype(np.float32) * (1 - alpha) + colormap(vis).astype(np.float32) * alpha).astype(np.uint8)


def heatmap_png(crop: np.ndarray | None, visibility: np.ndarray, scale: int = 2, alpha: float = 0.45) -> bytes:
    """PNG of ``crop`` (RGB, 112x112; grey when absent) at ``scale``, overlaid with the visibility map.

    The picture is ``(112*scale + BAR_WIDTH) x 112*scale``: the face on the left, a colour bar
    labelled 0 (hidden) to 1 (visible) on the right.
    """
    size = 112 * scale
    base = np.full((112, 112, 3), 96, dtype=np.uint8) if crop is None else crop
    overlay = _overlay(base, visibility, size, alpha)
    canvas = Image.new("RGB", (size + BAR_WIDTH, size), "white")
    canvas.paste(Image.fromarray(overlay), (0, 0))
    ramp = np.linspace(1.0, 0.0, size - 20)[:, None].repeat(14, axis=1)
    canvas.paste(Image.fromarray(colormap(ramp)), (size + 6, 10))
    draw = ImageDraw.Draw(canvas)
    draw.text((size + 23, 6), "1", fill="black")
    draw.text((size + 23, size // 2 - 6), ".5", fill="black")
    draw.text((size + 23, size - 18), "0", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def explanation_png(
    crop_a: np.ndarray,
    crop_b: np.ndarray,
    visibility_a: np.ndarray,
    visibility_b: np.ndarray,
    matches: list[tuple[int, int, float]],
    caption: list[str],
    scale: int = 3,
    alpha: float = 0.35,
) -> bytes:
    """Two aligned crops side by side with their visibility blended in and lines between matched locations.

    ``matches``: ``(location on a, location on b, similarity)`` with locations 0-48 row-major on the
    7x7 grid; each line is coloured by its similarity (red 0 to green 1). ``caption``: text lines
    under the faces.
    """
    size, gap, line_h = 112 * scale, 60, 16
    width, height = 2 * size + gap, size + 12 + line_h * len(caption) + 8
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(Image.fromarray(_overlay(crop_a, visibility_a, size, alpha)), (0, 0))
    canvas.paste(Image.fromarray(_overlay(crop_b, visibility_b, size, alpha)), (size + gap, 0))
    draw = ImageDraw.Draw(canvas)
    cell = size / 7

    def centre(location: int, left: float) -> tuple[float, float]:
        return left + (location % 7 + 0.5) * cell, (location // 7 + 0.5) * cell

    for a, b, similarity in sorted(matches, key=lambda m: m[2]):  # strongest drawn last, on top
        colour = tuple(int(c) for c in colormap(np.array([similarity]))[0])
        xa, ya = centre(a, 0)
        xb, yb = centre(b, size + gap)
        draw.line((xa, ya, xb, yb), fill=colour, width=2)
        for x, y in ((xa, ya), (xb, yb)):
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour, outline="black")
    for i, text in enumerate(caption):
        draw.text((6, size + 10 + i * line_h), text, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
