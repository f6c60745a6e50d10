"""Approximate shortlists for large galleries: recall against exact search, latency, build time, memory.

Run: ``python bench/bench_ann.py --out bench/RESULTS.md`` (or ``make bench-ann``).

Synthetic faces. Uniform random vectors in 512 dimensions have no structure for an index to
exploit and make every approximate method look worse than it is on faces, so the gallery is drawn
from a Gaussian model fitted to real embeddings: the shipped model embeds up to ``--real-per-subject``
aligned photos of each identity in the training folders (never LFW); identity centres are drawn from
the covariance of the identities' mean embeddings, faces from the within-identity covariance (top
principal components, the rest as an isotropic floor), each face normalised. Without the data the
centres are isotropic (said in the output). Each synthetic identity has ``--faces-per-subject``
enrolled faces; probes are fresh draws of enrolled identities.

Measured, one probe at a time on ``--threads`` threads:

- exact cosine (the index today): ground truth and latency;
- the service's inverted file (:mod:`service.ann`) at several ``probe`` settings;
- faiss ``IndexIVFFlat`` with the same lists, and HNSW graphs (faiss, usearch) where installed; graphs
  are built on ``--graph-faces`` faces (their build rate on two cores makes a million take tens of
  minutes) and their build time is reported per face;
- recall: the share of probes whose exact top-1 is the approximate top-1 ("top-1") and is inside the
  approximate top-``--shortlist`` that QAConv re-ranks ("in shortlist");
- then ``/identify``'s gallery stages through :class:`service.index.GalleryIndex` (shortlist, exact
  cosine on it, QAConv re-rank) at the largest gallery whose QAConv maps fit this machine, with and
  without the inverted file.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gallery import machine_line, rss_bytes  # noqa: E402
from bench.bench_model import emit  # noqa: E402
from service.ann import lists_for  # noqa: E402
from service.index import CosineStage, GalleryIndex, matching_dtype  # noqa: E402

SECTION = "## Approximate shortlist for large galleries (bench/bench_ann.py)"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL = [
    ROOT.parent / "shared" / "data" / "train" / "aligned" / "celeba_extra",
    ROOT.parent / "oaml_data" / "celeba",
]


def real_embeddings(dirs: list[Path], per_subject: int, weights: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[M, 512]`` and identity labels of up to ``per_subject`` photos per identity folder."""
    import cv2

    from model.checkpoint import load_checkpoint
    from model.embedder import Embedder

    paths: list[Path] = []
    labels: list[int] = []
    subject = 0
    for root in dirs:
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            photos = sorted(folder.glob("*.jpg"))[:per_subject]
            if len(photos) >= 2:
                paths += photos
                labels += [subject] * len(photos)
                subject += 1
    if not paths:
        return np.zeros((0, 512), np.float32), np.zeros(0, np.int64)
    model, _ = load_checkpoint(weights)
    embedder = Embedder(model, device="cpu", flip=False)
    out = []
    for s in range(0, len(paths), 256):
        crops = np.stack([cv2.imread(str(p))[:, :, ::-1] for p in paths[s : s + 256]])
        out.append(embedder(crops).embedding.numpy())
    return np.concatenate(out), np.asarray(labels)


