"""The in-memory index over every enrolled face, for 1:N search.

Embeddings ``[N, 512]`` fp32 for the exact cosine stage, and QAConv maps laid out as
``[C, capacity * 49]`` in bf16 (fp16 on CUDA) with visibility folded in, grown by doubling and
compacted by moving the last face into a deleted slot, so enrolment and deletion cost O(1)
copies. The cosine stage (:class:`CosineStage`) is exact below ``ann_min_faces`` faces and takes
its candidates from an inverted file (:mod:`service.ann`) from there on. The index lives on the
model's device; :class:`service.engine.Engine` calls it from its worker thread, the one thread
that runs device work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.qaconv import PreparedGallery, QAConv
from service.ann import InvertedFile, training_sample
from service.store import FaceRecord

__all__ = ["ANN_REGROWTH", "CosineStage", "GalleryIndex"]

log = logging.getLogger(__name__)

#: The inverted file is re-trained when the gallery has grown this many times over the size it was
#: trained on, so its lists keep ~sqrt(N) faces each.
ANN_REGROWTH = 4


class CosineStage:
    """Every face's embedding by slot (``[capacity, D]`` fp32) and the search for the ``k`` nearest.

    Exact below ``ann_min_faces`` faces (0: always); from there on an inverted file proposes ``k``
    candidates from its ``ann_probe`` nearest lists, re-scored exactly here. The file is trained
    when the gallery first reaches the threshold and again each time it has grown
    :data:`ANN_REGROWTH` times (seconds at a million faces), and it knows faces by int64 keys that,
    unlike slots, do not move when a face is deleted. Slots follow :class:`GalleryIndex`: dense,
    the last one moved into a hole. Not locked: the owner serialises calls.
    """

    def __init__(self, device: torch.device, dim: int = 512, ann_min_faces: int = 0, ann_probe: int = 256) -> None:
        self.device = device
        self.dim = dim
        self.ann_min_faces = ann_min_faces
        self.ann_probe = ann_probe
        self.count = 0
        self.emb = torch.zeros(0, dim, device=device)
        self._keys = np.zeros(0, dtype=np.int64)
        self._slot_of_key: dict[int, int] = {}
        self._next_key = 0
        self.ivf: InvertedFile | None = None
        #: set while a gallery is loaded, so the file is trained once on all of it (see finish_loading)
        self.defer_training = False
        self._training: threading.Thread | None = None
        self._trained: InvertedFile | None = None  # handed over by the training thread

    @property
    def approximate(self) -> bool:
        """Whether searches take their candidates from the inverted file."""
        return self.ivf is not None and self.ann_min_faces > 0 and self.count >= self.ann_min_faces

    def describe(self) -> dict[str, Any]:
        """The stage as /info reports it."""
        return {
            "method": "inverted_file" if self.approximate else "exact",
            "ann_min_faces": self.ann_min_faces,
            "ann_lists": self.ivf.lists if self.ivf is not None else None,
            "ann_probe": self.ann_probe,
        }

    def reserve(self, capacity: int) -> None:
        if capacity <= len(self._keys):
            return
        emb = torch.zeros(capacity, self.dim, device=self.device)
        emb[: self.count] = self.emb[: self.count]
        keys = np.zeros(capacity, dtype=np.int64)
        keys[: self.count] = self._keys[: self.count]
        self.emb, self._keys = emb, keys

    def append(self, embeddings: torch.Tensor) -> None:
        """Faces in the next ``n`` slots (capacity reserved by the caller)."""
        self._adopt()
        n, start = len(embeddings), self.count
        self.emb[start : start + n] = embeddings.to(self.device).float()
        keys = np.arange(self._next_key, self._next_key + n, dtype=np.int64)
        self._next_key += n
        self._keys[start : start + n] = keys
        self._slot_of_key.update(zip(keys.tolist(), range(start, start + n), strict=True))
        self.count += n
        if self.ivf is not None:
            self.ivf.add(self.emb[start : start + n].cpu().numpy(), keys)
        self.train_if_due()

    def remove(self, slot: int) -> None:
        """Forget the face in ``slot``; the last face moves into it."""
        self._adopt()
        key = int(self._keys[slot])
        del self._slot_of_key[key]
        if self.ivf is not None:
            self.ivf.remove(np.array([key], dtype=np.int64))
        last = self.count - 1
        if slot != last:
            self.emb[slot] = self.emb[last]
            self._keys[slot] = self._keys[last]
            self._slot_of_key[int(self._keys[slot])] = slot
        self.count -= 1

    def train_if_due(self, wait: bool = False) -> None:
        """(Re-)train the inverted file if the gallery has reached the threshold or outgrown the file.

        Training (k-means on a sample: ~4 s at 200,000 faces on two cores) runs in a thread of its
        own unless ``wait``; searches meanwhile use the old file, or exact search. The next call of
        the owner then adds every face to the new file (~1 s at 200,000) and switches to it.
        """
        if self.defer_training or not self.ann_min_faces or self.count < self.ann_min_faces:
            return
        if self.ivf is not None and self.count < ANN_REGROWTH * self.ivf.trained_on:
            return
        if self._training is not None:
            if not wait:
                return
            self._training.join()
        else:
            sample, count = training_sample(self.emb[: self.count]), self.count

            def work() -> None:
                t0 = time.perf_counter()
                try:
                    self._trained = InvertedFile.train(sample, count)
                except Exception:  # a failed training leaves the old file (or exact search) in use
                    log.exception("training the inverted file on %d faces failed", count)
                    return
                log.info("inverted file trained on %d faces in %.1f s", count, time.perf_counter() - t0)

            self._training = threading.Thread(target=work, name="oaml-ann-train", daemon=True)
            self._training.start()
            if wait:
                self._training.join()
        self._adopt()

    def _adopt(self) -> None:
        """Switch to a newly trained file once its training thread is done: add every face to it."""
        if self._training is None or self._training.is_alive():
            return
        self._training, trained, self._trained = None, self._trained, None
        if trained is None:
            return
        t0 = time.perf_counter()
        trained.add(self.emb[: self.count].cpu().numpy(), self._keys[: self.count])
        self.ivf = trained
        log.info(
            "inverted file in use: %d faces in %d lists, %d read per probe (filled in %.1f s)",
            self.count,
            trained.lists,
            self.ann_probe,
            time.perf_counter() - t0,
        )

    def top(self, probe: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and exact cosines of the ``k`` faces nearest the unit vector ``probe``, best first:
        among all faces, or among the inverted file's ``k`` candidates when it is in use and its
        lists hold at least ``k`` faces (else exact: never fewer answers)."""
        probe = probe.to(self.device).float()
        self._adopt()
        if self.approximate:
            assert self.ivf is not None
            keys = self.ivf.search(probe.cpu().numpy(), k, self.ann_probe)
            if len(keys) >= k:
                slots = torch.tensor([self._slot_of_key[key] for key in keys.tolist()], device=self.device)
                cos, order = torch.sort(self.emb[slots] @ probe, descending=True)
                return slots[order], cos
        best = torch.topk(self.emb[: self.count] @ probe, k)
        return best.indices, best.values


