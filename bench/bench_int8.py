"""How the int8 recipe (model/quantize.py) was chosen: each variant's drift from fp32 and its speed, side by side.

Variants, all with int8 per-channel weights and uint8 per-tensor activations over min..max, the first
convolution in fp32:

- plain: no equalisation;
- equalised (what ``oaml quantize`` fits): BatchNorm-equalised inputs, alpha 0.5;
- equalised, first unit's 112x112 convolution in fp32 (the layer that drifts most);
- plain, activations clipped at the 0.01% / 99.99% percentiles instead of min..max.

Drift: 1 - cosine between each variant's embedding (the fake-quantised network in PyTorch, no flip test) and
the fp32 embedding, on crops of identities the weights never trained on; mean and worst. Speed: OpenVINO,
median ms for /verify's four crops (two faces and their mirrors). ``--avx2`` measures speed with the AVX2
kernels of a CPU without AVX-512 (bench_service's AVX2_ONLY; the drift does not depend on it).

    python bench/bench_int8.py --data-root ../oaml_data --out bench/RESULTS.md [--avx2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engines import median_ms  # noqa: E402
from bench.bench_model import cpu_name, emit  # noqa: E402
from bench.bench_service import AVX2_ONLY  # noqa: E402
from model.align import to_input_tensor  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.engines import OnnxBackbone  # noqa: E402
from model.quantize import Int8Recipe, fit_int8, input_ranges, quantised_copy  # noqa: E402
from model.training.evaluate import training_crops  # noqa: E402
from model.training.train import load_training_data  # noqa: E402


def clipped_ranges(model: torch.nn.Module, recipe: Int8Recipe, crops: np.ndarray, pct: float) -> Int8Recipe:
    """``recipe`` with each layer's input range at the ``pct`` percentiles instead of min..max."""
    seen: dict[str, list[tuple[float, float]]] = {}
    handles = []
    for name in recipe.ranges:
        layer = model.get_submodule(name)

        def hook(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
            flat = inputs[0].float().flatten()[::7]
            q = torch.quantile(flat, torch.tensor([1 - pct / 100, pct / 100]))
            seen.setdefault(name, []).append((float(q[0]), float(q[1])))

        handles.append(layer.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for s in range(0, len(crops), 64):
            model.forward_all(to_input_tensor(crops[s : s + 64]))  # type: ignore[operator]
    for h in handles:
        h.remove()
    ranges = {k: (float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v]))) for k, v in seen.items()}
    return Int8Recipe({}, ranges, recipe.alpha, recipe.crops, recipe.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights/oaml_ir18.safetensors"))
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--test-cache", default="lag", help="a cache under --data-root the weights never trained on")
    parser.add_argument("--crops", type=int, default=512, help="training crops to fit on")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--avx2", action="store_true", help="speed with AVX2 kernels only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.avx2 and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":  # the dispatch is read once, at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})
    import openvino as ov

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, meta = load_checkpoint(args.weights)
    fit, caches = training_crops(meta["training"]["config"], args.data_root, args.crops)
    test_data = load_training_data([args.data_root / args.test_cache])
    test = test_data.images[np.random.default_rng(0).choice(len(test_data.images), 384, replace=False)]
    served = fit_int8(model, fit, data=caches)
    plain = Int8Recipe({}, input_ranges(model, fit), 0.0, len(fit), caches)
    kept = Int8Recipe(served.scales, {k: v for k, v in served.ranges.items() if k != "body.0.res_layer.1"}, 0.5, 0)
    variants = [
        ("plain (no equalisation)", plain),
        ("equalised, alpha 0.5 (`oaml quantize`)", served),
        ("equalised, body.0.res_layer.1 in fp32", kept),
        ("plain, activations clipped at 99.99%", clipped_ranges(model, plain, fit, 99.99)),
    ]
    x = to_input_tensor(test)
    with torch.inference_mode():
        reference = model.forward_all(x).embedding
    four = to_input_tensor(test[:2])
    four = np.ascontiguousarray(torch.cat([four, torch.flip(four, dims=[3])]).numpy())
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = core.compile_model(str(OnnxBackbone.export(model, "bench", Path(tmp))), "CPU", config)
        rows.append(("fp32 (OpenVINO f32)", 0.0, 0.0, median_ms(lambda: fp32(four), args.seconds)))
        for label, recipe in variants:
            with torch.inference_mode():
                got = quantised_copy(model, recipe).forward_all(x).embedding
            deficit = 1 - (got * reference).sum(1)
            compiled = core.compile_model(str(OnnxBackbone.export(model, "bench", Path(tmp), recipe)), "CPU", config)
            ms = median_ms(lambda compiled=compiled: compiled(four), args.seconds)
            rows.append((label, float(deficit.mean()), float(deficit.max()), ms))
            print(rows[-1], flush=True)  # noqa: T201
    base = rows[0][3]
    lines = [
        "## int8 recipes: drift from fp32 and speed (bench/bench_int8.py)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()}"
        + (", AVX2 kernels only (bench_service's AVX2_ONLY)" if args.avx2 else "")
        + f"; OpenVINO {ov.__version__.split('-')[0]}, {args.threads} threads; weights {meta['model_version']}; "
        f"{(time.perf_counter() - started) / 60:.0f} minutes.",
        f"- Command: `python bench/bench_int8.py --data-root {args.data_root} --crops {args.crops}"
        + (" --avx2" if args.avx2 else "")
        + "`.",
        f"- Fitted on {len(fit)} training crops of {', '.join(caches)}; drift on 384 crops of {args.test_cache} "
        "(identities never trained on): 1 - cosine to the fp32 embedding, no flip test.",
        "",
        "| variant | drift mean | drift worst | ms for 4 crops | vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for label, mean, worst, ms in rows:
        lines.append(f"| {label} | {mean:.6f} | {worst:.6f} | {ms:.1f} | {base / ms:.2f}x |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