@dataclass
class FaceModel:
    """Gaussian model of face embeddings: identity centres and within-identity variation."""

    mean: np.ndarray  # [D]
    between: np.ndarray  # [K, D] components scaled by their standard deviations
    between_floor: float  # isotropic standard deviation of the rest
    within: np.ndarray  # [K, D]
    within_floor: float
    source: str

    @staticmethod
    def _components(x: np.ndarray, keep: int) -> tuple[np.ndarray, float]:
        _, s, vt = np.linalg.svd(x / np.sqrt(len(x)), full_matrices=False)
        keep = min(keep, len(s))
        rest = float((s[keep:] ** 2).sum()) / x.shape[1]
        return (s[:keep, None] * vt[:keep]).astype(np.float32), float(np.sqrt(rest))

    @classmethod
    def fit(cls, emb: np.ndarray, labels: np.ndarray, keep: int = 256) -> FaceModel:
        subjects = np.unique(labels)
        means = np.stack([emb[labels == s].mean(0) for s in subjects])
        within = emb - means[np.searchsorted(subjects, labels)]
        between, b_floor = cls._components(means - means.mean(0), keep)
        within_c, w_floor = cls._components(within, keep)
        source = f"fitted to {len(emb):,} real embeddings of {len(subjects)} identities"
        return cls(means.mean(0).astype(np.float32), between, b_floor, within_c, w_floor, source)

    @classmethod
    def isotropic(cls, dim: int = 512) -> FaceModel:
        zero = np.zeros((1, dim), np.float32)
        # within-identity spread giving a same-identity cosine of ~0.6, like a good face model
        return cls(np.zeros(dim, np.float32), zero, 1 / np.sqrt(dim), zero, 0.033, "isotropic (no real faces found)")

    @staticmethod
    def _draw(n: int, components: np.ndarray, floor: float, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((n, len(components)), dtype=np.float32)
        return z @ components + floor * rng.standard_normal((n, components.shape[1]), dtype=np.float32)

    def centres(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.mean + self._draw(n, self.between, self.between_floor, rng)

    def faces(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = centres + self._draw(len(centres), self.within, self.within_floor, rng)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_gallery(
    model: FaceModel, faces: int, per_subject: int, probes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``faces`` unit embeddings (``per_subject`` per identity, identity ``i`` in rows ``i * per_subject ..``),
    ``probes`` fresh faces of enrolled identities, and those identities."""
    rng = np.random.default_rng(seed)
    subjects = faces // per_subject
    gallery = torch.empty(subjects * per_subject, model.mean.shape[0])
    probe_subjects = rng.choice(subjects, probes, replace=False)
    probe_centres = np.zeros((probes, model.mean.shape[0]), np.float32)
    block = 50_000
    for s in range(0, subjects, block):
        centres = model.centres(min(block, subjects - s), rng)
        rows = np.repeat(centres, per_subject, axis=0)
        gallery[s * per_subject : s * per_subject + len(rows)] = torch.from_numpy(model.faces(rows, rng))
        inside = (probe_subjects >= s) & (probe_subjects < s + len(centres))
        probe_centres[inside] = centres[probe_subjects[inside] - s]
    return gallery, torch.from_numpy(model.faces(probe_centres, rng)), probe_subjects


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@dataclass
class Result:
    method: str
    setting: str
    top1: float
    in_shortlist: float
    ms: float
    build_s: float
    build_faces: int
    bytes_per_face: float
    note: str = ""

    def row(self) -> str:
        build = "-"
        if self.build_s:
            build = f"{self.build_s:.1f} s for {self.build_faces:,} ({self.build_faces / self.build_s:,.0f}/s)"
        return (
            f"| {self.method} | {self.setting} | {self.top1:.3f} | {self.in_shortlist:.3f} | {self.ms:.2f} "
            f"| {build} | {self.bytes_per_face:,.0f} | {self.note} |"
        )


def recall(found: list[np.ndarray], truth: np.ndarray) -> tuple[float, float]:
    top1 = np.mean([len(f) > 0 and f[0] == t for f, t in zip(found, truth, strict=True)])
    inside = np.mean([t in f for f, t in zip(found, truth, strict=True)])
    return float(top1), float(inside)


def run_probes(search: Callable[[torch.Tensor], np.ndarray], probes: torch.Tensor) -> tuple[list[np.ndarray], float]:
    for p in probes[:3]:
        search(p)  # warm-up
    found = []
    t0 = time.perf_counter()
    for p in probes:
        found.append(search(p))
    return found, 1000 * (time.perf_counter() - t0) / len(probes)


def exact_truth(gallery: torch.Tensor, probes: torch.Tensor, timed_probes: int) -> tuple[np.ndarray, float]:
    """Exact top-1 of every probe (batched), and ms per probe of one-at-a-time exact search."""
    truth = torch.cat([(probes[s : s + 100] @ gallery.T).argmax(1) for s in range(0, len(probes), 100)])
    _, ms = run_probes(lambda p: torch.topk(gallery @ p, 100).indices.numpy(), probes[:timed_probes])
    return truth.numpy(), ms


def service_results(
    gallery: torch.Tensor, probes: torch.Tensor, truth: np.ndarray, k: int, probe_settings: list[int]
) -> tuple[list[Result], CosineStage]:
    """The service's cosine stage (:class:`service.index.CosineStage`) with its inverted file, trained
    once on the whole gallery as at start-up."""
    stage = CosineStage(torch.device("cpu"), gallery.shape[1], ann_min_faces=len(gallery))
    stage.reserve(len(gallery))

    def fill() -> None:
        for s in range(0, len(gallery), 100_000):
            stage.append(gallery[s : s + 100_000])
        stage.train_if_due(wait=True)  # training and filling the file, as at start-up

    before = rss_bytes()
    _, build_s = timed(fill)
    # what the inverted file and the key maps add to the embeddings (which reserve() allocated)
    per_face = (rss_bytes() - before) / len(gallery)
    assert stage.ivf is not None and stage.approximate
    results = []
    for probe in probe_settings:
        stage.ann_probe = probe
        found, ms = run_probes(lambda p: stage.top(p, k)[0].numpy(), probes)
        results.append(
            Result(
                "service: faiss IVF-SQ8 + exact re-score",
                f"{stage.ivf.lists} lists, probe {probe}",
                *recall(found, truth),
                ms,
                build_s,
                len(gallery),
                per_face,
                f"{probe / stage.ivf.lists:.0%} of lists read",
            )
        )
    return results, stage


def faiss_flat_results(
    gallery: torch.Tensor,
    probes: torch.Tensor,
    truth: np.ndarray,
    k: int,
    stage: CosineStage,
    probe_settings: list[int],
) -> list[Result]:
    """faiss IVF with fp32 lists on the service's partition (its trained centroids): only the lists'
    encoding differs, so recall differences are not k-means luck."""
    import faiss

    assert stage.ivf is not None
    x = gallery.numpy()
    lists = stage.ivf.lists
    index = faiss.IndexIVFFlat(stage.ivf.index.quantizer, x.shape[1], lists, faiss.METRIC_INNER_PRODUCT)

    def build() -> None:
        index.add(x)  # the centroids are trained already

    _, build_s = timed(build)
    results = []
    for probe in probe_settings:
        index.nprobe = probe
        found, ms = run_probes(lambda p: index.search(p[None].numpy(), k)[1][0], probes)
        results.append(
            Result(
                "faiss IVF-Flat",
                f"{lists} lists, nprobe {probe}",
                *recall(found, truth),
                ms,
                build_s,
                len(x),
                x.shape[1] * 4 + 8,
                "fp32 lists, service's centroids (build = add only)",
            )
        )
    return results


def graph_results(gallery: torch.Tensor, probes: torch.Tensor, truth: np.ndarray, k: int) -> list[Result]:
    x = gallery.numpy()
    results = []
    if importlib.util.find_spec("faiss"):
        import faiss

        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 128
        _, build_s = timed(lambda: index.add(x))
        for ef in (64, 128):
            index.hnsw.efSearch = max(ef, k)
            found, ms = run_probes(lambda p: index.search(p[None].numpy(), k)[1][0], probes)
            results.append(
                Result(
                    "faiss IndexHNSWFlat",
                    f"M 32, efC 128, efSearch {max(ef, k)}",
                    *recall(found, truth),
                    ms,
                    build_s,
                    len(x),
                    x.shape[1] * 4 + 32 * 2 * 4 * 1.05,
                    "fp32 vectors + graph",
                )
            )
    if importlib.util.find_spec("usearch"):
        from usearch.index import Index

        for dtype in ("f16", "i8"):
            graph = Index(ndim=x.shape[1], metric="ip", dtype=dtype, connectivity=16, expansion_add=128)
            t0 = time.perf_counter()
            graph.add(np.arange(len(x)), x, threads=torch.get_num_threads())
            build_s = time.perf_counter() - t0
            for ef in (64, 128):
                graph.expansion_search = max(ef, k)
                found, ms = run_probes(lambda p, g=graph: g.search(p.numpy(), k).keys, probes)
                results.append(
                    Result(
                        "usearch HNSW",
                        f"{dtype}, M 16, ef_add 128, ef_search {max(ef, k)}",
                        *recall(found, truth),
                        ms,
                        build_s,
                        len(x),
                        graph.memory_usage / len(x),
                        "",
                    )
                )
    return results


def identify_rows(model: FaceModel, faces: int, probes: int, shortlist: int, probe: int) -> list[str]:
    """/identify's gallery stages through the real GalleryIndex, exact against IVF, at ``faces``."""
    from model.net import build_model

    qaconv = build_model("ir_18").qaconv.eval()
    gallery, probe_emb, _ = synthetic_gallery(model, faces, 2, probes, seed=1)
    rows = []
    g = torch.Generator().manual_seed(0)
    block_maps = torch.randn(1000, qaconv.num_features, 7, 7, generator=g)
    occ = torch.rand(1000, 1, 7, 7, generator=g)
    # one index (its maps are most of the memory), searched exactly and then through its inverted file,
    # which is trained once at the full size, as at start-up
    cpu = torch.device("cpu")  # the service's default storage on a CPU: int8 maps, matched in fp32
    index = GalleryIndex(
        qaconv, cpu, matching_dtype(cpu, "int8"), ann_min_faces=faces, ann_probe=probe, map_storage="int8"
    )
    t0 = time.perf_counter()
    _fill(index, gallery, block_maps, occ)
    index.cosine.train_if_due(wait=True)
    build_s = time.perf_counter() - t0
    del gallery
    truth: list[str] = []
    for name, min_faces in (("exact", 0), ("IVF", faces)):
        index.cosine.ann_min_faces = min_faces
        totals, cosine, qa, found = [], [], [], []
        for i, p in enumerate(probe_emb):
            fmap, pocc = block_maps[i % 1000], occ[i % 1000]
            t0 = time.perf_counter()
            out = index.search(p, fmap, pocc, shortlist)
            totals.append(1000 * (time.perf_counter() - t0))
            cosine.append(out["ms"]["cosine"])
            qa.append(out["ms"]["qaconv"])
            found.append(out["face_ids"][int(np.argmax(out["cosine"]))] if out["face_ids"] else "")
        if name == "exact":
            truth = found
        agree = np.mean([a == b for a, b in zip(found, truth, strict=True)])
        rows.append(
            f"| {faces:,} | {name} | {np.median(cosine):.1f} | {np.median(qa):.1f} | {np.median(totals):.1f} "
            f"| {agree:.3f} | {build_s:.0f} s (fill incl. IVF) |"
        )
        print(rows[-1], flush=True)  # noqa: T201
    return rows


def _fill(index: GalleryIndex, gallery: torch.Tensor, maps: torch.Tensor, occ: torch.Tensor) -> None:
    for s in range(0, len(gallery), 1000):
        n = min(1000, len(gallery) - s)
        ids = [f"{i:032x}" for i in range(s, s + n)]
        index.add(ids, [f"s{i // 2}" for i in range(s, s + n)], gallery[s : s + n], maps[:n], occ[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--faces", type=int, default=1_000_000, help="synthetic gallery size")
    parser.add_argument("--faces-per-subject", type=int, default=2)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--shortlist", type=int, default=100, help="faces QAConv re-ranks (OAML_SHORTLIST)")
    parser.add_argument("--exact-probes", type=int, default=100, help="probes timed one by one with exact search")
    parser.add_argument(
        "--probe", type=int, nargs="+", default=[64, 128, 256, 512], help="IVF lists read per probe (OAML_ANN_PROBE)"
    )
    parser.add_argument("--graph-faces", type=int, default=100_000, help="gallery size for the HNSW graphs")
    parser.add_argument("--graph-probes", type=int, default=300)
    parser.add_argument("--identify-faces", type=int, default=100_000, help="gallery size for the GalleryIndex rows")
    parser.add_argument("--identify-probe", type=int, default=256, help="OAML_ANN_PROBE for the GalleryIndex rows")
    parser.add_argument("--real", type=Path, nargs="*", default=DEFAULT_REAL, help="aligned identity folders")
    parser.add_argument("--real-per-subject", type=int, default=12)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "oaml_ir18.safetensors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    emb, labels = real_embeddings(args.real, args.real_per_subject, args.weights)
    model = FaceModel.fit(emb, labels) if len(emb) else FaceModel.isotropic()
    print(f"face model: {model.source}", flush=True)  # noqa: T201
    gallery, probes, probe_subjects = synthetic_gallery(model, args.faces, args.faces_per_subject, args.probes)
    same = float((gallery[0] @ gallery[1]).item())
    truth, exact_ms = exact_truth(gallery, probes, args.exact_probes)
    found_self = float(np.mean(truth // args.faces_per_subject == probe_subjects))
    results = [Result("exact cosine (below the threshold)", "fp32", 1.0, 1.0, exact_ms, 0.0, len(gallery), 0, "")]
    print(results[-1].row(), flush=True)  # noqa: T201
    service_rows, stage = service_results(gallery, probes, truth, args.shortlist, args.probe)
    results += service_rows
    results += faiss_flat_results(gallery, probes, truth, args.shortlist, stage, args.probe[:3])
    del stage
    for r in results[1:]:
        print(r.row(), flush=True)  # noqa: T201
    sub = gallery[: args.graph_faces].clone()
    sub_probes = probes[: args.graph_probes]
    sub_truth = (sub_probes @ sub.T).argmax(1).numpy()
    graphs = graph_results(sub, sub_probes, sub_truth, args.shortlist)
    for r in graphs:
        r.note = (r.note + f"; built on {len(sub):,} faces").lstrip("; ")
        print(r.row(), flush=True)  # noqa: T201
    del gallery, sub

    rows = [
        SECTION,
        "",
        f"- {machine_line(args.threads)}",
        f"- Command: `python bench/bench_ann.py --out bench/RESULTS.md --faces {args.faces} "
        f"--probes {args.probes} --threads {args.threads}` (or `make bench-ann`).",
        f"- Synthetic gallery: {args.faces:,} faces, {args.faces_per_subject} per identity, face model {model.source}; "
        f"cosine of two faces of one identity e.g. {same:.2f}; {args.probes:,} probes (fresh faces of enrolled "
        f"identities), whose exact top-1 is their own identity for {found_self:.1%}.",
        f'- Recall is measured against exact cosine top-1 (not against the identity); "in shortlist" is the share '
        f"of probes whose exact top-1 is among the {args.shortlist} faces QAConv re-ranks. One probe per call; "
        f"mean ms over all probes ({args.exact_probes} for exact search; {args.graph_probes} for the graphs, "
        f"built on the first {args.graph_faces:,} faces).",
        "",
        f"### Shortlist stage at {args.faces:,} faces",
        "",
        "| method | setting | top-1 = exact top-1 | exact top-1 in shortlist | ms per probe | build "
        "| memory per face beyond the fp32 embeddings | note |",
        "|---|---|---|---|---|---|---|---|",
        *[r.row() for r in results + graphs],
        "",
        f"### /identify gallery stages through GalleryIndex at {args.identify_faces:,} faces",
        "",
        f"Shortlist {args.shortlist}; inverted file trained at {args.identify_faces:,} faces (the threshold lowered "
        f"to the gallery's size), read {args.identify_probe} of {lists_for(args.identify_faces)} lists; QAConv "
        "maps as the service keeps them by default (int8 with per-channel scales, matched in fp32; ~27 KB a face). "
        "Median ms per probe; agreement = share of probes whose cosine top-1 equals the exact search's.",
        "",
        "| faces | shortlist | cosine stage ms | QAConv ms | search ms | agreement | build |",
        "|---|---|---|---|---|---|---|",
    ]
    rows += identify_rows(model, args.identify_faces, min(args.probes, 300), args.shortlist, args.identify_probe)
    emit("\n".join(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
