"""The weights card: an OAML file's metadata as one typed object, validated once when it is read.

Metadata is JSON written by several tools over a file's life (the trainer, ``oaml calibrate``,
``oaml eval --record``, the AdaFace importer), so any key may be missing from an older or an
imported file. Readers used to guess with chains of ``.get(...) or default``; here every default
is decided in one place, every value the service relies on is checked once, and a file that
cannot be served fails at start-up with a message that names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from model.attributes import AttributeRules
from model.calibration import DEFAULT_CALIBRATION, PRESETS, Calibration
from model.errors import CheckpointError
from model.quantize import Int8Recipe

__all__ = ["QualityStats", "WeightsCard"]

#: Used when a file carries no norm statistics (an imported backbone): typical of IR models.
_DEFAULT_NORM = (20.0, 10.0)


@dataclass(frozen=True)
class QualityStats:
    """Mean and spread of the AdaFace feature norm on training faces: ``quality = (norm - mean) / std``."""

    norm_mean: float
    norm_std: float

    def standardise(self, norm: float) -> float:
        return (norm - self.norm_mean) / max(self.norm_std, 1e-6)


@dataclass(frozen=True)
class WeightsCard:
    """What a weights file says about itself.

    Attributes:
        model_version: architecture and content hash; galleries are keyed by it.
        architecture, embedding_size, dtype: as stored.
        calibration: the fitted fusion and presets, or :data:`DEFAULT_CALIBRATION`.
        calibrated_on: how the calibration pairs were embedded (``device``, ``precision``,
            ``flip``), or ``None`` for a file calibrated before that was recorded.
        quality: norm statistics for the quality score.
        lfw_presets: per preset, ``{"tar", "far"}`` on LFW clean pairs (``oaml eval --record``).
        attributes: the thresholds of the occlusion attributes (``oaml calibrate-attributes``), or defaults.
        engine_checks: ``(engine, precision, cpu class)`` of every ``oaml check-engine`` against this calibration
            that passed (``calibration.engine_checks``): the faster paths ``auto`` may serve it with, and on which
            instruction-set class (:func:`model.cpu.isa_class`) each was measured. A check that names no class
            (recorded before checks did) vouches for none. An int8 check vouches only for the recipe it checked
            (a new ``oaml quantize`` needs a new check).
        int8: the int8 recipe (``oaml quantize``), or ``None``.
        metadata: the raw document, for tools that show it whole.
    """

    model_version: str
    architecture: str
    embedding_size: int
    dtype: str
    calibration: Calibration
    calibrated_on: dict[str, Any] | None
    quality: QualityStats
    lfw_presets: dict[str, dict[str, float]] = field(default_factory=dict)
    attributes: AttributeRules = field(default_factory=AttributeRules)
    engine_checks: frozenset[tuple[str, str, str | None]] = frozenset()
    int8: Int8Recipe | None = None
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def vouched_for(self, cpu_class: str) -> frozenset[tuple[str, str]]:
        """The ``(engine, precision)`` pairs a passed check vouches for on CPUs of ``cpu_class``."""
        return frozenset((engine, precision) for engine, precision, isa in self.engine_checks if isa == cpu_class)

    def vouched_classes(self, engine: str, precision: str) -> list[str]:
        """The CPU classes on which a passed check vouches for ``engine`` at ``precision`` (for messages)."""
        return sorted({isa for e, p, isa in self.engine_checks if (e, p) == (engine, precision) and isa})

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> WeightsCard:
        """Validate and type a metadata document.

        Raises:
            CheckpointError: a key the service needs is missing or malformed.
        """
        for key in ("model_version", "architecture"):
            if not isinstance(meta.get(key), str):
                raise CheckpointError(f"weights metadata lacks {key!r}")
        channel_order = (meta.get("input") or {}).get("channel_order", "BGR")
        if channel_order != "BGR":
            raise CheckpointError(f"weights expect {channel_order} input; OAML feeds BGR (the AdaFace convention)")
        raw_cal = meta.get("calibration")
        calibration = Calibration.from_dict(raw_cal) if raw_cal else DEFAULT_CALIBRATION
        if calibration.fitted:
            missing = set(PRESETS) - set(calibration.thresholds)
            if missing:
                raise CheckpointError(f"weights calibration lacks preset thresholds {sorted(missing)}")
            numbers = [
                calibration.cos_std,
                calibration.qa_std,
                calibration.intercept,
                *calibration.coef,
                *calibration.thresholds.values(),
            ]
            if not all(math.isfinite(float(v)) for v in numbers):
                raise CheckpointError("weights calibration holds a non-finite number")
        quality = meta.get("quality") or {}
        mean, std = quality.get("norm_mean"), quality.get("norm_std")
        stats = (
            QualityStats(float(mean), float(std))
            if mean is not None and std is not None
            else QualityStats(*_DEFAULT_NORM)
        )
        clean = (((meta.get("metrics") or {}).get("lfw") or {}).get("protocols") or {}).get("clean") or {}
        lfw = {
            name: {"tar": float(row["tar"]), "far": float(row["far"])}
            for name, row in (clean.get("presets") or {}).items()
        }
        int8 = None
        if meta.get("int8"):
            try:
                int8 = Int8Recipe.from_dict(meta["int8"])
            except ValueError as exc:
                raise CheckpointError(f"weights metadata: {exc}") from exc
        return cls(
            model_version=meta["model_version"],
            architecture=meta["architecture"],
            embedding_size=int(meta.get("embedding_size", 512)),
            dtype=str(meta.get("dtype", "float32")),
            calibration=calibration,
            calibrated_on=(raw_cal or {}).get("embedding"),
            quality=stats,
            lfw_presets=lfw,
            attributes=AttributeRules.from_metadata(meta.get("attributes")),
            engine_checks=frozenset(
                (str(c["engine"]), str(c["precision"]), str(c["isa"]) if c.get("isa") else None)
                for c in (raw_cal or {}).get("engine_checks") or []
                if c.get("passes") is True
                and "engine" in c
                and "precision" in c
                and (c["precision"] != "int8" or (int8 is not None and c.get("int8_recipe") == int8.fingerprint()))
            ),
            int8=int8,
            metadata=meta,
        )
