"""Model-core benchmark: backbone throughput, detection + alignment, QAConv gallery matching.

Run: ``make bench`` (or ``python bench/bench_model.py --out bench/RESULTS.md``). Writes a
Markdown section with the machine, the command and the numbers into the output file, replacing
an earlier section of the same title. Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.align import FaceDetector, FacePipeline  # noqa: E402
from model.net import build_model  # noqa: E402

SECTION = "## Model core (bench/bench_model.py)"


def timeit(fn: Callable[[], object], min_seconds: float, min_calls: int = 3, warmup: int = 2) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU's model and whether it has native bf16 and AVX-512 (:func:`model.embedder.cpu_description`)."""
    from model.cpu import cpu_description

    return cpu_description()


def bench_backbone(rows: list[str], seconds: float) -> None:
    rows.append("| model | batch | precision | serving call img/s | plain forward img/s | serving / plain |")
    rows.append("|---|---|---|---|---|---|")
    for arch in ("ir_18", "ir_50"):
        model = build_model(arch).eval().to(memory_format=torch.channels_last)
        for batch in (1, 32):
            x = torch.randn(batch, 3, 112, 112).to(memory_format=torch.channels_last)
            for precision in ("fp32", "bf16"):
                bf16 = precision == "bf16"

                # defaults bind this iteration's values (each function is timed before the next one)
                def serving(model: torch.nn.Module = model, x: torch.Tensor = x, bf16: bool = bf16) -> object:
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        return model.forward_all(x)

                def plain(model: torch.nn.Module = model, x: torch.Tensor = x, bf16: bool = bf16) -> object:
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        return model.output_layer(model.body(model.input_layer(x)))

                t_plain = timeit(plain, seconds)
                t_serv = timeit(serving, seconds)
                rows.append(
                    f"| {arch} | {batch} | {precision} | {batch / t_serv:.1f} | {batch / t_plain:.1f} "
                    f"| {t_plain / t_serv:.2f} |"
                )
                print(rows[-1], flush=True)  # noqa: T201


def bench_detection(rows: list[str], seconds: float) -> None:
    from skimage import data

    pipeline = FacePipeline(FaceDetector(threads=1))
    photos = {
        "astronaut 512x512": data.astronaut(),
        "astronaut upscaled 1536x1536": np.ascontiguousarray(
            np.kron(data.astronaut(), np.ones((3, 3, 1), dtype=np.uint8))
        ),
        "tight crop 100x90": np.ascontiguousarray(data.astronaut()[65:165, 180:270]),
    }
    rows.append("| photo | detect + align ms (1 onnxruntime thread) |")
    rows.append("|---|---|")
    for name, img in photos.items():
        t = timeit(lambda img=img: pipeline.align_one(img), seconds)
        rows.append(f"| {name} | {t * 1000:.1f} |")
        print(rows[-1], flush=True)  # noqa: T201


def bench_qaconv(rows: list[str], seconds: float) -> None:
    model = build_model("ir_18").eval()
    qa = model.qaconv
    probe = torch.randn(1, 512, 7, 7)
    rows.append("| gallery | implementation | ms per probe | pairs/s |")
    rows.append("|---|---|---|---|")
    for size in (1_000, 10_000):
        gallery = torch.randn(size, 512, 7, 7)
        occ = torch.rand(size, 1, 7, 7)
        for label, dtype in (("fast, fp32 gallery", torch.float32), ("fast, bf16 gallery", torch.bfloat16)):
            prepared = qa.prepare_gallery(gallery, occ, dtype=dtype)
            t = timeit(lambda prepared=prepared: qa.match(probe, prepared), seconds)
            rows.append(f"| {size:,} | {label} | {t * 1000:.1f} | {size / t:,.0f} |")
            print(rows[-1], flush=True)  # noqa: T201

        def literal(gallery: torch.Tensor = gallery, size: int = size) -> None:
            with torch.no_grad():
                for i in range(0, size, 128):
                    qa(probe, gallery[i : i + 128])

        t = timeit(literal, seconds, min_calls=2, warmup=1)
        rows.append(f"| {size:,} | reference-style einsum, fp32, batches of 128 | {t * 1000:.1f} | {size / t:,.0f} |")
        print(rows[-1], flush=True)  # noqa: T201


def _machine(section: str) -> str | None:
    """The machine a section was measured on (its ``machine: ...`` up to the next ``;``), if it says."""
    found = re.search(r"machine: ([^;\n]*)", section)
    return found.group(1).strip() if found else None


def write_section(out: Path, body: str) -> None:
    """Put ``body`` into ``out``: in place of the section with the same title measured on the same machine (its
    ``machine:``, which names the CPU kind), else after the sections of that title, so that the results of each
    kind of CPU are kept side by side."""
    text = out.read_text() if out.exists() else "# Benchmark results\n"
    parts = [p.rstrip("\n") for p in text.split("\n## ")]
    title, entry = body.splitlines()[0].removeprefix("## "), body.removeprefix("## ").rstrip("\n")
    same = [i for i, p in enumerate(parts) if i > 0 and p.splitlines()[0] == title]
    here = [i for i in same if _machine(parts[i]) == _machine(body)]
    if here:
        parts[here[0]] = entry
    elif same:
        parts.insert(same[-1] + 1, entry)
    else:
        parts.append(entry)
    out.write_text("\n\n## ".join(parts).rstrip() + "\n")


def emit(body: str, out: Path | None) -> None:
    """Write the section into ``out`` (replacing an older copy of it), or print it."""
    if out:
        write_section(out, body)
    else:
        print(body)  # noqa: T201


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per case")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    rows: list[str] = []
    header = [
        SECTION,
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.",
        f"- Command: `python bench/bench_model.py --out bench/RESULTS.md --seconds {args.seconds:g} "
        f"--threads {args.threads}` (or `make bench`).",
        "- Median of repeated calls after 2 warm-up calls. Backbone: channels_last; 'bf16' is CPU autocast. "
        "'Serving call' is `forward_all` (embedding, norm, occlusion map, feature map); 'plain' is "
        "`output_layer(body(input_layer(x)))` under `torch.inference_mode`.",
        "",
        "### Backbone",
        "",
    ]
    bench_backbone(rows, args.seconds)
    rows += ["", "### Detection and alignment", ""]
    bench_detection(rows, args.seconds)
    rows += ["", "### QAConv, one probe against a gallery (occlusion-weighted)", ""]
    bench_qaconv(rows, args.seconds)
    emit("\n".join(header + rows) + "\n", args.out)


if __name__ == "__main__":
    main()
