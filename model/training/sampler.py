"""Batch samplers for metric learning: PK identity sampling and graph sampling (QAConv-GS).

Both yield lists of dataset indices, ``P`` identities with ``K`` images each, from a generator
seeded by ``(seed, epoch)``: the batches of an epoch are a pure function of those two numbers, so
training resumes exactly by replaying the epoch and skipping the batches already done.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PKSampler", "GraphSampler"]


class PKSampler:
    """``P`` random identities x ``K`` images per batch.

    Each epoch visits every identity ``ceil(n_images / K)`` times (at least once), drawing its
    images without replacement until they run out; identities with fewer than ``K`` images repeat
    some. Identities are shuffled and grouped into batches of ``P`` distinct ones.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0) -> None:
        if p < 2 or k < 2:
            raise ValueError("PK sampling needs at least 2 identities and 2 images per identity per batch")
        self.labels = np.asarray(labels)
        self.p, self.k, self.seed = p, k, seed
        self.classes = np.unique(self.labels)
        if len(self.classes) < p:
            raise ValueError(f"{len(self.classes)} identities, fewer than P={p}")
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in self.classes}

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches, ``[P*K]`` indices each, ``P`` distinct identities per batch.

        Each identity has ``ceil(n_images / K)`` groups of ``K`` images; every batch draws ``P``
        distinct identities with probability proportional to their remaining groups, until fewer
        than ``P`` identities have groups left (the rest of a very large identity is left out).
        """
        rng = np.random.default_rng([self.seed, epoch])
        queues: dict[int, list[np.ndarray]] = {}
        for c in self.classes:
            idx = self.by_class[int(c)]
            order = rng.permutation(idx)
            visits = max(1, int(np.ceil(len(idx) / self.k)))
            groups = []
            for v in range(visits):
                chosen = order[v * self.k : (v + 1) * self.k]
                if len(chosen) < self.k:
                    chosen = np.concatenate([chosen, rng.choice(idx, self.k - len(chosen), replace=len(idx) < self.k)])
                groups.append(chosen)
            queues[int(c)] = groups
        batches: list[np.ndarray] = []
        while True:
            alive = np.array([c for c, q in queues.items() if q])
            if len(alive) < self.p:
                return batches
            weights = np.array([len(queues[int(c)]) for c in alive], dtype=np.float64)
            picked = rng.choice(alive, self.p, replace=False, p=weights / weights.sum())
            batches.append(np.concatenate([queues[int(c)].pop() for c in picked]))

    def __len__(self) -> int:
        return len(self.batches(0))


class GraphSampler(PKSampler):
    """Batches of neighbouring identities: an anchor identity and its ``P - 1`` nearest ones.

    Hard batches speed up metric learning (Liao and Shao, "Graph sampling based deep metric
    learning", CVPR 2022). Neighbours come from :meth:`set_neighbors` (the trainer passes the
    cosine neighbours of the margin head's class centres, refreshed every epoch); until then it
    samples like :class:`PKSampler`. The number of batches per epoch equals PK's, so epochs
    cover about the same number of images.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0) -> None:
        super().__init__(labels, p, k, seed)
        self.neighbors: np.ndarray | None = None

    def set_neighbors(self, neighbors: np.ndarray) -> None:
        """``[num_classes, >= P-1]`` class ids nearest first (row ``c`` for label ``c``)."""
        if neighbors.shape[1] < self.p - 1:
            raise ValueError(f"need at least P-1={self.p - 1} neighbours per class, got {neighbors.shape[1]}")
        self.neighbors = np.asarray(neighbors)

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self.neighbors is None:
            return super().batches(epoch)
        rng = np.random.default_rng([self.seed, epoch, 1])
        count = len(super().batches(epoch))
        anchors = rng.permutation(self.classes)
        anchors = np.resize(anchors, count)
        batches = []
        for anchor in anchors:
            members = [int(anchor)] + [int(c) for c in self.neighbors[anchor][: self.p - 1]]
            idx = [rng.choice(self.by_class[c], self.k, replace=len(self.by_class[c]) < self.k) for c in members]
            batches.append(np.concatenate(idx))
        return batches
