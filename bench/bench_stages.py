"""Where one request's time goes: each stage of a /verify face, measured alone, on this machine.

Run: ``python bench/bench_stages.py --out bench/RESULTS.md`` (or ``make bench-stages``). For each
stage of one 640x480 JPEG on its way through the service (decode with EXIF, detector
pre-processing, the detector network, box decoding and NMS, alignment, the embedding step, pair
scoring, the JSON answer), the median time of repeated calls, as the service ran it before issue
#23 (the whole photo's detector pass, PyTorch's embedding) and as it runs it now; and the detector network alone at
several batch sizes, onnxruntime and torch, on the CPU and (when there is one) on the GPU. This
is what decides which stages are worth moving to a GPU: a stage that costs little on the CPU
gains nothing there. Shipped weights when present (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_model import cpu_name, emit, timeit  # noqa: E402
from bench.bench_service import AVX2_ONLY  # noqa: E402
from model.align import FaceDetector, align_face, decode_image  # noqa: E402
from model.card import WeightsCard  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.cpu import isa_class  # noqa: E402
from model.embedder import Embedder, score_pairs  # noqa: E402
from model.engines import serve_int8  # noqa: E402
from model.net import build_model  # noqa: E402
from service.config import DEFAULT_WEIGHTS  # noqa: E402

SECTION = "## Request stages (bench/bench_stages.py)"


def _photo() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(cv2.resize(data.astronaut(), (640, 480))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _old_prepare(image: np.ndarray) -> np.ndarray:
    """The detector input as it was made before 2026-12-02: a float copy of the whole photo, transposed."""
    mean = np.array([104.0, 117.0, 123.0], dtype=np.float32)
    blob = np.zeros((3, -(-image.shape[0] // 32) * 32, -(-image.shape[1] // 32) * 32), dtype=np.float32)
    blob[:, : image.shape[0], : image.shape[1]] = (image[..., ::-1].astype(np.float32) - mean).transpose(2, 0, 1)
    return blob


def stage_rows(device: torch.device, seconds: float, without_bf16: bool = False) -> list[str]:
    """One face of a /verify request, stage by stage, as the service ran it before issue #23's changes (the whole
    photo's detector pass, PyTorch's embedding) and as it runs it now (coarse and refining passes, the ``auto``
    engine), on ``device``; ``without_bf16``: as ``auto`` chooses on a CPU without native bf16."""
    data = _photo()
    backend = "torch" if device.type == "cuda" else "onnxruntime"
    detector = FaceDetector(threads=1, backend=backend, device=device)
    meta: dict[str, object] = {}
    if DEFAULT_WEIGHTS.exists():
        model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    else:
        model = build_model("ir_18").eval()
    card = WeightsCard.from_metadata(meta) if meta else None
    vouched = card.vouched_for("avx2" if without_bf16 else isa_class()) if card else frozenset()
    int8 = card.int8 if card else None
    precision = "auto"
    if without_bf16:  # what `auto` serves there: fp32, or int8 where the weights' recipe is checked
        precision = "int8" if serve_int8("auto", "auto", device, None, vouched, int8 is not None) else "fp32"
    before = Embedder(model, device=device.type, engine="torch", precision="fp32" if without_bf16 else "auto")
    now = Embedder(
        model,
        device=device.type,
        precision=precision,
        engine="auto",
        version=str(meta.get("model_version")),
        threads=torch.get_num_threads(),  # the service gives its engine the inference worker's threads
        vouched=vouched,
        int8=int8,
    )
    image = decode_image(data)
    inp = detector.prepare(image)
    out = detector.forward([inp.blob])[0]
    face = detector.decode(inp, out)[0]
    coarse = detector.coarse_input(image)
    assert coarse is not None
    coarse_out = detector.forward([coarse.blob])[0]
    found = detector.decode(coarse, coarse_out)
    refine = detector.refine_input(image, found[0])
    refine_out = detector.forward([refine.blob])[0]
    crop = align_face(image, face.landmarks)
    pair = np.stack([crop, crop])
    feats = now.forward(pair)
    qaconv = now.model.qaconv
    answer = {"match": True, "score": 1.0, "face_a": {"visibility_map": np.ones((7, 7)).tolist()}}

    def both(*fns: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for fn in fns:
                fn()

        return run

    view = f"{coarse.blob.shape[2]}x{coarse.blob.shape[1]} + {refine.blob.shape[2]}x{refine.blob.shape[1]}"
    flip = "flip on" if now.flip else "flip off"
    stages: list[tuple[str, Callable[[], object] | None, Callable[[], object] | None]] = [
        ("decode JPEG (Pillow, EXIF)", lambda: decode_image(data), lambda: decode_image(data)),
        (
            f"detector pre-processing (before: 640x480; now: {view})",
            lambda: _old_prepare(image),
            both(lambda: detector.coarse_input(image), lambda: detector.refine_input(image, found[0])),
        ),
        (
            f"detector network ({backend}; before: 640x480; now: {view})",
            lambda: detector.forward([inp.blob]),
            both(lambda: detector.forward([coarse.blob]), lambda: detector.forward([refine.blob])),
        ),
        (
            "box decoding and NMS",
            lambda: detector.decode(inp, out),
            both(lambda: detector.decode(coarse, coarse_out), lambda: detector.decode(refine, refine_out)),
        ),
        (
            "alignment (similarity warp)",
            lambda: align_face(image, face.landmarks),
            lambda: align_face(image, face.landmarks),
        ),
        (
            f"embedding step, 2 faces (before: {before.engine} {before.precision}; now: {now.engine} {now.precision}; "
            f"{flip}; per face: half)",
            lambda: before.forward(pair),
            lambda: now.forward(pair),
        ),
        (
            "pair scoring (cosine + QAConv), 1 pair",
            lambda: score_pairs(qaconv, feats.take([0]), feats.take([1])),
            lambda: score_pairs(qaconv, feats.take([0]), feats.take([1])),
        ),
        ("JSON answer", lambda: json.dumps(answer), lambda: json.dumps(answer)),
    ]
    rows = ["| stage | before, ms | now, ms |", "|---|---|---|"]
    totals = [0.0, 0.0]
    for name, *fns in stages:
        cells = []
        for i, fn in enumerate(fns):
            t = timeit(fn, seconds) * 1000 if fn is not None else 0.0
            totals[i] += t
            cells.append(f"{t:.2f}")
        rows.append(f"| {name} | {' | '.join(cells)} |")
        print(rows[-1], flush=True)  # noqa: T201
    rows.append(f"| sum (the embedding step counted for both faces) | {totals[0]:.1f} | {totals[1]:.1f} |")
    return rows


def detector_rows(devices: list[torch.device], seconds: float) -> list[str]:
    """The detector network alone on 640x480 photos, by backend, device and batch size."""
    blob = FaceDetector(threads=1).prepare(decode_image(_photo())).blob
    rows = ["| backend | device | batch | photos/s |", "|---|---|---|---|"]
    cases: list[tuple[str, torch.device]] = [("onnxruntime", torch.device("cpu"))]
    cases += [("torch", d) for d in devices]
    for backend, device in cases:
        detector = FaceDetector(threads=1, backend=backend, device=device)  # type: ignore[arg-type]
        for batch in (1, 8, 32) if device.type == "cuda" else (1, 8):
            blobs = [blob] * batch
            t = timeit(lambda blobs=blobs, detector=detector: detector.forward(blobs), seconds)
            rows.append(f"| {backend} | {device.type} | {batch} | {batch / t:.0f} |")
            print(rows[-1], flush=True)  # noqa: T201
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing window per case")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the service's default here)")
    parser.add_argument(
        "--avx2", action="store_true", help="as a CPU without AVX-512 and bf16 (an AMD EPYC Milan): AVX2 kernels only"
    )
    args = parser.parse_args()
    if args.avx2 and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":  # the dispatch is read once, at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.avx2 else [])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    header = [
        SECTION,
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()}"
        + (", AVX2 kernels only (bench_service's AVX2_ONLY), as a CPU without bf16" if args.avx2 else "")
        + f", {os.cpu_count()} cores, GPU: {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.",
        f"- Command: `python bench/bench_stages.py --out bench/RESULTS.md --seconds {args.seconds:g} "
        f"--threads {args.threads}" + (" --avx2`." if args.avx2 else "` (or `make bench-stages`)."),
        "- One 640x480 JPEG (the astronaut, resized), median of repeated calls after 2 warm-up calls.",
        "",
    ]
    rows: list[str] = []
    for device in devices:
        rows += [f"### One /verify face, stage by stage, on {device.type}", ""]
        rows += stage_rows(device, args.seconds, without_bf16=args.avx2) + [""]
    if not args.avx2:
        rows += ["### The detector network alone", ""]
        rows += detector_rows(devices, args.seconds)
    emit("\n".join(header + rows) + "\n", args.out)


if __name__ == "__main__":
    main()
