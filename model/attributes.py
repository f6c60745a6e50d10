"""Occlusion attributes of a face, read from its 7x7 visibility map: which regions are hidden, and what by.

The occlusion head predicts, per cell of the aligned 112x112 crop (16 px cells), how visible the
face is (1 = visible). On the ArcFace template the eyes sit in row 3, the nose tip in row 4 and
the mouth in row 5, so the regions are blocks of cells (rows, columns; the outer columns are
mostly background):

- ``forehead``: rows 0-1, columns 1-5
- ``eyes``: rows 2-3, columns 1-5
- ``nose``: row 4, columns 2-4
- ``mouth``: rows 5-6, columns 1-5
- ``lower_face``: rows 4-6, columns 2-4 (nose and mouth: what a mask covers)

A region is reported ``occluded`` when its mean visibility is below ``region_threshold`` (0.5:
more hidden than seen). The summaries answer the questions users ask (Azure Face reports the like):
``mask_like`` (the lower face hidden, as by a mask or a scarf: the fitted threshold on
``lower_face`` from ``oaml calibrate-attributes``, measured on real masked photos) and
``glasses_like`` (the eyes hidden, as by sunglasses: 0.5 on ``eyes``, with no real test set yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["REGIONS", "AttributeRules", "region_visibility"]

#: region -> (rows, columns) of the 7x7 grid (Python slices: stop excluded)
REGIONS: dict[str, tuple[slice, slice]] = {
    "forehead": (slice(0, 2), slice(1, 6)),
    "eyes": (slice(2, 4), slice(1, 6)),
    "nose": (slice(4, 5), slice(2, 5)),
    "mouth": (slice(5, 7), slice(1, 6)),
    "lower_face": (slice(4, 7), slice(2, 5)),
}
#: the regions a response lists one by one (``lower_face`` only feeds ``mask_like``)
REPORTED = ("forehead", "eyes", "nose", "mouth")


def region_visibility(visibility_map: np.ndarray) -> dict[str, float]:
    """Mean visibility of each region of a ``[7, 7]`` map (1 = visible)."""
    grid = np.asarray(visibility_map, dtype=np.float64).reshape(7, 7)
    return {name: float(grid[rows, cols].mean()) for name, (rows, cols) in REGIONS.items()}


@dataclass(frozen=True)
class AttributeRules:
    """The thresholds that turn region visibility into attributes, and what they were measured to do.

    Attributes:
        region_threshold: a region is occluded below this mean visibility.
        mask_threshold: ``mask_like`` when ``lower_face`` is below this.
        glasses_threshold: ``glasses_like`` when ``eyes`` is below this.
        measured: the fit's and the evaluation's numbers (metadata ``attributes``), for the card.
    """

    region_threshold: float = 0.5
    mask_threshold: float = 0.5
    glasses_threshold: float = 0.5
    measured: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, raw: dict[str, Any] | None) -> AttributeRules:
        raw = raw or {}
        return cls(
            float(raw.get("region_threshold", 0.5)),
            float(raw.get("mask_threshold", 0.5)),
            float(raw.get("glasses_threshold", 0.5)),
            {k: v for k, v in raw.items() if k not in ("region_threshold", "mask_threshold", "glasses_threshold")},
        )

    def to_metadata(self) -> dict[str, Any]:
        return {
            "region_threshold": self.region_threshold,
            "mask_threshold": self.mask_threshold,
            "glasses_threshold": self.glasses_threshold,
            **self.measured,
        }

    def describe(self, visibility_map: np.ndarray) -> dict[str, Any]:
        """The attributes of one face: region visibility, which regions are occluded, and the summaries."""
        seen = region_visibility(visibility_map)
        return {
            "regions": {name: round(seen[name], 4) for name in REPORTED},
            "occluded": {name: seen[name] < self.region_threshold for name in REPORTED},
            "mask_like": seen["lower_face"] < self.mask_threshold,
            "glasses_like": seen["eyes"] < self.glasses_threshold,
        }
