"""Occlusion heatmaps as PNG: the aligned crop with its 7x7 visibility map over it and a colour bar."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["heatmap_png", "colormap", "BAR_WIDTH"]

BAR_WIDTH = 48
# red (hidden, 0) -> amber -> green (visible, 1)
_STOPS = np.array([[0.0, 215, 48, 39], [0.5, 254, 224, 139], [1.0, 26, 152, 80]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Visibility in [0, 1] -> RGB uint8 (red = hidden, green = visible)."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def heatmap_png(crop: np.ndarray | None, visibility: np.ndarray, scale: int = 2, alpha: float = 0.45) -> bytes:
    """PNG of ``crop`` (RGB, 112x112; grey when absent) at ``scale``, overlaid with the visibility map.

    The picture is ``(112*scale + BAR_WIDTH) x 112*scale``: the face on the left, a colour bar
    labelled 0 (hidden) to 1 (visible) on the right.
    """
    size = 112 * scale
    base = np.full((112, 112, 3), 96, dtype=np.uint8) if crop is None else crop
    base = cv2.resize(base, (size, size), interpolation=cv2.INTER_LINEAR)
    vis = cv2.resize(
        np.asarray(visibility, dtype=np.float32).reshape(7, 7), (size, size), interpolation=cv2.INTER_NEAREST
    )
    overlay = (base.astype(np.float32) * (1 - alpha) + colormap(vis).astype(np.float32) * alpha).astype(np.uint8)
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
