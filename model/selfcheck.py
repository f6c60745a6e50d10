"""A start-up self-check of the backbone path about to be served, against PyTorch fp32 on bundled faces.

Why: a faster path (OpenVINO int8 or bf16) serves the calibration's thresholds only where ``oaml check-engine``
vouched for it on the same instruction-set class (:mod:`model.cpu`), but a CPU nobody measured, a new OpenVINO
or a broken driver can still compute something else. Before the service reports ready it embeds a few faces
through the chosen path and through PyTorch in fp32 (the exact function the weights define) and compares the
embeddings and the fused scores of every pair. A path whose drift is beyond :data:`MIN_COSINE` or
:data:`MAX_SCORE_DRIFT` is not served: the service falls back to the next safe path and says so (``/info``,
the log).

The faces: one aligned crop of scikit-image's astronaut photo (NASA, public domain), shipped in
``model/assets``, and variants of it made here (dim light, blur, a mask-like band, dark glasses, a small
turn), so that activations span the ranges real faces give. Six faces, to keep start-up short. The bounds sit
well outside what healthy paths drift on them (bench/RESULTS.md, "Start-up self-check") and well inside what a
broken one does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model.calibration import Calibration
from model.card import WeightsCard
from model.cpu import isa_class
from model.embedder import BackbonePlan, Embedder, plan_backbone, precision_name, score_pairs, select_device
from model.net import OAMLNet
from model.qaconv import QAConv

__all__ = [
    "ASSET",
    "MIN_COSINE",
    "MAX_SCORE_DRIFT",
    "SelfCheck",
    "ServedPath",
    "selfcheck_crops",
    "self_check",
    "serve_backbone",
]

logger = logging.getLogger(__name__)

ASSET = Path(__file__).resolve().parent / "assets" / "astronaut_112.png"

#: Every face's embedding through the served path must have at least this cosine with PyTorch fp32's.
MIN_COSINE = 0.99
#: ... and every pair's fused score (a logit) may move at most this much (the presets are 4 to 6 logits apart).
MAX_SCORE_DRIFT = 0.5


@dataclass(frozen=True)
class SelfCheck:
    """The outcome of :func:`self_check`: the worst embedding cosine and fused-score move over the faces."""

    path: str
    min_cosine: float
    max_score_drift: float
    faces: int
    pairs: int
    seconds: float

    @property
    def passes(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.max_score_drift <= MAX_SCORE_DRIFT

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "passes": self.passes,
            "bounds": {"min_cosine": MIN_COSINE, "max_score_drift": MAX_SCORE_DRIFT},
        }


def selfcheck_crops() -> np.ndarray:
    """``[6, 112, 112, 3]`` RGB uint8: the bundled crop and five variants of it (about a second through both
    paths on a 2-core CPU, with the flip test)."""
    bgr = cv2.imread(str(ASSET), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"the self-check face {ASSET} is missing from the installation")
    face = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    masked = face.copy()
    masked[72:112, 20:92] = (205, 210, 215)  # a pale band over mouth and chin, as a mask
    glasses = face.copy()
    glasses[40:62, 24:52] = 20
    glasses[40:62, 60:88] = 20
    turn = cv2.getRotationMatrix2D((56.0, 56.0), 8.0, 1.05)
    variants = [  # no mirror image: with the flip test a face and its mirror embed alike
        face,
        np.clip(face.astype(np.float32) * 0.55, 0, 255).astype(np.uint8),
        cv2.GaussianBlur(face, (0, 0), 1.6),
        masked,
        glasses,
        cv2.warpAffine(face, turn, (112, 112), borderMode=cv2.BORDER_REFLECT),
    ]
    return np.stack(variants)


def self_check(candidate: Embedder, reference: Embedder, qaconv: QAConv, calibration: Calibration) -> SelfCheck:
    """Embed :func:`selfcheck_crops` through ``candidate`` and ``reference`` (PyTorch fp32, the same flip
    test) and compare: the lowest embedding cosine between the two, and the largest fused-score difference over
    every pair of faces (cosine, QAConv and visibility as the service fuses them)."""
    started = time.perf_counter()
    crops = selfcheck_crops()
    got, want = candidate(crops), reference(crops)
    cosine = float((got.embedding * want.embedding).sum(1).min())
    ia, ib = np.triu_indices(len(crops), 1)
    served = score_pairs(qaconv, got, got, ia, ib)
    exact = score_pairs(qaconv, want, want, ia, ib)
    drift = np.abs(
        calibration.score(served.cos, served.qa, served.visibility, served.norm)
        - calibration.score(exact.cos, exact.qa, exact.visibility, exact.norm)
    )
    return SelfCheck(
        path=f"{candidate.engine} {candidate.precision}",
        min_cosine=round(cosine, 6),
        max_score_drift=round(float(drift.max()), 6),
        faces=len(crops),
        pairs=len(ia),
        seconds=round(time.perf_counter() - started, 3),
    )


@dataclass(frozen=True)
class ServedPath:
    """What runs the backbone and why (``/info.backbone_path``, the start-up log).

    Attributes:
        cpu_class: this CPU's instruction-set class (:func:`model.cpu.isa_class`).
        served: ``"<engine> <precision>"`` of the embedder in use.
        vouched_on: the CPU classes whose recorded ``oaml check-engine`` vouches for the served path (empty for
            PyTorch and for OpenVINO fp32, which compute the weights' own function, and for a forced path).
        self_check: the start-up self-check of the served path (None where none ran: PyTorch).
        fallbacks: the paths tried first and refused, each with its reason.
        forced: the path was asked for by ``OAML_ENGINE``/``OAML_PRECISION``, not chosen by ``auto``.
    """

    cpu_class: str
    served: str
    vouched_on: tuple[str, ...] = ()
    self_check: SelfCheck | None = None
    fallbacks: tuple[str, ...] = ()
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_class": self.cpu_class,
            "served": self.served,
            "vouched_on": list(self.vouched_on),
            "self_check": self.self_check.to_dict() if self.self_check is not None else None,
            "fallbacks": list(self.fallbacks),
            "forced": self.forced,
        }


def serve_backbone(
    model: OAMLNet,
    card: WeightsCard,
    device: str | torch.device = "auto",
    precision: str = "auto",
    engine: str = "auto",
    batch_size: int = 64,
    threads: int = 1,
    flags: str | None = None,
) -> tuple[Embedder, ServedPath]:
    """The embedder the service runs, and why.

    ``auto`` serves a faster path (OpenVINO int8 or bf16) only where a passed ``oaml check-engine`` recorded on
    this CPU's instruction-set class vouches for it; then the path must pass :func:`self_check` at start-up too,
    else the next safer one is tried (int8 -> OpenVINO fp32 or PyTorch bf16 -> PyTorch), down to PyTorch, which
    is the weights' own function. A path forced by the settings (``engine`` other than ``auto``, ``precision``
    ``int8``) is served as asked, its self-check reported and logged, never silently replaced.
    """
    cpu_class = isa_class(flags)
    dev = select_device(device)
    vouched = set(card.vouched_for(cpu_class))
    anywhere = {(e, p) for e, p, _ in card.engine_checks}
    has_recipe = card.int8 is not None
    forced = engine != "auto" or precision == "int8"
    fallbacks: list[str] = []
    wanted = plan_backbone(precision, engine, dev, anywhere, has_recipe, flags)
    chosen = plan_backbone(precision, engine, dev, vouched, has_recipe, flags)
    if wanted != chosen:
        on = ", ".join(card.vouched_classes(wanted.engine, _precision(wanted))) or "none"
        fallbacks.append(f"{wanted.path}: no passed check on a CPU of class {cpu_class} (checked on: {on})")

    def build(setting: str) -> Embedder:
        return Embedder(
            model, dev, precision, batch_size=batch_size, engine=setting, version=card.model_version,
            threads=threads, vouched=vouched, int8=card.int8, flags=flags,
        )  # fmt: skip

    embedder = build(engine)
    check: SelfCheck | None = None
    if embedder.device.type == "cpu" and embedder.engine != "torch":
        reference = Embedder(model, dev, "fp32", flip=embedder.flip, engine="torch")
        while True:
            check = self_check(embedder, reference, model.qaconv, card.calibration)
            if check.passes or forced or embedder.engine == "torch":
                break
            fallbacks.append(
                f"{embedder.path}: start-up self-check failed (lowest cosine {check.min_cosine:.4f}, fused score "
                f"moved {check.max_score_drift:.3f})"
            )
            vouched.discard((embedder.engine, embedder.precision))
            refused = {f.split(":", 1)[0] for f in fallbacks}
            embedder = build(engine)
            if embedder.path in refused:
                embedder = build("torch")
            if embedder.engine == "torch":
                check = None
                break
        if check is not None and not check.passes:
            logger.error(
                "the backbone runs on %s as the settings ask, but its start-up self-check failed (lowest cosine %.4f, "
                "fused score moved %.3f): thresholds and probabilities may be off",
                embedder.path,
                check.min_cosine,
                check.max_score_drift,
            )
    served = ServedPath(
        cpu_class=cpu_class,
        served=embedder.path,
        vouched_on=tuple(card.vouched_classes(embedder.engine, embedder.precision)),
        self_check=check,
        fallbacks=tuple(fallbacks),
        forced=forced,
    )
    for why in fallbacks:
        logger.warning("not serving %s; serving %s", why, embedder.path)
    calibrated = card.calibration.fitted and embedder.engine != "torch" and embedder.precision != "float32"
    if calibrated and cpu_class not in served.vouched_on:  # forced: allowed, but not silently
        logger.warning(
            "the backbone runs on %s, which the calibration was not checked for on a CPU of class %s: thresholds and "
            "probabilities may be off; run `oaml check-engine` on one and record it",
            embedder.path,
            cpu_class,
        )
    return embedder, served


def _precision(plan: BackbonePlan) -> str:
    return "int8" if plan.int8 else precision_name(plan.autocast)
