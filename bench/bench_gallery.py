"""Gallery size: what one face costs in memory, at its peak too, and what exact search costs at 1M faces.

Run: ``python bench/bench_gallery.py --out bench/RESULTS.md`` (or ``make bench-gallery``).

- Bytes per face of the in-memory index (:class:`service.index.GalleryIndex`), measured as the
  process's resident memory growth over a few thousand synthetic faces, at each map precision,
  and the largest gallery that fits a machine's memory at that rate.
- Peak resident memory while the index grows past a size (enrolments, 1,000 faces at a time) and
  while a stored gallery is loaded at start-up (:meth:`service.gallery.Gallery.load`'s path), each
  in a fresh process, against the bytes the faces themselves hold: what a machine must have, not
  what the index settles at. ``--compare-with DIR`` runs the same children on another checkout's
  ``service/`` (e.g. a ``git worktree`` of an earlier commit) for a before/after row.
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
from typing import Any

import numpy as np
import torch

# OAML_BENCH_CODE: measure another checkout's code (--compare-with); this one's by default
sys.path.insert(0, os.environ.get("OAML_BENCH_CODE") or str(Path(__file__).resolve().parents[1]))

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


def bytes_per_face(precision: str, faces: int, channels: int = 512) -> tuple[float, float]:
    """Resident memory a face adds once enrolled (maps, embedding, ids and dicts), and at the peak while
    ``faces`` are enrolled 1,000 at a time, in a fresh process, with QAConv maps of ``channels`` kept at
    ``precision`` (a key of :data:`PRECISIONS`)."""
    grown = run_child(
        ["--child", "grow", "--faces", str(faces), "--dtype", precision, "--child-channels", str(channels)]
    )
    n = grown["faces"]
    return (grown["final"] - grown["baseline"]) / n, (grown["peak"] - grown["baseline"]) / n


#: How the index may keep the maps: (the matching dtype, the index's ``map_storage``), by name.
PRECISIONS: dict[str, tuple[torch.dtype, str]] = {
    "bf16": (torch.bfloat16, "native"),
    "fp16": (torch.float16, "native"),
    "fp32": (torch.float32, "native"),
    # matched in fp32 on a CPU, as service.index.matching_dtype says (not imported: --compare-with runs this
    # script on checkouts that predate it)
    "int8": (torch.float32, "int8"),
}

#: The served ways to keep the maps, as the tables name them.
MAP_PRECISIONS = (
    ("bf16 (OAML_MAP_STORAGE=native on a CPU)", "bf16"),
    ("fp16 (OAML_MAP_STORAGE=native on CUDA)", "fp16"),
    ("int8, a scale per face and channel, matched in fp32 (OAML_MAP_STORAGE=int8, the default)", "int8"),
)


def map_bytes(precision: str, channels: int = 512, hw: int = 49) -> int:
    """One face's maps at ``precision``: a value per channel and location, and with int8 a fp32 scale per
    channel."""
    dtype, storage = PRECISIONS[precision]
    return channels * hw + channels * 4 if storage == "int8" else channels * hw * dtype.itemsize


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def face_bytes(precision: str, channels: int = 512) -> int:
    """What one face's data holds in the index: maps, embedding, visibility and feature norm, and key."""
    return map_bytes(precision, channels) + 512 * 4 + 8 + 8


