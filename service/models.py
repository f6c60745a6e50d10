"""The weights the service serves, by model version: the default ones and those collections still use.

A collection is matched with the model version its faces were embedded by (:mod:`service.gallery`), so the
service may hold several sets of weights at once: the default (``OAML_WEIGHTS``: new collections take it,
``/verify`` uses it) and any other a collection, a migration's target or a rollback needs, found by version in
``OAML_WEIGHTS_DIR`` (every ``*.safetensors`` there is read for its version, its tensors only when needed).

:class:`ServedModel` is one of them with everything that decides with it: its embedding path (engine,
precision, self-checked: :func:`model.selfcheck.serve_backbone`), its calibration and thresholds, its quality
statistics and its QAConv. :class:`ModelShelf` finds and loads them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.card import WeightsCard
from model.checkpoint import load_checkpoint, read_metadata
from model.embedder import Embedder, Features, score_pairs
from model.errors import CheckpointError
from model.net import OAMLNet
from model.openset import IDENTIFY_PRESETS
from model.qaconv import PairExplanation
from model.selfcheck import ServedPath, serve_backbone
from service.config import Settings
from service.errors import ModelNotAvailable

__all__ = ["ServedModel", "ModelShelf", "WeightsFile"]

logger = logging.getLogger(__name__)


class ServedModel:
    """One set of weights as the service runs it.

    Args:
        model: the network (its QAConv scores pairs; its backbone runs through ``embedder``).
        card: the weights' metadata, typed.
        embedder: the embedding path chosen for this CPU (``served_path`` says why).
        settings: the service's settings (default threshold).
        load_seconds: how long loading took (weights, export, self-check).
    """

    def __init__(
        self,
        model: OAMLNet,
        card: WeightsCard,
        embedder: Embedder,
        served_path: ServedPath,
        settings: Settings,
        load_seconds: float = 0.0,
    ) -> None:
        self.model = model
        self.card = card
        self.embedder = embedder
        self.served_path = served_path
        self.settings = settings
        self.load_seconds = load_seconds
        self.version = card.model_version
        self.calibration = card.calibration
        self.device = embedder.device
        fitted_on = card.calibrated_on
        if fitted_on is not None and fitted_on.get("flip") != embedder.flip:
            logger.warning(
                "the calibration of %s was fitted with flip test %s, the service embeds with %s: thresholds and "
                "probabilities will be off; re-run `oaml calibrate`",
                self.version,
                fitted_on.get("flip"),
                embedder.flip,
            )

    @classmethod
    def build(cls, model: OAMLNet, card: WeightsCard, settings: Settings) -> ServedModel:
        """The model on the embedding path :func:`model.selfcheck.serve_backbone` chooses for this CPU."""
        started = time.perf_counter()
        assert settings.torch_threads is not None  # sized by Settings
        embedder, served = serve_backbone(
            model,
            card,
            device=settings.device,
            precision=settings.precision,
            engine=settings.engine,
            batch_size=settings.max_batch,
            threads=settings.torch_threads,
        )
        return cls(embedder.model.eval(), card, embedder, served, settings, time.perf_counter() - started)

    def describe(self) -> dict[str, Any]:
        """For /info and logs: version, architecture, the backbone's path."""
        return {
            "model_version": self.version,
            "architecture": self.card.architecture,
            "engine": self.embedder.engine,
            "precision": self.embedder.precision,
            "load_seconds": round(self.load_seconds, 2),
        }

    # -- features and scores (device work: call through the engine's worker) ---------------------

    def forward(self, crops: np.ndarray) -> Features:
        return self.embedder.forward(crops)

    def quality(self, norm: float) -> float:
        """Standardised AdaFace norm: how far above or below a typical training face of these weights."""
        return self.card.quality.standardise(norm)

    def score(
        self, a: Features, b: Features, ia: np.ndarray | None = None, ib: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Component scores, fused score and probability of pairs ``(a[ia[k]], b[ib[k]])``: the calibrated path."""
        s = score_pairs(self.model.qaconv, a, b, ia, ib)
        fused = self.calibration.score(s.cos, s.qa, s.visibility, s.norm)
        return {
            "adaface": s.cos,
            "qaconv": s.qa,
            "visibility": s.visibility,
            "norm": s.norm,
            "fused": fused,
            "probability": self.calibration.probability(fused),
        }

    def explain(self, a: Features, b: Features) -> PairExplanation:
        """QAConv's score of one pair (``a[0]``, ``b[0]``), location by location."""
        dev = self.device
        return self.model.qaconv.explain_pair(
            a.feature_map[0].to(dev), b.feature_map[0].to(dev), a.occlusion[0].to(dev), b.occlusion[0].to(dev)
        )

    # -- decisions --------------------------------------------------------------------------------

    def resolve_threshold(self, value: str | float | None) -> tuple[float, str | None]:
        """(fused-score threshold, preset name or None) for a preset name or a finite number."""
        value = self.settings.default_threshold if value is None or value == "" else value
        if isinstance(value, str) and value in self.calibration.thresholds:
            return float(self.calibration.thresholds[value]), value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(
                f"threshold must be a finite number or one of {sorted(self.calibration.thresholds)}, got {value!r}"
            )
        return number, None

    def resolve_identify_threshold(self, value: str | float | None, faces: int) -> tuple[float, str | None, float]:
        """(fused-score threshold, preset name or None, modelled FPIR) of a 1:N decision over ``faces`` enrolled
        faces: a preset is an FPIR target (:data:`model.openset.IDENTIFY_PRESETS`) turned into the threshold
        for this gallery size; a number stays in score units and gets the FPIR it implies."""
        model = self.calibration.identify_model
        value = self.settings.default_threshold if value is None or value == "" else value
        if isinstance(value, str) and value in IDENTIFY_PRESETS:
            target = IDENTIFY_PRESETS[value]
            return model.threshold(target, faces), value, target
        number, _ = self.resolve_threshold(value)
        return number, None, model.fpir(number, faces)


@dataclass(frozen=True)
class WeightsFile:
    """A weights file found on the shelf: where it is and the version its metadata names."""

    path: Path
    version: str


class ModelShelf:
    """Finds weights by model version and loads each once (thread-safe).

    Args:
        settings: ``weights`` (the default) and ``weights_dir`` (where other versions are looked for).
        default: the default weights already loaded (tests inject one), else loaded from ``settings.weights``.
    """

    def __init__(self, settings: Settings, default: ServedModel | None = None) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}
        if default is None:
            model, meta = load_checkpoint(settings.weights)
            default = ServedModel.build(model, WeightsCard.from_metadata(meta), settings)
        self.default = default
        self.loaded: dict[str, ServedModel] = {default.version: default}

    def folder(self) -> Path:
        """Where other versions are looked for: ``OAML_WEIGHTS_DIR``, else the default weights' folder."""
        return self.settings.weights_dir or Path(self.settings.weights).resolve().parent

    def available(self) -> dict[str, WeightsFile]:
        """Version -> weights file, for every OAML weights file in :meth:`folder` (metadata only; unreadable
        files are skipped with a log line). The default weights are always there."""
        found = {self.default.version: WeightsFile(Path(self.settings.weights), self.default.version)}
        folder = self.folder()
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                version = str(read_metadata(path)["model_version"])
            except (CheckpointError, KeyError, ValueError) as exc:
                logger.warning("not a weights file the service can serve: %s (%s)", path, exc)
                continue
            found.setdefault(version, WeightsFile(path, version))
        return found

    def get(self, version: str) -> ServedModel:
        """The loaded model of ``version`` (:class:`ModelNotAvailable` when it is not loaded)."""
        found = self.loaded.get(version)
        if found is None:
            raise ModelNotAvailable(f"model version {version} is not loaded")
        return found

    def load(self, version: str) -> ServedModel:
        """The model of ``version``, loaded from :meth:`folder` the first time it is asked for (seconds: the
        weights, the engine's export and compilation, the self-check). Concurrent callers wait for one load.

        Raises:
            ModelNotAvailable: no weights file of that version is there, or its tensors do not match it.
        """
        while True:
            with self._lock:
                if version in self.loaded:
                    return self.loaded[version]
                waiting = self._loading.get(version)
                if waiting is None:
                    self._loading[version] = threading.Event()
                    break
            waiting.wait()
        try:
            served = self._load(version)
            with self._lock:
                self.loaded[version] = served
            return served
        finally:
            with self._lock:
                self._loading.pop(version).set()

    def _load(self, version: str) -> ServedModel:
        found = self.available().get(version)
        if found is None:
            raise ModelNotAvailable(
                f"no weights of model version {version} in {self.folder()} (OAML_WEIGHTS_DIR): put the weights file "
                "there (any name ending .safetensors)",
                version=version,
            )
        try:
            model, meta = load_checkpoint(found.path)
        except CheckpointError as exc:
            raise ModelNotAvailable(f"the weights {found.path} cannot be served: {exc}", version=version) from exc
        served = ServedModel.build(model, WeightsCard.from_metadata(meta), self.settings)
        logger.info(
            "loaded model %s from %s in %.1f s (%s)", version, found.path, served.load_seconds, served.embedder.path
        )
        return served

    def unload(self, version: str) -> None:
        """Forget a loaded model no collection needs any more (never the default)."""
        if version != self.default.version:
            with self._lock:
                self.loaded.pop(version, None)
