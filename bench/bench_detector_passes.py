"""The detector's coarse and refining passes against the whole photo's pass: work, and LFW accuracy.

Where /verify, /identify and /occlusion want a photo's largest face, FaceDetector finds it at 320 pixels and
again in a square around it (model/align.py, ``coarse_side``). This measures what that saves (network ms and
input pixels per photo, on /verify's benchmark photos and larger ones) and what it costs in accuracy:

- LFW with the detector's input at several sizes (the faces' size in it changes; the crops with it), fused
  10-fold accuracy on the 6,000 pairs: how small a face the landmarks may come from (``REFINE_FACE``);
- LFW photos upscaled to ``--upscale`` pixels (faces of ~390 px, as in a larger photo) through the whole
  photo's pass as before the refining pass, refined as ``face=single`` now finds them, through the coarse and
  refining passes (``face=largest``), and mixed (an enrolment made with ``face=single`` against a probe with
  ``face=largest``).

    python bench/bench_detector_passes.py --lfw ../shared/data/eval/lfw --out bench/RESULTS.md

Embeds with the service's ``auto`` engine at its precision (OpenVINO bf16 on a CPU with native bf16).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_model import cpu_name, emit  # noqa: E402
from bench.bench_service import photos  # noqa: E402
from model.align import FaceDetector, FacePipeline, decode_image  # noqa: E402
from model.card import WeightsCard  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.cpu import isa_class  # noqa: E402
from model.embedder import Embedder, Features, score_pairs  # noqa: E402
from model.training.evaluate import read_lfw_pairs  # noqa: E402
from model.training.metrics import verification_report  # noqa: E402

logger = logging.getLogger("bench_detector_passes")


def pass_costs(detector: FaceDetector) -> list[str]:
    """Network ms and input pixels of the whole photo's pass and of the two passes, per photo."""
    a, b = photos()
    astronaut = decode_image(a)
    shots = {
        "/verify's photo A (640x480, face 111 px)": astronaut,
        "/verify's photo B (640x480, face 70 px)": decode_image(b),
        "1600x1600 (face ~300 px)": cv2.resize(decode_image(photos()[0]), (1600, 1600)),
    }
    rows = [
        "| photo | whole photo: input, ms | two passes: inputs, ms | landmarks moved (px) |",
        "|---|---|---|---|",
    ]
    for name, image in shots.items():
        shapes: list[tuple[int, ...]] = []
        forward = detector.forward

        def counting(blobs: list[np.ndarray], forward: Callable = forward, shapes: list = shapes) -> list:  # type: ignore[type-arg]
            shapes.extend(blob.shape for blob in blobs)
            return forward(blobs)

        timings = {}
        for coarse in (False, True):
            detector.forward = counting  # type: ignore[method-assign]
            shapes.clear()
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                faces = detector.detect(image, coarse=coarse)
                times.append(time.perf_counter() - t0)
            del detector.forward
            timings[coarse] = (faces, sorted(set(shapes)), 1000 * statistics.median(times))
        (full, full_shapes, full_ms), (two, two_shapes, two_ms) = timings[False], timings[True]
        moved = float(np.abs(full[0].landmarks - two[0].landmarks).max())

        def size(shapes: list[tuple[int, ...]]) -> str:
            return " + ".join(f"{s[2]}x{s[1]}" for s in shapes)

        rows.append(f"| {name} | {size(full_shapes)}, {full_ms:.1f} | {size(two_shapes)}, {two_ms:.1f} | {moved:.1f} |")
    return rows