def synthetic_index(
    precision: str, channels: int, n: int
) -> tuple[GalleryIndex, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An empty index keeping ``channels``-channel maps at ``precision``, and ``n`` synthetic faces to enrol in it
    (embeddings, maps, visibility)."""
    qaconv = build_model("ir_18", qaconv_channels=None if channels == 512 else channels).qaconv.eval()
    dtype, storage = PRECISIONS[precision]
    try:
        index = GalleryIndex(qaconv, torch.device("cpu"), dtype, map_storage=storage)
    except TypeError:  # a checkout from before map_storage (--compare-with): its maps were native
        index = GalleryIndex(qaconv, torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1)
    return index, emb, torch.randn(n, channels, 7, 7, generator=g), torch.rand(n, 1, 7, 7, generator=g)


def _child_grow(faces: int, precision: str, channels: int = 512) -> dict[str, float]:
    """In a fresh process: enrol ``faces`` synthetic faces 1,000 at a time (maps drawn from one block of
    1,000, as only their bytes matter), then report the baseline, peak and final resident memory."""
    index, emb, maps, occ = synthetic_index(precision, channels, 1000)
    index.add([f"warm{i}" for i in range(8)], ["w"] * 8, emb[:8], maps[:8], occ[:8])
    index.remove([f"warm{i}" for i in range(8)])
    baseline = rss_bytes()
    for start in range(0, faces, 1000):
        n = min(1000, faces - start)
        index.add([f"{i:032x}" for i in range(start, start + n)], [f"s{i // 2}" for i in range(start, start + n)],
                  emb[:n], maps[:n], occ[:n])  # fmt: skip
    return {"baseline": baseline, "peak": peak_rss_bytes(), "final": rss_bytes(), "faces": len(index)}


def _child_load(store_path: Path, model_version: str, dtype: torch.dtype) -> dict[str, float]:
    """In a fresh process: load a stored gallery into the index as start-up does (:meth:`Gallery.load`)."""
    from service.store import SQLiteGalleryStore

    qaconv = build_model("ir_18").qaconv.eval()
    try:  # the peak table's maps are bf16, whatever the service's default storage
        index = GalleryIndex(qaconv, torch.device("cpu"), dtype, map_storage="native")
    except TypeError:  # a checkout from before map_storage (--compare-with)
        index = GalleryIndex(qaconv, torch.device("cpu"), dtype)
    store = SQLiteGalleryStore(store_path, model_version)

    class Inline:  # the engine's worker, for the index calls: here, this thread
        def call_device(self, fn: Any, *args: Any) -> Any:
            return fn(*args)

    baseline = rss_bytes()
    try:
        from service.gallery import Gallery
    except ImportError:  # a checkout from before service.gallery (--compare-with)
        from service.state import load_index  # type: ignore[attr-defined]

        load_index(store, index, Inline())
    else:
        import inspect

        # since collections the gallery makes an index per collection; before, it was handed the one index
        made = (lambda: index) if "new_index" in inspect.signature(Gallery).parameters else index
        Gallery(store, made, Inline()).load()  # type: ignore[arg-type]
    return {"baseline": baseline, "peak": peak_rss_bytes(), "final": rss_bytes(), "faces": len(index)}


def run_child(args: list[str], checkout: Path | None = None) -> dict[str, float]:
    """This script's ``--child`` mode in a fresh process (its own peak), on ``checkout``'s code if given."""
    import json
    import subprocess

    env = dict(os.environ)
    if checkout is not None:
        env["OAML_BENCH_CODE"] = str(checkout)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def fill_store(path: Path, model_version: str, faces: int) -> None:
    """A SQLite gallery of ``faces`` synthetic faces (two per subject), a thousand per transaction."""
    from service.store import Enrolment, SQLiteGalleryStore

    store = SQLiteGalleryStore(path, model_version)
    rng = np.random.default_rng(0)
    block = synthetic(1000, 0, rng)
    for start in range(0, faces, 1000):
        n = min(1000, faces - start)
        records = []
        for i in range(n):
            b = block[i]
            records.append(
                FaceRecord(
                    f"{start + i:032x}",
                    f"subject-{(start + i) // 2:08d}",
                    b.embedding,
                    b.feature_map,
                    b.occlusion,
                    b.norm,
                    b.quality,
                    b.detection_score,
                    None,
                    0.0,
                )  # fmt: skip
            )
        store.enrol_many(
            [Enrolment(r.subject, None, None, records[j : j + 2]) for j, r in enumerate(records) if j % 2 == 0]
        )
    store.close()


def peak_rows(faces: int, load_faces: int, checkout: Path | None, label: str) -> list[str]:
    """Rows of the peak-memory table: growing past ``faces`` and loading ``load_faces``, bf16 maps."""
    rows = []
    data = face_bytes("bf16")
    grown = run_child(["--child", "grow", "--faces", str(faces)], checkout)
    rows.append(_peak_row(label, f"enrolling {faces:,} faces, 1,000 at a time", grown, data))
    if load_faces:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="oaml-bench-gallery-") as tmp:
            store = Path(tmp) / "gallery.sqlite3"
            fill_store(store, "bench", load_faces)
            loaded = run_child(["--child", "load", "--store", str(store)], checkout)
        rows.append(_peak_row(label, f"loading {load_faces:,} stored faces at start-up", loaded, data))
    return rows


def _peak_row(label: str, what: str, m: dict[str, float], per_face: int) -> str:
    data = m["faces"] * per_face
    peak, final = m["peak"] - m["baseline"], m["final"] - m["baseline"]
    return f"| {label} | {what} | {data / 2**30:.2f} | {peak / 2**30:.2f} | {final / 2**30:.2f} | {peak / data:.2f}x |"


CHANNELS_SECTION = "## Gallery memory by QAConv channels (bench/bench_gallery.py --channels)"


#: Faces QAConv re-ranks per probe in the re-ranking column (the service's default shortlist, OAML_SHORTLIST).
RERANK_FACES = 100


def rerank_ms(precision: str, channels: int, seconds: float) -> float:
    """Milliseconds to score one probe against :data:`RERANK_FACES` enrolled faces with QAConv, maps kept at
    ``precision`` (what ``/identify`` spends on its shortlist after the cosine stage)."""
    index, emb, maps, occ = synthetic_index(precision, channels, RERANK_FACES)
    ids = [f"f{i}" for i in range(RERANK_FACES)]
    index.add(ids, ids, emb, maps, occ)
    with torch.inference_mode():
        return timeit(lambda: index.score_faces(ids, emb[0], maps[0], occ[0, 0]), seconds) * 1000


def channel_rows(
    channels: list[int], faces: int, threads: int, precisions: list[str] | None = None, seconds: float = 2.0
) -> str:
    """The section of ``--channels``: each channel count's bytes per enrolled face, once enrolled and at the peak,
    with ``faces`` enrolled 1,000 at a time in a fresh process, and what a million faces take at that peak."""
    rows = [
        CHANNELS_SECTION,
        "",
        f"- {machine_line(threads)}",
        f"- Command: `python bench/bench_gallery.py --out bench/RESULTS.md --channels {' '.join(map(str, channels))} "
        f"--faces {faces} --threads {threads}" + (f" --precisions {' '.join(precisions)}" if precisions else "") + "`.",
        "",
        f"Enrolling {faces:,} synthetic faces 1,000 at a time in a fresh process (the index alone: the service needs "
        "its own memory on top); the faces' data is maps (with int8, their scales too), embedding (2 KB), visibility "
        "and feature norm, and key; the rest is Python's per-face ids and dicts. The re-ranking column: QAConv "
        f"scoring one probe against {RERANK_FACES} enrolled faces (`GalleryIndex.score_faces`: gathering the maps, "
        "dequantising int8 ones, matching), the per-probe cost `/identify` adds to the cosine stage at the default "
        "shortlist; median of repeated calls in this process.",
        "",
        "| QAConv channels | map precision | maps per face | faces' data per face | bytes per face once enrolled "
        f"| peak bytes per face | a million faces at that peak | re-ranking {RERANK_FACES} faces, ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in channels:
        for name, precision in MAP_PRECISIONS:
            if precisions and precision not in precisions:
                continue
            per_face, peak = bytes_per_face(precision, faces, c)
            rows.append(
                f"| {c} | {name} | {map_bytes(precision, c):,} | {face_bytes(precision, c):,} | {per_face:,.0f} | "
                f"{peak:,.0f} | {peak * 1e6 / 2**30:.1f} GiB | {rerank_ms(precision, c, seconds):.2f} |"
            )
            print(rows[-1], flush=True)  # noqa: T201
    return "\n".join(rows) + "\n"


def cosine_stage_ms(n: int, chunked: bool, shortlist: int, seconds: float) -> float:
    """One probe against ``n`` fp32 embeddings, top ``shortlist``: the service's :class:`CosineStage` (chunks
    of :data:`~service.index.CHUNK_ROWS`), or one matrix as the index kept them before."""
    from service.index import CosineStage

    rng = np.random.default_rng(1)
    stage = CosineStage(torch.device("cpu"))
    if chunked:
        stage.reserve(n)
    matrix = torch.empty(0 if chunked else n, 512)
    for s in range(0, n, 100_000):
        block = torch.from_numpy(rng.normal(size=(min(100_000, n - s), 512)).astype(np.float32))
        block = torch.nn.functional.normalize(block, dim=1)
        if chunked:
            stage.append(block)
        else:
            matrix[s : s + len(block)] = block
    probe = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=512).astype(np.float32)), dim=0)

    def search() -> object:
        return stage.top(probe, shortlist)[0] if chunked else torch.topk(matrix @ probe, shortlist).indices

    with torch.inference_mode():
        return timeit(search, seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--faces", type=int, default=20_000, help="synthetic faces for the bytes-per-face measurement")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--grow-faces", type=int, default=140_000, help="faces enrolled for the peak while growing (past 131,072)"
    )
    parser.add_argument("--load-faces", type=int, default=140_000, help="stored faces loaded for the peak at start-up")
    parser.add_argument("--compare-with", type=Path, default=None, help="another checkout: its peaks, for comparison")
    parser.add_argument(
        "--compare-faces", type=int, default=40_000, help="faces for the comparison's rows (past 32,768)"
    )
    parser.add_argument("--child", choices=["grow", "load"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=sorted(PRECISIONS), default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--child-channels", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=None,
        help="only the memory per face for these QAConv channel counts, --faces of each (its own section)",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=[p for _, p in MAP_PRECISIONS],
        default=None,
        help="with --channels: only these map precisions (default: every served one)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:  # a measurement in this fresh process: one JSON line
        import json

        with torch.inference_mode():
            if args.child == "grow":
                result = _child_grow(args.faces, args.dtype, args.child_channels)
            else:
                result = _child_load(args.store, "bench", torch.bfloat16)
        print(json.dumps(result))  # noqa: T201
        return
    if args.channels is not None:
        emit(channel_rows(args.channels, args.faces, args.threads, args.precisions, args.seconds), args.out)
        return
    rows = [
        SECTION,
        "",
        f"- {machine_line(args.threads)}",
        f"- Command: `python bench/bench_gallery.py --out bench/RESULTS.md --faces {args.faces} "
        f"--seconds {args.seconds:g} --threads {args.threads} --grow-faces {args.grow_faces} "
        f"--load-faces {args.load_faces}"
        + (f" --compare-with <checkout> --compare-faces {args.compare_faces}" if args.compare_with else "")
        + "` (or `make bench-gallery`).",
        "",
        "### Peak memory while the gallery grows and while it is loaded (bf16 maps)",
        "",
        "Each in a fresh process: resident memory above the process's baseline, at its peak and at the end, "
        "against what the faces' data holds (maps, embedding, visibility, key: "
        f"{face_bytes('bf16'):,} bytes a face; the rest is Python's per-face ids and dicts).",
        "",
        "| code | what | faces' data GiB | peak GiB | after GiB | peak / data |",
        "|---|---|---|---|---|---|",
    ]
    if args.compare_with is not None:
        for row in peak_rows(args.compare_faces, args.compare_faces, args.compare_with, "before (doubling)"):
            rows.append(row)
            print(row, flush=True)  # noqa: T201
        for row in peak_rows(args.compare_faces, args.compare_faces, None, "this checkout (chunks)"):
            rows.append(row)
            print(row, flush=True)  # noqa: T201
    for row in peak_rows(args.grow_faces, args.load_faces, None, "this checkout (chunks)"):
        rows.append(row)
        print(row, flush=True)  # noqa: T201
    rows += [
        "",
        "### Memory per enrolled face (in-memory index)",
        "",
        f"Enrolling {args.faces:,} synthetic faces 1,000 at a time in a fresh process; the capacities divide by the "
        "peak bytes per face (the index alone: the service itself needs its own memory on top).",
        "",
        "| QAConv map precision | bytes per face once enrolled | peak bytes per face | of which QAConv maps "
        "| faces per 16 GiB | faces per 128 GiB |",
        "|---|---|---|---|---|---|",
    ]
    qaconv = build_model("ir_18").qaconv
    for name, precision in (*MAP_PRECISIONS, ("fp32", "fp32")):
        per_face, peak = bytes_per_face(precision, args.faces, qaconv.num_features)
        rows.append(
            f"| {name} | {per_face:,.0f} | {peak:,.0f} | {map_bytes(precision, qaconv.num_features):,} | "
            f"{16 * 2**30 / peak:,.0f} | "
            f"{128 * 2**30 / peak:,.0f} |"
        )
        print(rows[-1], flush=True)  # noqa: T201
    rows += [
        "",
        "### Cosine stage of /identify (one probe, exact, top 100)",
        "",
        "| gallery embeddings | layout | ms per probe |",
        "|---|---|---|",
    ]
    for n in (100_000, 1_000_000):
        for name, chunked in (("CosineStage: fp32 in chunks of 8,192 (the service)", True), ("one fp32 matrix", False)):
            ms = cosine_stage_ms(n, chunked, 100, args.seconds)
            rows.append(f"| {n:,} | {name} | {ms:.1f} |")
            print(rows[-1], flush=True)  # noqa: T201
    emit("\n".join(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
