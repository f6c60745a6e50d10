"""How compactly can the GPU bundle store aligned crops without changing what training sees?

For each candidate encoding (JPEG at several qualities, optimised Huffman tables as the bundle writes them;
WebP), re-encode a sample of training crops from every cache and measure the bytes per crop and how far the
re-encoded crop moves the embeddings training uses: the SFace teacher's (the distillation target) and the
shipped student's, as cosine similarity to the embedding of the crop as stored in the cache.

    python bench/bench_bundle_quality.py --data-root ../oaml_data --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_model import cpu_name  # noqa: E402
from model.align import to_input_tensor  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.training.teacher import SFaceTeacher  # noqa: E402
from model.training.train import load_training_data  # noqa: E402

logger = logging.getLogger("bench_bundle_quality")

CACHES = ("celeba", "afdb", "lag", "fgnet", "utkface", "mask_unlabeled", "aflw2000")
ENCODINGS = (("JPEG", 95), ("JPEG", 90), ("JPEG", 85), ("JPEG", 75), ("JPEG", 65), ("WEBP", 80))


def encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    extra = {"optimize": True} if fmt == "JPEG" else {}
    Image.fromarray(image).save(buf, format=fmt, quality=quality, **extra)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=Path("weights/oaml_ir18.safetensors"))
    parser.add_argument("--per-cache", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    crops = []
    for name in CACHES:
        data = load_training_data([args.data_root / name])
        crops.append(data.images[rng.choice(len(data.images), args.per_cache, replace=False)])
    images = np.concatenate(crops)
    teacher = SFaceTeacher()
    model, _ = load_checkpoint(args.weights)
    model.eval()

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def student(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return unit(model(to_input_tensor(batch))[0].float().numpy())

    t0, s0 = unit(teacher.embed(images)), student(images)
    rows = [
        "| encoding | KiB per crop | teacher cosine mean | teacher cosine 1st pct | student cosine mean | "
        "student cosine 1st pct |",
        "|---|---|---|---|---|---|",
    ]
    for fmt, quality in ENCODINGS:
        blobs = [encode(im, fmt, quality) for im in images]
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
        ct = (unit(teacher.embed(decoded)) * t0).sum(1)
        cs = (student(decoded) * s0).sum(1)
        kib = sum(len(b) for b in blobs) / len(blobs) / 1024
        row = (
            f"| {fmt} q{quality} | {kib:.2f} | {ct.mean():.4f} | {np.percentile(ct, 1):.4f} | "
            f"{cs.mean():.4f} | {np.percentile(cs, 1):.4f} |"
        )
        logger.info(row)
        rows.append(row)
    command = f"python bench/bench_bundle_quality.py --data-root {args.data_root}"
    text = (
        f"\n### Crop encodings ({len(images)} crops, {args.per_cache} from each of {', '.join(CACHES)})\n\n"
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()}; command: `{command}`\n\n" + "\n".join(rows) + "\n"
    )
    if args.out:
        with args.out.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
