"""From a step's sample indices to a ready batch: augmentation, visibility targets, teacher inputs.

Preparing a batch is a pure function of the data, the configuration and the step: every sample
draws from its own generator, seeded by (seed, step, position in the batch). So batches can be
prepared in worker processes, a step ahead, in pieces and in any order, and a resumed run
prepares exactly the batches an uninterrupted one would have.

A batch holds the PK-sampled labelled faces first, then ``unlabeled_per_batch`` faces from the
unlabelled caches (drawn from (seed, step) too): those carry no identity and only feed the
teacher losses and the occlusion head.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.align import to_input_tensor
from model.training.augment import FaceAugmenter
from model.training.device_augment import DeviceAugmenter
from model.training.occlusion import visibility_grid

__all__ = ["PreparedBatch", "DeviceBatch", "BatchSource", "DeviceBatchSource", "Prefetcher"]


@dataclass
class DeviceBatch:
    """A training step's batch as tensors on the training device.

    ``inputs`` are the student's views in the network's convention (BGR, [-1, 1], channels last);
    ``teacher_views`` the teacher's (RGB, [0, 255]); the first ``len(labels)`` rows are labelled.
    """

    inputs: torch.Tensor
    visibility: torch.Tensor  # [B, 7, 7]
    labels: torch.Tensor  # [L]
    occluded: torch.Tensor  # [B] bool
    teacher_views: torch.Tensor | None
    teacher_targets: torch.Tensor | None

    @property
    def labelled(self) -> int:
        return len(self.labels)


@dataclass
class PreparedBatch:
    """Everything a training step needs from the data, as arrays (picklable, for worker processes)."""

    images: np.ndarray  # [B, 112, 112, 3] uint8 RGB: labelled samples, then unlabelled ones
    visibility: np.ndarray  # [B, 7, 7] float32 occlusion-head targets
    labels: np.ndarray  # [L] int64 training-class labels of the first L samples
    occluded: np.ndarray  # [B] bool
    teacher_images: np.ndarray | None  # [B, 112, 112, 3] the same views without occluders ("matched" teacher)
    teacher_targets: np.ndarray | None  # [B, 128] precomputed teacher embeddings ("clean" teacher)

    @property
    def labelled(self) -> int:
        return len(self.labels)

    @staticmethod
    def merge(parts: list[PreparedBatch]) -> PreparedBatch:
        """Pieces prepared for consecutive positions, joined in order."""

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return PreparedBatch(
            images=np.concatenate([p.images for p in parts]),
            visibility=np.concatenate([p.visibility for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            occluded=np.concatenate([p.occluded for p in parts]),
            teacher_images=cat("teacher_images"),
            teacher_targets=cat("teacher_targets"),
        )

    def to_device(self, device: torch.device) -> DeviceBatch:
        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a).to(device)

        views = tensor(self.teacher_images)
        return DeviceBatch(
            inputs=to_input_tensor(self.images).to(device).contiguous(memory_format=torch.channels_last),
            visibility=torch.from_numpy(self.visibility).to(device),
            labels=torch.from_numpy(self.labels).to(device),
            occluded=torch.from_numpy(self.occluded).to(device),
            teacher_views=None if views is None else views.permute(0, 3, 1, 2).float(),
            teacher_targets=tensor(self.teacher_targets),
        )


@dataclass
class BatchSource:
    """The data and rules a batch is prepared from.

    Attributes:
        rows: training position -> row of ``images`` (the trainer's ``train_idx``).
        labels: training position -> training-class label.
        teacher_view: ``None`` (no teacher), ``"clean"`` (look up ``teacher_table``) or ``"matched"``
            (return the occluder-free views for the teacher to embed).
        teacher_table / unlabeled_teacher_table: ``[N, 2, 128]`` embeddings of each crop and its
            mirror, for ``"clean"``.
    """

    augmenter: FaceAugmenter
    images: np.ndarray
    landmarks: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    seed: int
    teacher_view: str | None = None
    teacher_table: np.ndarray | None = None
    unlabeled_images: np.ndarray | None = None
    unlabeled_landmarks: np.ndarray | None = None
    unlabeled_per_batch: int = 0
    unlabeled_teacher_table: np.ndarray | None = None
    unlabeled_p: np.ndarray | None = None  # per-face draw probabilities (None: uniform)

    def unlabeled_rows(self, step: int) -> np.ndarray:
        if not self.unlabeled_per_batch or self.unlabeled_images is None:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, step, 99])
        if self.unlabeled_p is not None:
            return rng.choice(len(self.unlabeled_images), self.unlabeled_per_batch, p=self.unlabeled_p)
        return rng.integers(0, len(self.unlabeled_images), self.unlabeled_per_batch)

    def size(self, batch: np.ndarray) -> int:
        return len(batch) + (self.unlabeled_per_batch if self.unlabeled_images is not None else 0)

    def prepare(self, step: int, batch: np.ndarray, start: int = 0, stop: int | None = None) -> PreparedBatch:
        """Positions ``start:stop`` of step ``step``'s batch (``batch``: training positions of its labelled part)."""
        extra = self.unlabeled_rows(step)
        stop = self.size(batch) if stop is None else stop
        matched = self.teacher_view == "matched"
        images: list[np.ndarray] = []
        grids: list[np.ndarray] = []
        teacher_images: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        occluded: list[bool] = []
        labels: list[int] = []
        for j in range(start, stop):
            if j < len(batch):
                row = int(self.rows[batch[j]])
                image, lm, table = self.images[row], self.landmarks[row], self.teacher_table
                labels.append(int(self.labels[batch[j]]))
            else:
                row = int(extra[j - len(batch)])
                assert self.unlabeled_images is not None and self.unlabeled_landmarks is not None
                image, lm, table = (
                    self.unlabeled_images[row],
                    self.unlabeled_landmarks[row],
                    self.unlabeled_teacher_table,
                )
            face = self.augmenter(image, lm, np.random.default_rng([self.seed, step, j]), teacher_view=matched)
            images.append(face.image)
            grids.append(visibility_grid(face.visible))
            occluded.append(face.occluder is not None)
            if matched:
                assert face.teacher_image is not None
                teacher_images.append(face.teacher_image)
            elif self.teacher_view == "clean" and table is not None:
                targets.append(table[row, int(face.flipped)])
        return PreparedBatch(
            images=np.stack(images),
            visibility=np.stack(grids).astype(np.float32),
            labels=np.array(labels, dtype=np.int64),
            occluded=np.array(occluded, dtype=bool),
            teacher_images=np.stack(teacher_images) if matched else None,
            teacher_targets=np.stack(targets).astype(np.float32) if targets else None,
        )


_SOURCE: BatchSource | None = None  # a forked worker's copy of the trainer's source


def _prepare_part(step: int, batch: np.ndarray, start: int, stop: int) -> PreparedBatch:
    assert _SOURCE is not None, "worker started without a batch source"
    return _SOURCE.prepare(step, batch, start, stop)


class Prefetcher:
    """Prepares batches ahead of the step in ``workers`` forked processes (in-process when 0).

    Each requested batch is split into one piece per worker, so all workers share every batch.
    On a CPU-only machine the workers compete with the step for cores; keep 0 there.
    """

    def __init__(self, source: BatchSource, workers: int = 0) -> None:
        global _SOURCE
        self.source = source
        self.workers = workers
        self._pool: Pool | None = None
        if workers > 0:
            _SOURCE = source  # inherited by the forked workers: the arrays are not copied up front
            self._pool = multiprocessing.get_context("fork").Pool(workers)
        self._pending: dict[int, list[AsyncResult[Any]]] = {}

    def request(self, step: int, batch: np.ndarray) -> None:
        """Start preparing step ``step``'s batch (no-op without workers or when already requested)."""
        if self._pool is None or step in self._pending:
            return
        bounds = np.linspace(0, self.source.size(batch), self.workers + 1).astype(int)
        self._pending[step] = [
            self._pool.apply_async(_prepare_part, (step, batch, int(a), int(b)))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if b > a
        ]

    def take(self, step: int, batch: np.ndarray) -> PreparedBatch:
        """Step ``step``'s batch: the prefetched one if requested, else prepared now."""
        parts = self._pending.pop(step, None)
        if parts is None:
            return self.source.prepare(step, batch)
        return PreparedBatch.merge([p.get() for p in parts])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._pending.clear()


class DeviceBatchSource:
    """Batches made on the training device (``augment_on = "device"``): the crops are copied there once,
    and each step's batch is gathered and augmented by :class:`DeviceAugmenter` with a generator seeded by
    (seed, step). The same rows as :class:`BatchSource`: the PK batch, then ``unlabeled_per_batch``
    unlabelled faces, then the mixed views."""

    def __init__(self, source: BatchSource, augmenter: DeviceAugmenter, device: torch.device) -> None:
        self.source, self.augmenter, self.device = source, augmenter, device
        self.images = torch.from_numpy(source.images).to(device)
        self.landmarks = torch.from_numpy(np.asarray(source.landmarks, dtype=np.float32)).to(device)
        self.unlabeled_images = self.unlabeled_landmarks = None
        if source.unlabeled_images is not None and source.unlabeled_landmarks is not None:
            self.unlabeled_images = torch.from_numpy(source.unlabeled_images).to(device)
            self.unlabeled_landmarks = torch.from_numpy(np.asarray(source.unlabeled_landmarks, dtype=np.float32)).to(
                device
            )
        self.rows = torch.from_numpy(np.asarray(source.rows, dtype=np.int64)).to(device)
        self.labels = torch.from_numpy(np.asarray(source.labels, dtype=np.int64)).to(device)
        if augmenter.config.mix > 0 and source.teacher_view != "matched":
            raise ValueError('mixed views need the teacher to label them: teacher_view = "matched"')

    def size(self, batch: np.ndarray) -> int:
        return self.source.size(batch)

    def prepare(self, step: int, batch: np.ndarray) -> DeviceBatch:
        src = self.source
        positions = torch.from_numpy(np.asarray(batch, dtype=np.int64)).to(self.device)
        rows = self.rows[positions]
        images, landmarks = self.images[rows], self.landmarks[rows]
        extra_rows = src.unlabeled_rows(step)
        extra = torch.from_numpy(extra_rows).to(self.device)
        if len(extra) and self.unlabeled_images is not None and self.unlabeled_landmarks is not None:
            images = torch.cat([images, self.unlabeled_images[extra]])
            landmarks = torch.cat([landmarks, self.unlabeled_landmarks[extra]])
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(np.random.default_rng([src.seed, step, 5]).integers(2**62)))
        matched = src.teacher_view == "matched"
        out = self.augmenter(images, landmarks, generator, teacher_view=matched)
        targets = None
        if src.teacher_view == "clean" and src.teacher_table is not None:
            table = [src.teacher_table[np.asarray(src.rows)[np.asarray(batch)]]]
            if len(extra) and src.unlabeled_teacher_table is not None:
                table.append(src.unlabeled_teacher_table[extra_rows])
            both = torch.from_numpy(np.concatenate(table)).to(self.device)  # [B, 2, 128]: crop, mirror
            targets = both[torch.arange(len(both), device=self.device), out.flipped[: len(both)].long()].float()
        rgb = out.student
        inputs = (rgb.flip(1) / 255.0 - 0.5) / 0.5  # RGB -> BGR, AdaFace's scale
        return DeviceBatch(
            inputs=inputs.contiguous(memory_format=torch.channels_last),
            visibility=F.adaptive_avg_pool2d(out.visible[:, None], 7)[:, 0],
            labels=self.labels[positions],
            occluded=out.occluded,
            teacher_views=out.teacher,
            teacher_targets=targets,
        )
