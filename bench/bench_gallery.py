"""Gallery size: what one enrolled face costs in memory, and what exact search costs at a million faces.

Run: ``python bench/bench_gallery.py --out bench/RESULTS.md`` (or ``make bench-gallery``).

- Bytes per face of the in-memory index (:class:`service.index.GalleryIndex`), measured as the
  process's resident memory growth over a few thousand synthetic faces, at each map precision,
  and the largest gallery that fits a machine's memory at that rate.
- The cosine stage of ``/identify`` (one probe against every enrolled embedding, then top-k) at
  100k and 1M synthetic embeddings: the stage that grows with the gallery (QAConv then re-ranks a
  fixed shortlist, measured in the service benchmark).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_model import cpu_name, emit, timeit  # noqa: E402
from model.net import build_model  # noqa: E402
from service.index import GalleryIndex  # noqa: E402
from service.store import FaceRecord  # noqa: E402

SECTION = "## Gallery memory and exact search at scale (bench/bench_gallery.py)"


def machine_line(threads: int) -> str:
    """Date, CPU, cores, memory and software of a run, for a results section's first line."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {threads} torch threads."
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synthetic(n: int, start: int, rng: np.random.Generator) -> list[FaceRecord]:
    emb = rng.normal(size=(n, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    maps = rng.normal(size=(n, 512, 7, 7)).astype(np.float16)
    occ = rng.uniform(size=(n, 7, 7)).astype(np.float32)
    return [
        FaceRecord(
            f"{start + i:032x}", f"subject-{(start + i) // 5:08d}", emb[i], maps[i], occ[i], 20.0, 0.0, 0.99, None, 0.0
        )
        for i in range(n)
    ]


def bytes_per_face(dtype: torch.dtype, faces: int) -> float:
    qaconv = build_model("ir_18").qaconv.eval()
    index = GalleryIndex(qaconv, torch.device("cpu"), dtype)
    rng = np.random.default_rng(0)
    index.add_records(synthetic(64, 0, rng))  # allocator and first-growth noise before the baseline
    before = rss_bytes()
    for start in range(64, faces + 64, 1000):
        index.add_records(synthetic(1000, start, rng))
    # the index grows by doubling: count what the faces use, not the spare capacity
    spare = (index._capacity - index.count) * (
        index.embedding_size * 4 + 8 + index.channels * index.hw * dtype.itemsize + 4
    )  # noqa: SLF001
    return (rss_bytes() - before - spare) / faces


def cosine_stage_ms(n: int, dtype: torch.dtype, shortlist: int, seconds: float) -> float:
    rng = np.random.default_rng(1)
    gallery = torch.empty(n, 512, dtype=dtype)
    for s in range(0, n, 100_000):
        block = torch.from_numpy(rng.normal(size=(min(100_000, n - s), 512)).astype(np.float32))
        gallery[s : s + len(block)] = torch.nn.functional.normalize(block, dim=1).to(dtype)
    probe = gallery[12345].clone()

    def search() -> object:
        return torch.topk(gallery @ probe, shortlist).indices

    with torch.inference_mode():
        return timeit(search, seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--faces", type=int, default=5000, help="synthetic faces for the bytes-per-face measurement")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        SECTION,
        "",
        f"- {machine_line(args.threads)}",
        f"- Command: `python bench/bench_gallery.py --out bench/RESULTS.md --faces {args.faces} "
        f"--seconds {args.seconds:g} --threads {args.threads}` (or `make bench-gallery`).",
        "",
        "### Memory per enrolled face (in-memory index)",
        "",
        "| QAConv map precision | bytes per face (measured) | of which QAConv maps | faces per 16 GiB "
        "| faces per 128 GiB |",
        "|---|---|---|---|---|",
    ]
    qaconv = build_model("ir_18").qaconv
    maps = qaconv.num_features * qaconv.hw
    for name, dtype in (
        ("bf16 (CPU default)", torch.bfloat16),
        ("fp16 (CUDA default)", torch.float16),
        ("fp32", torch.float32),
    ):
        per_face = bytes_per_face(dtype, args.faces)
        rows.append(
            f"| {name} | {per_face:,.0f} | {maps * dtype.itemsize:,} | {16 * 2**30 / per_face:,.0f} | "
            f"{128 * 2**30 / per_face:,.0f} |"
        )
        print(rows[-1], flush=True)  # noqa: T201
    rows += [
        "",
        "### Cosine stage of /identify (one probe, exact, top 100)",
        "",
        "| gallery embeddings | precision | ms per probe |",
        "|---|---|---|",
    ]
    for n in (100_000, 1_000_000):
        for name, dtype in (("fp32 (as indexed)", torch.float32), ("bf16", torch.bfloat16)):
            ms = cosine_stage_ms(n, dtype, 100, args.seconds)
            rows.append(f"| {n:,} | {name} | {ms:.1f} |")
            print(rows[-1], flush=True)  # noqa: T201
    emit("\n".join(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
