"""Engines for the backbone on a CPU, side by side in one run: what each gives for /verify's embedding step.

/verify embeds two faces, each with its mirror image (the flip test): four crops. Candidates:

- torch fp32 and (where the CPU computes bf16 natively) torch bf16 autocast, channels_last: today's path;
- the four crops as one batch of 4 against two batches of 2 (a face and its mirror per request);
- ONNX Runtime fp32 (the exported graph, all graph optimisations);
- ONNX Runtime int8: static QDQ quantisation (per-channel weights, activations calibrated on training
  crops of ``--calibration-cache`` or, without one, on noise, which the table then says);
- OpenVINO, when it is installed: f32, bf16 (a CPU with native bf16), and int8 with the weights' own recipe
  where they carry one (``oaml quantize``, model/quantize.py).

Each row: median milliseconds for the four crops (after warm-up), and agreement with torch fp32 on real
crops: the lowest cosine between the two engines' embeddings and the largest visibility difference.
Accuracy beyond that (presets, LFW) is `oaml calibrate --export-check` and `oaml eval`'s business.

    python bench/bench_engines.py --out bench/RESULTS.md --calibration-cache ../oaml_data/celeba
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_model import cpu_name, emit  # noqa: E402
from bench.bench_service import AVX2_ONLY  # noqa: E402

#: An AMX CPU dispatching the kernels of one with AVX-512 bf16 and VNNI but no AMX (an AMD EPYC Genoa).
NO_AMX = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"}
from model.align import to_input_tensor  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.cpu import cpu_has_bf16  # noqa: E402
from model.engines import OnnxBackbone  # noqa: E402
from model.quantize import Int8Recipe  # noqa: E402


def median_ms(fn: Callable[[], Any], seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def real_crops(cache: Path | None, n: int) -> tuple[np.ndarray, str]:
    """``n`` aligned crops of a training cache (or noise when there is none), and what they are."""
    if cache is not None and (cache / "manifest.jsonl").exists():
        from model.training.face import AlignedCache

        records = AlignedCache(cache)
        from model.align import load_image

        picked = np.linspace(0, len(records.records) - 1, n).astype(int)
        return np.stack([load_image(cache / records.records[i].path) for i in picked]), f"{n} crops of {cache.name}"
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(n, 112, 112, 3), dtype=np.uint8), f"{n} noise images (no cache given)"


def quantise_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def agreement(reference: tuple[np.ndarray, ...], other: tuple[np.ndarray, ...]) -> tuple[float, float]:
    """Lowest cosine between embeddings, largest visibility difference."""
    a = reference[0] / np.linalg.norm(reference[0], axis=1, keepdims=True)
    b = other[0] / np.linalg.norm(other[0], axis=1, keepdims=True)
    return float((a * b).sum(1).min()), float(np.abs(reference[2] - other[2]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights/oaml_ir18.safetensors"))
    parser.add_argument("--calibration-cache", type=Path, default=None, help="aligned training cache (int8 and checks)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per candidate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="append the section to this Markdown file")
    parser.add_argument("--avx2", action="store_true", help="as a CPU without AVX-512 (bench_service's AVX2_ONLY)")
    parser.add_argument(
        "--no-amx", action="store_true", help="an AMX CPU as one with AVX-512 bf16 and VNNI but no AMX (AMD Genoa)"
    )
    args = parser.parse_args()
    if args.avx2 and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":  # the dispatch is read once, at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})
    if args.no_amx and os.environ.get("ONEDNN_MAX_CPU_ISA") != NO_AMX["ONEDNN_MAX_CPU_ISA"]:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **NO_AMX})
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.weights)
    model = model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    crops, described = real_crops(args.calibration_cache, 64)
    four = to_input_tensor(crops[:2])
    four = torch.cat([four, torch.flip(four, dims=[3])]).contiguous(memory_format=torch.channels_last)
    checks = to_input_tensor(crops).contiguous(memory_format=torch.channels_last)

    def torch_run(x: torch.Tensor, dtype: torch.dtype | None) -> tuple[np.ndarray, ...]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.forward_all(x)
        return tuple(t.float().numpy() for t in (out.embedding, out.norm, out.occlusion, out.feature_map))

    reference = torch_run(checks, None)
    rows: list[tuple[str, float, str]] = []
    rows.append(("torch fp32, one batch of 4", median_ms(lambda: torch_run(four, None), args.seconds), "reference"))
    rows.append(
        (
            "torch fp32, two batches of 2",
            median_ms(lambda: (torch_run(four[:2], None), torch_run(four[2:], None)), args.seconds),
            "the same numbers",
        )
    )
    bf16 = cpu_has_bf16() and not args.avx2  # AVX2 kernels only: the kind without bf16
    if bf16:
        cos, vis = agreement(reference, torch_run(checks, torch.bfloat16))
        ms = median_ms(lambda: torch_run(four, torch.bfloat16), args.seconds)
        rows.append(("torch bf16 autocast, one batch of 4", ms, f"cosine >= {cos:.4f}, visibility +- {vis:.3f}"))
    else:
        rows.append(("torch bf16 autocast", float("nan"), "not run: this CPU (kind) emulates bf16"))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = OnnxBackbone.export(model, meta["model_version"], Path(tmp))  # the graph the service runs
        session = ort_session(fp32, args.threads)
        x4, xc = four.contiguous().numpy(), checks.contiguous().numpy()
        cos, vis = agreement(reference, tuple(session.run(None, {"x": xc})))
        rows.append(
            (
                "ONNX Runtime fp32",
                median_ms(lambda: session.run(None, {"x": x4}), args.seconds),
                f"cosine >= {cos:.4f}, visibility +- {vis:.3f}",
            )
        )
        int8 = Path(tmp) / "oaml_int8.onnx"
        calibration = to_input_tensor(crops[32:]).numpy()  # not the crops the agreement is checked on
        quantise_int8(fp32, int8, calibration)
        session8 = ort_session(int8, args.threads)
        cos, vis = agreement(reference, tuple(session8.run(None, {"x": xc})))
        rows.append(
            (
                f"ONNX Runtime int8 (static QDQ, calibrated on {len(calibration)} crops)",
                median_ms(lambda: session8.run(None, {"x": x4}), args.seconds),
                f"cosine >= {cos:.4f}, visibility +- {vis:.3f}",
            )
        )
        try:
            import openvino as ov
        except ImportError:
            rows.append(("OpenVINO", float("nan"), "not installed"))
        else:
            graphs = [(fp32, hint, f"{hint} inference") for hint in (("f32", "bf16") if bf16 else ("f32",))]
            if meta.get("int8"):  # the weights' own recipe (`oaml quantize`), the graph the service runs in int8
                recipe = Int8Recipe.from_dict(meta["int8"])
                graph = OnnxBackbone.export(model, meta["model_version"], Path(tmp), recipe)
                graphs.append((graph, "f32", f"int8 (the weights' recipe {recipe.fingerprint()})"))
            for path, hint, label in graphs:
                compiled = ov.Core().compile_model(
                    str(path), "CPU", {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": hint}
                )
                cos, vis = agreement(reference, tuple(compiled(xc).values()))
                rows.append(
                    (
                        f"OpenVINO {ov.__version__.split('-')[0]}, {label}",
                        median_ms(lambda compiled=compiled: compiled(x4), args.seconds),
                        f"cosine >= {cos:.4f}, visibility +- {vis:.3f}",
                    )
                )
    base = rows[0][1]
    lines = [
        "## Backbone engines for /verify's embedding step (bench/bench_engines.py)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()}"
        + (", AVX2 kernels only (bench_service's AVX2_ONLY; ONNX Runtime ignores it)" if args.avx2 else "")
        + (
            f", no AMX kernels ({' '.join(f'{k}={v}' for k, v in NO_AMX.items())}: oneDNN's AVX-512 bf16 and VNNI "
            "kernels, as on an AMD EPYC Genoa; OpenVINO's bf16 is not representative under this cap, slower than "
            "its f32, where a real Genoa ran it at 0.54 of its f32: 2026-12-01's section)"
            if args.no_amx
            else ""
        )
        + f"; torch {torch.__version__}, "
        f"{args.threads} threads; weights {meta['model_version']}.",
        f"- Command: `python bench/bench_engines.py --seconds {args.seconds:g} --threads {args.threads}"
        + (f" --calibration-cache {args.calibration_cache}" if args.calibration_cache else "")
        + (" --avx2" if args.avx2 else "")
        + (" --no-amx" if args.no_amx else "")
        + "`.",
        "- Four crops (two faces and their mirrors), median ms after warm-up; agreement with torch fp32 on "
        f"{described}.",
        "",
        "| engine | ms for 4 crops | vs torch fp32 | agreement |",
        "|---|---|---|---|",
    ]
    for name, ms, note in rows:
        speed = f"{base / ms:.2f}x" if ms == ms else "-"
        lines.append(f"| {name} | {ms:.1f} | {speed} | {note} |" if ms == ms else f"| {name} | - | - | {note} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