class GalleryIndex:
    """In-memory search structures over every enrolled face (thread-safe).

    Args:
        ann_min_faces: gallery size from which the cosine stage uses the inverted file; 0 keeps it
            exact at every size.
        ann_probe: lists the inverted file reads per probe (more: higher recall, slower).
    """

    def __init__(
        self,
        qaconv: QAConv,
        device: torch.device,
        map_dtype: torch.dtype,
        embedding_size: int = 512,
        ann_min_faces: int = 0,
        ann_probe: int = 256,
    ) -> None:
        self.qaconv = qaconv
        self.device = device
        self.map_dtype = map_dtype
        self.hw = qaconv.hw
        self.channels = qaconv.num_features
        self.embedding_size = embedding_size
        self._lock = threading.RLock()
        self._capacity = 0
        self.cosine = CosineStage(device, embedding_size, ann_min_faces, ann_probe)
        self._maps = torch.zeros(self.channels, 0, dtype=map_dtype, device=device)
        self._vis = torch.zeros(0, device=device)
        self.face_ids: list[str] = []
        self.subjects: list[str] = []
        self._slot: dict[str, int] = {}

    @property
    def count(self) -> int:
        """Faces indexed: the cosine stage's count, which every add and remove goes through."""
        return self.cosine.count

    def __len__(self) -> int:
        return self.count

    @property
    def approximate(self) -> bool:
        return self.cosine.approximate

    def describe(self) -> dict[str, Any]:
        """How /identify's cosine stage searches, for /info."""
        return self.cosine.describe()

    def begin_loading(self) -> None:
        """Start of the start-up load: hold the inverted file's training until :meth:`finish_loading`."""
        with self._lock:
            self.cosine.defer_training = True

    def finish_loading(self) -> None:
        """End of the start-up load: train the inverted file now if the gallery needs one."""
        with self._lock:
            self.cosine.defer_training = False
            self.cosine.train_if_due(wait=True)

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, 64)
        maps = torch.zeros(self.channels, capacity * self.hw, dtype=self.map_dtype, device=self.device)
        vis = torch.zeros(capacity, device=self.device)
        self.cosine.reserve(capacity)
        maps[:, : self.count * self.hw] = self._maps[:, : self.count * self.hw]
        vis[: self.count] = self._vis[: self.count]
        self._maps, self._vis, self._capacity = maps, vis, capacity

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
        if len(subjects) != n:
            raise ValueError(f"{n} face ids but {len(subjects)} subjects")
        with self._lock:
            self._grow(self.count + n)
            start = self.count
            self._maps[:, start * self.hw : (start + n) * self.hw] = prepared.maps
            self._vis[start : start + n] = occlusion.reshape(n, -1).float().mean(1).to(self.device)
            self.cosine.append(embeddings)
            for i, fid in enumerate(face_ids):
                self._slot[fid] = start + i
            self.face_ids += face_ids
            self.subjects += subjects

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
                self.cosine.remove(slot)
                if slot != last:  # move the last face into the hole
                    self._maps[:, slot * self.hw : (slot + 1) * self.hw] = self._maps[
                        :, last * self.hw : (last + 1) * self.hw
                    ]
                    self._vis[slot] = self._vis[last]
                    moved = self.face_ids[last]
                    self.face_ids[slot], self.subjects[slot] = moved, self.subjects[last]
                    self._slot[moved] = slot
                self.face_ids.pop()
                self.subjects.pop()

    def search(
        self, embedding: torch.Tensor, feature_map: torch.Tensor, occlusion: torch.Tensor, shortlist: int
    ) -> dict[str, Any]:
        """Cosine shortlist (:meth:`CosineStage.top`), then QAConv on the top ``shortlist`` faces.

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
            top, cos = self.cosine.top(embedding, min(shortlist, self.count))
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
                "cosine": cos.float().cpu().numpy(),
                "qaconv": qa.float().cpu().numpy(),
                "visibility": self._vis[top].float().cpu().numpy(),
                "ms": {"cosine": 1000 * (t1 - t0), "qaconv": 1000 * (t2 - t1)},
            }
