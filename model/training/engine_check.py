"""May another backbone engine serve a weights file's calibration on this kind of CPU? (issue #23's bar)

The calibration's thresholds and probabilities are true for the score distribution of the path they were
fitted on (``calibration.embedding``: PyTorch, its precision, the flip test). An engine that changes the
numbers a little (OpenVINO's bf16 is not PyTorch's bf16 to the last bit) may serve them only if, on the
same calibration pairs, every preset's TAR and FAR move by at most 0.001 and LFW's fused accuracy by at
most 0.1 point; otherwise it needs a calibration of its own.

:func:`check_engine` measures that; ``oaml check-engine --record`` keeps the verdict inside the calibration
(``calibration.engine_checks``), which is where the service's ``auto`` engine looks before it serves a
faster path (:func:`model.selfcheck.serve_backbone`). A check names the instruction-set class it ran on
(:func:`model.cpu.isa_class`) and vouches for that class only: kernels differ between classes (int8 without VNNI
sums in saturating 16-bit lanes), so numbers measured on one need not hold on another. A new ``oaml calibrate``
writes a new calibration without the list: every check has to be made again against the new one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from model.calibration import Calibration
from model.cpu import cpu_description, isa_class
from model.embedder import Embedder
from model.quantize import Int8Recipe
from model.training.calibrate import export_check
from model.training.evaluate import evaluate_lfw, held_out_faces, validation_scores

__all__ = ["PRESET_BAR", "LFW_BAR", "check_engine", "markdown", "with_engine_check"]

#: Largest move of a preset's TAR or FAR on the calibration pairs.
PRESET_BAR = 0.001
#: Largest move of LFW's fused 10-fold accuracy (a fraction: 0.1 point).
LFW_BAR = 0.001
#: "Within the bar" holds at the bar itself: 6 of LFW's 6,000 pairs are 0.1 point, a difference of two
#: floating-point fractions that comes out a hair above 0.001.
_ROUNDING = 1e-9


def check_engine(
    model: Any,
    meta: dict[str, Any],
    engine: str,
    precision: str,
    data_root: Path,
    holdout: list[str],
    lfw_cache: Path,
    pairs: Path,
    occluders: Path | None = None,
    threads: int = 2,
    reference: str = "calibrated",
) -> dict[str, Any]:
    """Score the calibration pairs and LFW through the calibrated path and through ``engine`` at ``precision``.

    ``reference="fp32"`` measures against PyTorch fp32 instead of the calibrated path: for a CPU that would
    emulate the calibrated precision (PyTorch bf16 ran 0.9 faces/s on an AMD EPYC Milan, hours for the check),
    where fp32 is what runs without the candidate; the weights' ``export_check`` says how far fp32 is from the
    calibrated path (0.0008 of a preset's TAR for the shipped weights).

    Returns the verdict (``passes``), the per-preset rates of both paths, the largest moves, the runtime's
    version and the CPU class it ran on: what ``calibration.engine_checks`` keeps.
    """
    raw = meta.get("calibration") or {}
    if not raw.get("thresholds"):
        raise ValueError("the weights have no fitted calibration: nothing to check an engine against")
    cal = Calibration.from_dict(raw)
    served_as = raw["embedding"]
    setting = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[served_as["precision"]]
    started = time.perf_counter()
    recipe = Int8Recipe.from_dict(meta["int8"]) if meta.get("int8") else None
    if precision == "int8" and recipe is None:
        raise ValueError("the weights carry no int8 recipe: run `oaml quantize` on them first")
    if reference not in ("calibrated", "fp32"):
        raise ValueError(f"reference must be 'calibrated' or 'fp32', got {reference!r}")
    calibrated = Embedder(
        model, device="cpu", precision=setting if reference == "calibrated" else "fp32", flip=served_as["flip"]
    )
    candidate = Embedder(
        model,
        device="cpu",
        precision=precision,
        flip=served_as["flip"],
        engine=engine,
        version=meta["model_version"],
        threads=threads,
        int8=recipe,
    )
    images, labels, landmarks = held_out_faces(meta["training"]["config"], data_root, holdout, lineage=meta)
    occluder_root = str(occluders or data_root / "occluders")
    sampled = raw["pairs_sampled"]
    expected = validation_scores(calibrated, images, labels, landmarks, occluder_root, **sampled)
    scores = validation_scores(candidate, images, labels, landmarks, occluder_root, **sampled)
    check = export_check(cal, expected, scores, candidate.describe())
    lfw = {
        name: evaluate_lfw(embedder, lfw_cache, pairs, None, cal)["protocols"]["clean"]["fused"]["accuracy"]
        for name, embedder in (("calibrated", calibrated), ("candidate", candidate))
    }
    presets = {name: check[name] for name in cal.thresholds}
    worst = max(
        max(abs(r["tar_served"] - r["tar_reference"]), abs(r["far_served"] - r["far_reference"]))
        for r in presets.values()
    )
    lfw_move = abs(lfw["candidate"] - lfw["calibrated"])
    from model.selfcheck import self_check

    exact = (
        calibrated
        if calibrated.precision == "float32"
        else Embedder(model, device="cpu", precision="fp32", flip=served_as["flip"], engine="torch")
    )
    return {
        "engine": candidate.engine,
        "precision": candidate.precision,
        # the instruction-set class it ran on: the check vouches for CPUs of this class only (model/cpu.py)
        "isa": isa_class(),
        "cpu": cpu_description(),
        "self_check": self_check(candidate, exact, model.qaconv, cal).to_dict(),
        "runtime": _runtime_version(candidate.engine),
        "calibrated_path": served_as,
        "reference": calibrated.path,
        "passes": bool(worst <= PRESET_BAR + _ROUNDING and lfw_move <= LFW_BAR + _ROUNDING),
        "pairs": check["pairs"],
        "max_abs_fused_diff": check["max_abs_fused_diff"],
        "presets": presets,
        "max_preset_move": worst,
        "lfw_fused_accuracy": lfw,
        "lfw_move": lfw_move,
        **({"int8_recipe": recipe.fingerprint()} if candidate.int8 and recipe is not None else {}),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }


def _runtime_version(engine: str) -> str:
    if engine == "openvino":
        import openvino

        return f"openvino {openvino.__version__.split('-')[0]}"
    if engine == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    import torch

    return f"torch {torch.__version__}"


def with_engine_check(meta: dict[str, Any], report: dict[str, Any], command: str) -> dict[str, Any]:
    """``meta`` with ``report`` kept in ``calibration.engine_checks`` (replacing an older check of the same
    engine and precision on the same CPU class; the other checks, other classes' included, stay)."""
    calibration = dict(meta["calibration"])

    def key(check: dict[str, Any]) -> tuple[Any, ...]:
        return check.get("engine"), check.get("precision"), check.get("isa")

    kept = [c for c in calibration.get("engine_checks") or [] if key(c) != key(report)]
    calibration["engine_checks"] = [*kept, {**report, "command": command}]
    return {**meta, "calibration": calibration}


def markdown(report: dict[str, Any], machine: str, command: str) -> str:
    """The check as a bench/RESULTS.md section."""
    path = report["calibrated_path"]
    lfw = report["lfw_fused_accuracy"]
    lines = [
        f"## Engine accuracy check: {report['engine']} {report['precision']} against the calibrated path",
        "",
        f"- Date: {report['date']}; machine: {machine}; {report['runtime']}; {report['minutes']:.0f} minutes. "
        f"Vouches for CPUs of class `{report.get('isa')}` only.",
        f"- Command: `{command}`.",
        f"- Calibrated path: {path.get('engine', 'torch')}, {path['precision']}, flip {path['flip']}; measured "
        f"against: {report.get('reference', 'the calibrated path')}. "
        f"{report['pairs']} calibration pairs; largest fused-score difference {report['max_abs_fused_diff']:.4f}.",
        "",
        "| preset | TAR calibrated | TAR candidate | FAR calibrated | FAR candidate |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["presets"].items():
        lines.append(
            f"| {name} | {r['tar_reference']:.4f} | {r['tar_served']:.4f} | {r['far_reference']:.5f} "
            f"| {r['far_served']:.5f} |"
        )
    verdict = (
        "**passes**: the engine may serve the calibration (`auto` may choose it once the check is recorded)."
        if report["passes"]
        else "**does not pass**: it needs its own calibration before it can serve the presets."
    )
    lines += [
        "",
        f"LFW clean, fused: {100 * lfw['calibrated']:.2f}% calibrated path, {100 * lfw['candidate']:.2f}% "
        f"candidate. Largest preset move {report['max_preset_move']:.4f} (bar {PRESET_BAR}), LFW move "
        f"{100 * report['lfw_move']:.2f} points (bar {100 * LFW_BAR:.1f}): {verdict}",
    ]
    return "\n".join(lines)
