"""The in-memory index over every enrolled face, for 1:N search.

Embeddings ``[N, 512]`` fp32 for the exact cosine stage, and QAConv maps ``[N, C, 49]`` with
visibility folded in, as int8 with a scale per face and channel (:func:`model.qaconv.quantise_maps`:
half the bytes of bf16, no measurable cost in accuracy; each shortlist is dequantised to the matching
dtype when it is matched: the service's is fp32 on a CPU, fp16 on CUDA) or with ``map_storage="native"``
(``OAML_MAP_STORAGE``) in the matching dtype (bf16 on a CPU), each kept by slot in :class:`SlotRows`: chunks that are
never reallocated (the first small, then :data:`CHUNK_ROWS` faces each), so the gallery grows
without copying what it holds and without a second copy alive while it grows; deletion moves the
last face into the freed slot, so enrolment and deletion cost O(1) copies. The cosine stage
(:class:`CosineStage`) is exact below ``ann_min_faces`` faces and takes its candidates from an
inverted file (:mod:`service.ann`) from there on. The index lives on the model's device;
:class:`service.engine.Engine` calls it from its worker thread, the one thread that runs device
work.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.qaconv import MAP_STORAGES, PreparedGallery, QAConv, dequantise_maps, quantise_maps
from service.ann import InvertedFile, training_rows
from service.store import FaceRecord

__all__ = ["ANN_REGROWTH", "CHUNK_ROWS", "SlotRows", "CosineStage", "GalleryIndex", "matching_dtype"]

log = logging.getLogger(__name__)

#: The inverted file is re-trained when the gallery has grown this many times over the size it was
#: trained on, so its lists keep ~sqrt(N) faces each.
ANN_REGROWTH = 4

#: Faces per chunk once the gallery is large (at 512 channels 222 MB of int8 maps and scales or 411 MB of bf16
#: maps; 16 MB of embeddings): the most memory a gallery holds beyond its faces, and the unit in which it grows.
CHUNK_ROWS = 8192
#: The first chunk; each next one doubles the capacity until chunks reach CHUNK_ROWS.
FIRST_CHUNK_ROWS = 64
#: Faces are prepared and added this many at a time, whatever the batch: the fp32 working copies of
#: their maps are what a growing gallery holds beyond its faces.
ADD_SLICE = 256


def matching_dtype(device: torch.device, map_storage: str) -> torch.dtype:
    """The dtype QAConv matches enrolled maps in: fp16 on CUDA; on a CPU bf16 where the index keeps the maps in it
    (``native``: half of fp32's memory), fp32 where it keeps them in int8 and dequantises each shortlist (exact,
    and faster than bf16 on a CPU without native bf16: bench/RESULTS.md, "Int8 QAConv maps in the index")."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if map_storage == "native" else torch.float32


