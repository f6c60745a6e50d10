"""``oaml prepare SRC DST``: detect and align every photo of a face folder into a 112x112 cache.

Training data goes through exactly the detector and aligner that enrolments and queries use. The
cache holds one crop per source photo (``DST/<identity>/<name>.<ext>``), ``manifest.jsonl`` with
source path, identity, landmarks (source and aligned) and detection score, and ``failures.jsonl``
listing every photo that produced no crop and why; nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from model.align import ARCFACE_TEMPLATE, FaceDetector, FacePipeline, load_image, similarity_transform
from model.errors import OAMLError
from model.training.face import AlignedRecord, Face

__all__ = ["prepare"]

logger = logging.getLogger(__name__)


def prepare(
    src: str | Path,
    dst: str | Path,
    filename_identity: bool = False,
    image_format: str = "jpg",
    detector: FaceDetector | None = None,
    limit: int | None = None,
) -> dict[str, int]:
    """Align every photo of ``src`` into ``dst``; returns counts ``{'aligned', 'failed', 'skipped'}``.

    Re-running resumes: photos already in the manifest or in the failure list are skipped.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError("image_format must be 'jpg' or 'png'")
    face = Face(src, filename_identity=filename_identity)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    manifest, failures = dst / "manifest.jsonl", dst / "failures.jsonl"
    done: set[str] = set()
    for file in (manifest, failures):
        if file.exists():
            done.update(json.loads(line)["source"] for line in file.read_text().splitlines() if line.strip())
    pipeline = FacePipeline(detector or FaceDetector())
    counts = {"aligned": 0, "failed": 0, "skipped": 0}
    started = time.perf_counter()
    samples = face.samples[:limit] if limit else face.samples
    with manifest.open("a") as ok_f, failures.open("a") as bad_f:
        for i, (path, label) in enumerate(samples):
            source = str(path.resolve())
            if source in done:
                counts["skipped"] += 1
                continue
            identity = face.classes[label]
            try:
                aligned = pipeline.align_one(load_image(path), "largest")
            except OAMLError as exc:
                bad_f.write(
                    json.dumps({"source": source, "identity": identity, "code": exc.code, "error": exc.message}) + "\n"
                )
                counts["failed"] += 1
                continue
            rel = Path(identity) / f"{path.stem}.{image_format}"
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if image_format == "jpg":
                Image.fromarray(aligned.crop).save(dst / rel, quality=95)
            else:
                Image.fromarray(aligned.crop).save(dst / rel)
            lm = aligned.face.landmarks
            m = similarity_transform(lm, ARCFACE_TEMPLATE)
            record = AlignedRecord(
                path=str(rel),
                source=source,
                identity=identity,
                landmarks=np.round(lm, 2).tolist(),
                aligned_landmarks=np.round(lm @ m[:, :2].T + m[:, 2], 2).tolist(),
                score=round(aligned.face.score, 4),
            )
            ok_f.write(json.dumps(asdict(record)) + "\n")
            counts["aligned"] += 1
            if (i + 1) % 500 == 0:
                ok_f.flush()
                bad_f.flush()
                logger.info("%d/%d photos, %.1f/s", i + 1, len(samples), (i + 1) / (time.perf_counter() - started))
    logger.info("prepare %s -> %s: %s", src, dst, counts)
    return counts
