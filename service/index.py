"""The in-memory index over every enrolled face, for 1:N search.

Embeddings ``[N, 512]`` fp32 for the exact cosine stage, and QAConv maps laid out as
``[C, capacity * 49]`` in bf16 (fp16 on CUDA) with visibility folded in, grown by doubling and
compacted by moving the last face into a deleted slot, so enrolment and deletion cost O(1)
copies. The index lives on the model's device; :class:`service.engine.Engine` calls it from its
worker thread, the one thread that runs device work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.qaconv import PreparedGallery, QAConv
from service.store import FaceRecord

__all__ = ["GalleryIndex"]


class GalleryIndex:
    """In-memory search structures over every enrolled face (thread-safe)."""

    def __init__(self, qaconv: QAConv, device: torch.device, map_dtype: torch.dtype, embedding_size: int = 512) -> None:
        self.qaconv = qaconv
        self.device = device
        self.map_dtype = map_dtype
        self.hw = qaconv.hw
        self.channels = qaconv.num_features
        self.embedding_size = embedding_size
        self._lock = threading.RLock()
        self.count = 0
        self._capacity = 0
        self._emb = torch.zeros(0, embedding_size, device=device)
        self._maps = torch.zeros(self.channels, 0, dtype=map_dtype, device=device)
        self._vis = torch.zeros(0, device=device)
        self.face_ids: list[str] = []
        self.subjects: list[str] = []
        self._slot: dict[str, int] = {}

    def __len__(self) -> int:
        return self.count

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, 64)
        emb = torch.zeros(capacity, self.embedding_size, device=self.device)
        maps = torch.zeros(self.channels, capacity * self.hw, dtype=self.map_dtype, device=self.device)
        vis = torch.zeros(capacity, device=self.device)
        emb[: self.count] = self._emb[: self.count]
        maps[:, : self.count * self.hw] = self._maps[:, : self.count * self.hw]
        vis[: self.count] = self._vis[: self.count]
        self._emb, self._maps, self._vis, self._capacity = emb, maps, vis, capacity

    def add(
        self,
        face_ids: list[str],
        subjects: list[str],
        embeddings: torch.Tensor,
        feature_maps: torch.Tensor,
        occlusion: torch.Tensor,
    ) -> None:
        """Append faces: embeddings ``[n, 512]``, maps ``[n, C, 7, 7]``, occlusion ``[n, 1, 7, 7]``."""
        n = len(face_ids)
        if n == 0:
            return
        prepared = self.qaconv.prepare_gallery(
            feature_maps.to(self.device).float(), occlusion.to(self.device).float(), dtype=self.map_dtype
        )
        with self._lock:
            self._grow(self.count + n)
            start = self.count
            self._emb[start : start + n] = embeddings.to(self.device).float()
            self._maps[:, start * self.hw : (start + n) * self.hw] = prepared.maps
            self._vis[start : start + n] = occlusion.reshape(n, -1).float().mean(1).to(self.device)
            if len(subjects) != n:
                raise ValueError(f"{n} face ids but {len(subjects)} subjects")
            for i, fid in enumerate(face_ids):
                self._slot[fid] = start + i
            self.face_ids += face_ids
            self.subjects += subjects
            self.count += n

    def __contains__(self, face_id: object) -> bool:
        return face_id in self._slot

    def add_records(self, records: Sequence[FaceRecord]) -> None:
        """Append stored faces (numpy arrays, as the store keeps them); faces already indexed are skipped,
        so the enrolment path and a gallery follower (shared stores) may both add the same face."""
        records = [r for r in records if r.face_id not in self._slot]
        if not records:
            return
        self.add(
            [r.face_id for r in records],
            [r.subject for r in records],
            torch.from_numpy(np.stack([r.embedding for r in records])),
            torch.from_numpy(np.stack([r.feature_map for r in records]).astype(np.float32)),
            torch.from_numpy(np.stack([r.occlusion for r in records]))[:, None],
        )

    def remove(self, face_ids: list[str]) -> None:
        with self._lock:
            for fid in face_ids:
                slot = self._slot.pop(fid, None)
                if slot is None:
                    continue
                last = self.count - 1
                if slot != last:  # move the last face into the hole
                    self._emb[slot] = self._emb[last]
                    self._maps[:, slot * self.hw : (slot + 1) * self.hw] = self._maps[
                        :, last * self.hw : (last + 1) * self.hw
                    ]
                    self._vis[slot] = self._vis[last]
                    moved = self.face_ids[last]
                    self.face_ids[slot], self.subjects[slot] = moved, self.subjects[last]
                    self._slot[moved] = slot
                self.face_ids.pop()
                self.subjects.pop()
                self.count -= 1

    def search(
        self, embedding: torch.Tensor, feature_map: torch.Tensor, occlusion: torch.Tensor, shortlist: int
    ) -> dict[str, Any]:
        """Exact cosine over every face, then QAConv on the top ``shortlist`` faces.

        Returns the shortlisted slots' face ids, subjects, cosine and QAConv scores and the
        visibility of each gallery face, plus timings.
        """
        with self._lock:
            if self.count == 0:
                return {
                    "face_ids": [],
                    "subjects": [],
                    "cosine": np.zeros(0),
                    "qaconv": np.zeros(0),
                    "visibility": np.zeros(0),
                    "ms": {},
                }
            t0 = time.perf_counter()
            cos = self._emb[: self.count] @ embedding.to(self.device).float()
            k = min(shortlist, self.count)
            top = torch.topk(cos, k).indices
            t1 = time.perf_counter()
            gallery = PreparedGallery(self._maps[:, : self.count * self.hw], self.count, self.hw)
            qa = self.qaconv.match(
                feature_map[None].to(self.device).float(),
                gallery,
                probe_occ=occlusion.reshape(1, 1, 7, 7).to(self.device),
                indices=top,
            )[0]
            t2 = time.perf_counter()
            slots = top.cpu().numpy()
            return {
                "face_ids": [self.face_ids[s] for s in slots],
                "subjects": [self.subjects[s] for s in slots],
                "cosine": cos[top].float().cpu().numpy(),
                "qaconv": qa.float().cpu().numpy(),
                "visibility": self._vis[top].float().cpu().numpy(),
                "ms": {"cosine": 1000 * (t1 - t0), "qaconv": 1000 * (t2 - t1)},
            }