class SlotRows:
    """Rows of one shape, by slot, in chunks that are allocated once and never copied.

    Growing adds a chunk (the capacity doubles until chunks reach :data:`CHUNK_ROWS` rows, then grows
    by that much), so what the rows hold is never copied and never held twice; a chunk is allocated
    uninitialised, so on a CPU its untouched pages cost no resident memory until rows are written.
    Chunks left wholly beyond the rows in use are freed (:meth:`trim`). Not locked: the owner
    serialises calls.
    """

    def __init__(
        self, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, chunk_rows: int | None = None
    ) -> None:
        self.row_shape, self.dtype, self.device = row_shape, dtype, device
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.chunks: list[torch.Tensor] = []
        self._starts: list[int] = []
        self.capacity = 0

    def ensure(self, rows: int) -> None:
        """Room for ``rows`` rows in all, zeroed: a row never written holds nothing (not a freed buffer's leftovers)."""
        while self.capacity < rows:
            size = min(max(FIRST_CHUNK_ROWS, self.capacity), self.chunk_rows)
            self.chunks.append(torch.zeros((size, *self.row_shape), dtype=self.dtype, device=self.device))
            self._starts.append(self.capacity)
            self.capacity += size

    def trim(self, rows: int) -> None:
        """Free the chunks that hold no row below ``rows``, but one: a gallery hovering at a chunk's edge
        (delete one, enrol one) does not free and allocate a chunk each time."""
        while len(self.chunks) > 1 and self._starts[-2] >= max(rows, 1):
            self.chunks.pop()
            self.capacity = self._starts.pop()

    def _check(self, stop: int) -> None:
        if stop > self.capacity:  # a caller that skipped ensure(): fail loudly, never loop or read garbage
            raise IndexError(f"slot {stop - 1} is beyond the capacity of {self.capacity} rows")

    def _locate(self, slot: int) -> tuple[torch.Tensor, int]:
        c = bisect.bisect_right(self._starts, slot) - 1
        return self.chunks[c], slot - self._starts[c]

    def write(self, start: int, values: torch.Tensor) -> None:
        """``values[i]`` into slot ``start + i`` (capacity ensured by the caller)."""
        self._check(start + len(values))
        done = 0
        while done < len(values):
            chunk, offset = self._locate(start + done)
            n = min(len(values) - done, len(chunk) - offset)
            chunk[offset : offset + n] = values[done : done + n].to(device=self.device, dtype=self.dtype)
            done += n

    def move(self, dst: int, src: int) -> None:
        """Copy slot ``src``'s row into slot ``dst``."""
        self._check(max(dst, src) + 1)
        (a, i), (b, j) = self._locate(dst), self._locate(src)
        a[i] = b[j]

    def clear(self, slot: int) -> None:
        """Zero slot ``slot``'s row: a deleted face's embedding or maps must not stay in memory after it is gone
        (a row beyond those in use is never read, but it is still the face)."""
        self._check(slot + 1)
        chunk, offset = self._locate(slot)
        chunk[offset].zero_()

    def gather(self, slots: torch.Tensor, rows: int, layout: str = "rows") -> torch.Tensor:
        """Rows ``slots`` (a 1-d index tensor, every slot below ``rows``: the rows in use), in that order:
        ``[k, *row_shape]``, or with ``layout="columns"`` ``[row_shape[0], k, *row_shape[1:]]`` (what
        QAConv matches against, without a second copy)."""
        flat = slots.to("cpu", torch.int64).numpy()
        if len(flat) and (flat.min() < 0 or flat.max() >= rows):
            raise IndexError(f"slots {flat.min()}..{flat.max()} outside the {rows} rows in use")
        if not len(flat):
            shape = (self.row_shape[0], 0, *self.row_shape[1:]) if layout == "columns" else (0, *self.row_shape)
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        # Whole rows selected chunk by chunk, then put back in the asked order, then (columns) one transposing
        # copy: each step a contiguous copy. (Assigning into a strided [C, k, hw] view is ~10x slower on a CPU.)
        which = np.searchsorted(np.asarray(self._starts), flat, side="right") - 1
        pieces = []
        for c in np.unique(which):  # ascending: the pieces follow a stable sort of the slots by chunk
            local = torch.from_numpy(flat[which == c] - self._starts[c]).to(self.device)
            pieces.append(self.chunks[c].index_select(0, local))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if len(pieces) > 1:
            back = np.argsort(np.argsort(which, kind="stable"))
            out = out.index_select(0, torch.from_numpy(back).to(self.device))
        return out.transpose(0, 1).contiguous() if layout == "columns" else out

    def views(self, rows: int) -> list[torch.Tensor]:
        """The first ``rows`` rows, as views of consecutive chunks (no copy)."""
        self._check(rows)
        parts = []
        for start, chunk in zip(self._starts, self.chunks, strict=True):
            if start >= rows:
                break
            parts.append(chunk[: rows - start])
        return parts

    def nbytes(self) -> int:
        """Bytes allocated (rows in use and the spare room of the last chunk)."""
        return sum(c.numel() * c.element_size() for c in self.chunks)


