"""An approximate shortlist for large galleries: a faiss inverted file with 8-bit lists.

Exact cosine reads every enrolled embedding per probe (2 KB each: ~190 ms at a million faces on
a 2-core CPU). An inverted file partitions the embeddings by their nearest of ``L`` centroids
(k-means) and stores each list's vectors together, quantised to 8 bits per dimension; a probe
reads only its ``probe`` nearest lists. The index then re-scores the candidates exactly from its
own fp32 embeddings, so the cosines it reports are exact and only recall is approximate.

Chosen by measurement (bench/bench_ann.py, bench/RESULTS.md): against HNSW graphs (faiss,
usearch) it builds a million faces in 23 s instead of 12-15 minutes on two cores, so it needs no
persistence beside the store (it is rebuilt whenever the index is loaded), and it supports
deletion; against an inverted file over the index's own rows in torch it reads its lists
contiguously, 17x faster at the same recall, for ~525 bytes per face (1% of a face's QAConv
maps). faiss runs on the CPU whatever the model's device.
"""

from __future__ import annotations

import logging
import math

import numpy as np

# faiss' loader logs each CPU-specific build it tries, failures included, at INFO on import
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402

__all__ = ["InvertedFile", "lists_for", "training_rows"]

log = logging.getLogger(__name__)

#: Training sample per list: faiss' own cap. Against 64 per list it raised recall by ~3 points at
#: 50k faces (0.91 vs 0.88, probe 32 of 224 lists) for 4x the training time (~1 s at 50k faces,
#: ~25 s at a million on two cores).
TRAIN_PER_LIST = 256


def lists_for(count: int) -> int:
    """Lists for a gallery of ``count`` faces: ~sqrt(N), the usual balance between the centroid scan
    (``L`` dot products) and the vectors read per list (``N / L``)."""
    return max(16, int(round(math.sqrt(count))))


def training_rows(count: int, seed: int = 0) -> np.ndarray:
    """Which of a gallery's ``count`` rows train its file: up to ``TRAIN_PER_LIST`` per list, sorted."""
    return np.sort(np.random.default_rng(seed).permutation(count)[: TRAIN_PER_LIST * lists_for(count)])


class InvertedFile:
    """faiss ``IndexIVFScalarQuantizer`` (inner product, 8-bit) keyed by stable int64 keys.

    The owner (:class:`service.index.CosineStage`) gives each face a key that survives its slot
    moving, and serialises calls.
    """

    def __init__(self, index: faiss.IndexIVFScalarQuantizer, trained_on: int) -> None:
        self.index = index
        self.trained_on = trained_on

    @classmethod
    def train(cls, sample: np.ndarray, count: int, seed: int = 0) -> InvertedFile:
        """An empty file for a gallery of ``count`` faces, its centroids and 8-bit ranges fitted to
        ``sample`` (unit rows; :func:`training_rows` says which). The costly part of a build, and
        independent of the gallery's later changes, so it can run beside the service."""
        lists = min(lists_for(count), max(1, len(sample) // 39))  # faiss needs ~39 points per centroid
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(sample.shape[1]),
            sample.shape[1],
            lists,
            faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT,
        )
        index.cp.seed = seed
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        # removal by key without scanning every list (the stubs faiss ships lack DirectMap)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        return cls(index, count)

    @classmethod
    def build(cls, embeddings: np.ndarray, keys: np.ndarray, seed: int = 0) -> InvertedFile:
        """Train on a sample of ``embeddings`` (``[N, D]`` unit rows) and add them all under ``keys``."""
        sample = np.ascontiguousarray(embeddings[training_rows(len(embeddings), seed)], dtype=np.float32)
        ivf = cls.train(sample, len(embeddings), seed)
        ivf.add(embeddings, keys)
        return ivf

    @property
    def lists(self) -> int:
        return int(self.index.nlist)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, embeddings: np.ndarray, keys: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(embeddings, dtype=np.float32), keys.astype(np.int64))

    def remove(self, keys: np.ndarray) -> None:
        """Remove faces by key, their 8-bit codes zeroed first: faiss moves a list's last entry into the hole and
        shortens the list, leaving the bytes past its new end as they were, so without this a deleted face's code
        (or, once zeroed, nothing of it) would stay in memory."""
        zero = np.zeros(self.index.code_size, dtype=np.uint8)
        lists = self.index.invlists
        assert lists is not None
        for key in np.asarray(keys, dtype=np.int64).tolist():
            lo = int(self.index.direct_map.get(key))  # the list number in the high 32 bits, the offset in the low
            lists.update_entry(lo >> 32, lo & 0xFFFFFFFF, key, faiss.swig_ptr(zero))  # type: ignore[attr-defined]
        # faiss' Python wrapper takes an id array here; its stubs only know the C++ IDSelector form
        self.index.remove_ids(np.ascontiguousarray(keys, dtype=np.int64))  # type: ignore[arg-type]

    def search(self, embedding: np.ndarray, k: int, probe: int) -> np.ndarray:
        """Keys of up to ``k`` faces nearest ``embedding`` among the ``probe`` nearest lists."""
        self.index.nprobe = min(probe, self.lists)
        _, keys = self.index.search(np.ascontiguousarray(embedding[None], dtype=np.float32), k)
        return keys[0][keys[0] >= 0]