class LFW:
    """LFW's 6,000 pairs, its photos decoded once, and the fused 10-fold accuracy of a set of crops."""

    def __init__(self, root: Path, weights: Path, threads: int) -> None:
        pairs = read_lfw_pairs(root / "pairs.txt")
        self.keys = sorted({p.a for p in pairs} | {p.b for p in pairs})
        pos = {k: i for i, k in enumerate(self.keys)}
        self.same = np.array([p.same for p in pairs])
        self.folds = np.array([p.fold for p in pairs])
        self.ia = np.array([pos[p.a] for p in pairs])
        self.ib = np.array([pos[p.b] for p in pairs])
        self.model, meta = load_checkpoint(weights)
        self.card = WeightsCard.from_metadata(meta)
        self.embedder = Embedder(
            self.model,
            device="cpu",
            engine="auto",
            version=meta["model_version"],
            threads=threads,
            vouched=self.card.vouched_for(isa_class()),
        )
        with ThreadPoolExecutor(threads) as pool:
            self.images = list(pool.map(lambda k: decode_image((root / f"{k}.jpg").read_bytes()), self.keys))
        self.threads = threads

    def crops(
        self, align: Callable[[np.ndarray], tuple[np.ndarray, float] | None]
    ) -> tuple[Features, np.ndarray, float]:
        """Features of every photo's crop (``align``: crop and face width in the detector's input, or None)."""
        with ThreadPoolExecutor(self.threads) as pool:
            found = list(pool.map(align, self.images))
        ok = np.array([f is not None for f in found])
        crops = np.stack([f[0] if f is not None else np.zeros((112, 112, 3), np.uint8) for f in found])
        width = float(np.median([f[1] for f in found if f is not None]))
        return self.embedder(crops), ok, width

    def row(self, a: tuple[Features, np.ndarray], b: tuple[Features, np.ndarray]) -> str:
        """Fused 10-fold accuracy, mean genuine and impostor fused score, TAR and FAR at two presets (table cells):
        whether the scores the calibration's thresholds apply to moved, not only how well they separate."""
        s = score_pairs(self.model.qaconv, a[0], b[0], self.ia, self.ib)
        valid = a[1][self.ia] & b[1][self.ib]
        fused = np.where(
            valid, self.card.calibration.score(s.cos, s.qa, s.visibility, s.norm), -1e9
        )  # no face: rejected
        accuracy = float(verification_report(fused, self.same, self.folds)["accuracy"])
        genuine, impostor = fused[self.same & valid].mean(), fused[~self.same & valid].mean()
        cells = [f"{100 * accuracy:.2f}%", f"{genuine:.2f}", f"{impostor:.2f}"]
        for preset in ("lenient", "balanced"):
            t = self.card.calibration.thresholds[preset]
            cells.append(f"{(fused[self.same] > t).mean():.3f} / {(fused[~self.same] > t).mean():.4f}")
        return " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights/oaml_ir18.safetensors"))
    parser.add_argument("--lfw", type=Path, default=None, help="LFW's photos and pairs.txt (no accuracy without)")
    parser.add_argument("--sides", default="320,160", help="detector input sizes for LFW's photos")
    parser.add_argument("--upscale", type=int, default=640, help="LFW upscaled to this size for the two passes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = "python bench/bench_detector_passes.py" + (f" --lfw {args.lfw}" if args.lfw else "")
    lines = [
        "## Detector passes (bench/bench_detector_passes.py)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()}; detector on one onnxruntime thread.",
        f"- Command: `{command} --sides {args.sides} --upscale {args.upscale}`.",
        "",
        *pass_costs(FaceDetector(threads=1)),
    ]
    if args.lfw is not None:
        lfw = LFW(args.lfw, args.weights, args.threads)
        lines += [
            "",
            f"LFW, fused 10-fold accuracy on the 6,000 pairs, embedded by {lfw.embedder.engine} "
            f"{lfw.embedder.precision}, by the detector's input size (the faces' median width in it):",
            "",
            "| detector input | face width in it | fused accuracy | genuine mean | impostor mean "
            "| TAR / FAR lenient | TAR / FAR balanced |",
            "|---|---|---|---|---|---|---|",
        ]
        before = None
        for side in (int(s) for s in args.sides.split(",")):
            detector = FaceDetector(threads=1, max_side=side, min_side=side, coarse_side=None)
            pipeline = FacePipeline(detector)

            def at_side(
                image: np.ndarray, d: FaceDetector = detector, p: FacePipeline = pipeline, side: int = side
            ) -> tuple[np.ndarray, float] | None:
                faces = d.detect(image)
                if not faces:
                    return None
                return p.align_selected(image, faces, "largest").crop, faces[0].width * side / max(image.shape[:2])

            feats, ok, width = lfw.crops(at_side)
            before = (feats, ok) if side == 320 else before  # LFW's photos are below 320: what was served
            lines.append(f"| {side} px | {width:.0f} px | {lfw.row((feats, ok), (feats, ok))} |")
            logger.info(lines[-1])
        pipeline = FacePipeline(FaceDetector(threads=1))

        def served(image: np.ndarray) -> tuple[np.ndarray, float] | None:
            try:
                found = pipeline.align_one(image, "largest")
            except LookupError:
                return None
            return found.crop, found.face.width

        now, now_ok, _ = lfw.crops(served)
        lines.append(
            f"| 320 px, then refined (served now) | at most 128 px | {lfw.row((now, now_ok), (now, now_ok))} |"
        )
        if before is not None:  # an enrolment made before the refining pass against a probe made with it
            lines.append(f"| 320 px (before) / refined (now) | | {lfw.row(before, (now, now_ok))} |")
        logger.info(lines[-1])
        up = args.upscale
        paths = {}
        for name in ("whole photo", "whole photo, refined", "coarse, refined"):

            def upscaled(image: np.ndarray, name: str = name) -> tuple[np.ndarray, float] | None:
                big = cv2.resize(image, (up, up), interpolation=cv2.INTER_LINEAR)
                try:
                    if name == "whole photo":  # before the refining pass: the landmarks of the 640-pixel input
                        found = pipeline.align_selected(big, pipeline.detector.detect(big), "largest")
                    else:  # face=single (or an index), face=largest
                        found = pipeline.align_one(big, 0 if name == "whole photo, refined" else "largest")
                except LookupError:
                    return None
                return found.crop, found.face.width

            feats, ok, _ = lfw.crops(upscaled)
            paths[name] = (feats, ok)
            logger.info("%s done", name)
        whole, single, largest = paths["whole photo"], paths["whole photo, refined"], paths["coarse, refined"]
        same_photo = (single[0].embedding * largest[0].embedding).sum(1).numpy()
        lines += [
            "",
            f"LFW's photos upscaled to {up}x{up} (faces ~{up * 0.6:.0f} px; the whole photo's pass sees them at "
            "640x640, the refining pass at most at 128 px):",
            "",
            "| first photo of a pair | second photo | fused accuracy | genuine mean | impostor mean "
            "| TAR / FAR lenient | TAR / FAR balanced |",
            "|---|---|---|---|---|---|---|",
            f"| whole photo's pass (before) | the same | {lfw.row(whole, whole)} |",
            f"| whole photo's pass, refined (face=single, face=0) | the same | {lfw.row(single, single)} |",
            f"| coarse pass, refined (face=largest) | the same | {lfw.row(largest, largest)} |",
            f"| whole photo's pass, refined | coarse pass, refined | {lfw.row(single, largest)} |",
            f"| whole photo's pass (before) | coarse pass, refined (now) | {lfw.row(whole, largest)} |",
            "",
            "The same photo's embedding by face=0 and face=largest: cosine mean "
            f"{same_photo.mean():.3f}, 5th percentile {np.percentile(same_photo, 5):.3f}.",
        ]
    lines.append(f"\n{(time.perf_counter() - started) / 60:.0f} minutes.")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