class CosineStage:
    """Every face's embedding by slot (fp32 :class:`SlotRows`) and the search for the ``k`` nearest.

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
        self.emb = SlotRows((dim,), torch.float32, device)
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
        """Room for ``capacity`` faces (the keys, 8 bytes a face, grow by doubling: the embeddings in chunks)."""
        self.emb.ensure(capacity)
        if capacity > len(self._keys):
            keys = np.zeros(max(capacity, 2 * len(self._keys)), dtype=np.int64)
            keys[: self.count] = self._keys[: self.count]
            self._keys = keys

    def append(self, embeddings: torch.Tensor) -> None:
        """Faces in the next ``n`` slots (capacity reserved by the caller)."""
        self._adopt()
        n, start = len(embeddings), self.count
        self.emb.write(start, embeddings.float())
        keys = np.arange(self._next_key, self._next_key + n, dtype=np.int64)
        self._next_key += n
        self._keys[start : start + n] = keys
        self._slot_of_key.update(zip(keys.tolist(), range(start, start + n), strict=True))
        self.count += n
        if self.ivf is not None:
            self.ivf.add(embeddings.float().cpu().numpy(), keys)
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
            self.emb.move(slot, last)
            self._keys[slot] = self._keys[last]
            self._slot_of_key[int(self._keys[slot])] = slot
        self.emb.clear(last)  # the deleted face's row, or the moved face's old copy: zeroed either way
        self.count -= 1
        self.emb.trim(self.count)

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
            count = self.count
            sample = self.emb.gather(torch.from_numpy(training_rows(count)), count).float().cpu().numpy()

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
        offset = 0
        for view in self.emb.views(self.count):  # chunk by chunk: bounded copies
            trained.add(view.float().cpu().numpy(), self._keys[offset : offset + len(view)])
            offset += len(view)
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
                cos, order = torch.sort(self.emb.gather(slots, self.count) @ probe, descending=True)
                return slots[order], cos
        if self.count == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0, device=self.device)
        scores = torch.cat([part @ probe for part in self.emb.views(self.count)])
        best = torch.topk(scores, k)
        return best.indices, best.values


class GalleryIndex:
    """In-memory search structures over every enrolled face (thread-safe).

    Args:
        ann_min_faces: gallery size from which the cosine stage uses the inverted file; 0 keeps it
            exact at every size.
        ann_probe: lists the inverted file reads per probe (more: higher recall, slower).
        map_storage: ``int8`` (the service's default, ``OAML_MAP_STORAGE``) keeps int8 values and a scale per
            face and channel, and matches in ``map_dtype``; ``native`` keeps the maps in ``map_dtype``.
    """

    def __init__(
        self,
        qaconv: QAConv,
        device: torch.device,
        map_dtype: torch.dtype,
        embedding_size: int = 512,
        ann_min_faces: int = 0,
        ann_probe: int = 256,
        map_storage: str = "int8",
    ) -> None:
        if map_storage not in MAP_STORAGES:
            raise ValueError(f"map_storage must be one of {MAP_STORAGES}, got {map_storage!r}")
        self.qaconv = qaconv
        self.map_storage = map_storage
        self.device = device
        self.map_dtype = map_dtype
        self.hw = qaconv.hw
        self.channels = qaconv.num_features
        self.embedding_size = embedding_size
        self._lock = threading.RLock()
        self.cosine = CosineStage(device, embedding_size, ann_min_faces, ann_probe)
        int8 = map_storage == "int8"
        # [face, C, hw], visibility folded in; with int8 storage, each face's scale per channel beside them
        self._maps = SlotRows((self.channels, self.hw), torch.int8 if int8 else map_dtype, device)
        self._scales = SlotRows((self.channels,), torch.float32, device) if int8 else None
        # per face: mean visibility and AdaFace feature norm (NaN: not known), what the fusion needs beside the scores
        self._face = torch.zeros(0, 2, device=device)
        self.face_ids: list[str] = []
        self.subjects: list[str] = []
        self._slot: dict[str, int] = {}
        self.faces_per_subject: Counter[str] = Counter()

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
        """How /identify searches (the cosine stage, how the maps are kept), for /info."""
        return {**self.cosine.describe(), "map_storage": self.map_storage}

    def begin_loading(self) -> None:
        """Start of the start-up load: hold the inverted file's training until :meth:`finish_loading`."""
        with self._lock:
            self.cosine.defer_training = True

    def finish_loading(self) -> None:
        """End of the start-up load: train the inverted file now if the gallery needs one."""
        with self._lock:
            self.cosine.defer_training = False
            self.cosine.train_if_due(wait=True)

    def reserve(self, faces: int) -> None:
        """Room for ``faces`` faces in all (a load of known size allocates its chunks once)."""
        with self._lock:
            for rows in self._map_rows():
                rows.ensure(faces)
            self.cosine.reserve(faces)
            if faces > len(self._face):  # 8 bytes a face: doubling is cheap
                face = torch.zeros(max(faces, 2 * len(self._face)), 2, device=self.device)
                face[: self.count] = self._face[: self.count]
                self._face = face

    def _map_rows(self) -> list[SlotRows]:
        """What holds the maps by slot: the maps, and their scales where they are int8 (moved, cleared and
        trimmed together)."""
        return [self._maps] if self._scales is None else [self._maps, self._scales]

    def _gather_maps(self, slots: torch.Tensor) -> torch.Tensor:
        """The maps of ``slots`` in QAConv's column layout ``[C, k, hw]``, in the matching dtype."""
        maps = self._maps.gather(slots, self.count, layout="columns")
        if self._scales is None:
            return maps
        scales = self._scales.gather(slots, self.count, layout="columns")  # [C, k]
        return dequantise_maps(maps, scales, self.map_dtype)

    def memory_bytes(self) -> int:
        """Bytes the index's tensors hold (maps and their scales, embeddings, visibility and norms; not the id
        lists)."""
        maps = sum(rows.nbytes() for rows in self._map_rows())
        return maps + self.cosine.emb.nbytes() + self._face.numel() * 4

    def add(
        self,
        face_ids: list[str],
        subjects: list[str],
        embeddings: torch.Tensor,
        feature_maps: torch.Tensor,
        occlusion: torch.Tensor,
        norms: torch.Tensor | None = None,
    ) -> None:
        """Append faces: embeddings ``[n, 512]``, maps ``[n, C, 7, 7]``, occlusion ``[n, 1, 7, 7]``, feature
        norms ``[n]`` (None: unknown, NaN; a quality-form calibration cannot score such faces)."""
        n = len(face_ids)
        if n == 0:
            return
        if len(subjects) != n:
            raise ValueError(f"{n} face ids but {len(subjects)} subjects")
        with self._lock:
            self.reserve(self.count + n)
            start = self.count
            for s in range(0, n, ADD_SLICE):  # prepared a slice at a time: bounded working copies
                part = slice(s, min(s + ADD_SLICE, n))
                fea, occ = feature_maps[part].to(self.device).float(), occlusion[part].to(self.device).float()
                # int8 is quantised from fp32, not from the matching dtype (one rounding, not two)
                prepared = self.qaconv.prepare_gallery(
                    fea, occ, torch.float32 if self._scales is not None else self.map_dtype
                )
                rows = prepared.maps.reshape(self.channels, prepared.count, self.hw).permute(1, 0, 2)
                if self._scales is not None:
                    rows, scales = quantise_maps(rows)
                    self._scales.write(start + s, scales)
                self._maps.write(start + s, rows)
            self._face[start : start + n, 0] = occlusion.reshape(n, -1).float().mean(1).to(self.device)
            self._face[start : start + n, 1] = (
                torch.full((n,), float("nan")) if norms is None else norms.reshape(n).float()
            ).to(self.device)
            self.cosine.append(embeddings)
            for i, fid in enumerate(face_ids):
                self._slot[fid] = start + i
            self.face_ids += face_ids
            self.subjects += subjects
            self.faces_per_subject.update(subjects)

    def members(self) -> tuple[list[str], dict[str, int]]:
        """The indexed face ids and each subject's face count, read together (a consistent snapshot)."""
        with self._lock:
            return list(self.face_ids), dict(self.faces_per_subject)

    def __contains__(self, face_id: object) -> bool:
        return face_id in self._slot

    def add_records(self, records: Sequence[FaceRecord]) -> None:
        """Append stored faces (numpy arrays, as the store keeps them); faces already indexed are skipped,
        so the enrolment path and a gallery follower (shared stores) may both add the same face."""
        records = [r for r in records if r.face_id not in self._slot]
        for start in range(0, len(records), ADD_SLICE):  # the fp32 working copies stay ~100 MB, whatever the batch
            part = records[start : start + ADD_SLICE]
            self.add(
                [r.face_id for r in part],
                [r.subject for r in part],
                torch.from_numpy(np.stack([r.embedding for r in part])),
                torch.from_numpy(np.stack([r.feature_map for r in part]).astype(np.float32)),
                torch.from_numpy(np.stack([r.occlusion for r in part]))[:, None],
                torch.tensor([r.norm for r in part]),
            )

    def remove(self, face_ids: list[str]) -> None:
        with self._lock:
            for fid in face_ids:
                slot = self._slot.pop(fid, None)
                if slot is None:
                    continue
                last = self.count - 1
                gone = self.subjects[slot]
                self.faces_per_subject[gone] -= 1
                if self.faces_per_subject[gone] <= 0:
                    del self.faces_per_subject[gone]
                self.cosine.remove(slot)
                if slot != last:  # move the last face into the hole
                    for rows in self._map_rows():
                        rows.move(slot, last)
                    self._face[slot] = self._face[last]
                    moved = self.face_ids[last]
                    self.face_ids[slot], self.subjects[slot] = moved, self.subjects[last]
                    self._slot[moved] = slot
                for rows in self._map_rows():
                    rows.clear(last)  # no deleted face's maps left behind in memory
                self._face[last] = 0
                self.face_ids.pop()
                self.subjects.pop()
            for rows in self._map_rows():
                rows.trim(self.count)

    def _face_columns(self, slots: torch.Tensor) -> dict[str, np.ndarray]:
        face = self._face[slots.to(self.device)].float().cpu().numpy()
        return {"visibility": face[:, 0], "norm": face[:, 1]}

    def score_faces(
        self, face_ids: list[str], embedding: torch.Tensor, feature_map: torch.Tensor, occlusion: torch.Tensor
    ) -> dict[str, Any]:
        """Cosine, QAConv, visibility and feature norm of one probe against the given enrolled faces (those still
        indexed)."""
        with self._lock:
            ids = [f for f in face_ids if f in self._slot]
            slots = torch.tensor([self._slot[f] for f in ids], dtype=torch.long)
            if not ids:
                return {
                    "face_ids": [],
                    "cosine": np.zeros(0),
                    "qaconv": np.zeros(0),
                    "visibility": np.zeros(0),
                    "norm": np.zeros(0),
                }
            cos = self.cosine.emb.gather(slots, self.count) @ embedding.to(self.device).float()
            maps = self._gather_maps(slots)
            qa = self.qaconv.match(
                feature_map[None].to(self.device).float(),
                PreparedGallery(maps.reshape(self.channels, -1), len(ids), self.hw),
                probe_occ=occlusion.reshape(1, 1, 7, 7).to(self.device),
            )[0]
            return {
                "face_ids": ids,
                "cosine": cos.float().cpu().numpy(),
                "qaconv": qa.float().cpu().numpy(),
                **self._face_columns(slots),
            }

    def search(
        self, embedding: torch.Tensor, feature_map: torch.Tensor, occlusion: torch.Tensor, shortlist: int
    ) -> dict[str, Any]:
        """Cosine shortlist (:meth:`CosineStage.top`), then QAConv on the top ``shortlist`` faces.

        Returns the shortlisted slots' face ids, subjects, cosine and QAConv scores and the
        visibility and feature norm of each gallery face, plus timings.
        """
        with self._lock:
            if self.count == 0:
                return {
                    "face_ids": [],
                    "subjects": [],
                    "cosine": np.zeros(0),
                    "qaconv": np.zeros(0),
                    "visibility": np.zeros(0),
                    "norm": np.zeros(0),
                    "gallery_faces": 0,
                    "subject_faces": {},
                    "ms": {},
                }
            t0 = time.perf_counter()
            top, cos = self.cosine.top(embedding, min(shortlist, self.count))
            t1 = time.perf_counter()
            shortlisted = self._gather_maps(top)  # [C, k, hw]: QAConv's layout
            gallery = PreparedGallery(shortlisted.reshape(self.channels, -1), len(top), self.hw)
            qa = self.qaconv.match(
                feature_map[None].to(self.device).float(),
                gallery,
                probe_occ=occlusion.reshape(1, 1, 7, 7).to(self.device),
            )[0]
            t2 = time.perf_counter()
            slots = top.cpu().numpy()
            return {
                "face_ids": [self.face_ids[s] for s in slots],
                "subjects": [self.subjects[s] for s in slots],
                "cosine": cos.float().cpu().numpy(),
                "qaconv": qa.float().cpu().numpy(),
                **self._face_columns(top),
                "gallery_faces": self.count,  # what the decision's threshold is set for (read under the lock)
                "subject_faces": {self.subjects[s]: self.faces_per_subject[self.subjects[s]] for s in slots},
                "ms": {"cosine": 1000 * (t1 - t0), "qaconv": 1000 * (t2 - t1)},
            }
