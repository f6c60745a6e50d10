"""The inference engine: one worker thread owns the model and batches faces across requests.

Request handlers never touch torch. They decode and detect photos in a bounded thread pool
(onnxruntime and Pillow release the GIL), then ``await engine.embed(crops)``: the crops join a
queue, and the worker thread takes the first waiting face, keeps collecting until ``max_batch``
faces or ``max_wait_ms`` after that first face, runs one forward pass and resolves each request's
future on the event loop. A full queue answers 503 (``OVERLOADED``) instead of growing without
bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.align import AlignedFace, FaceDetector, FacePipeline, FaceSelection, decode_image
from model.calibration import DEFAULT_CALIBRATION, Calibration
from model.checkpoint import load_checkpoint
from model.embedder import Embedder, Features, score_pairs
from model.errors import OAMLError
from model.net import OAMLNet
from service.config import Settings

__all__ = ["FaceFeatures", "Overloaded", "Engine", "BatchStats"]

logger = logging.getLogger(__name__)


class Overloaded(OAMLError):
    """The inference queue is full."""

    code = "OVERLOADED"


@dataclass
class FaceFeatures:
    """What the model says about one aligned face (CPU tensors)."""

    embedding: torch.Tensor  # [512] float32, L2-normalised
    norm: float
    occlusion: torch.Tensor  # [7, 7] float32, 1 = visible
    feature_map: torch.Tensor  # [C, 7, 7] float32

    @property
    def visibility(self) -> float:
        return float(self.occlusion.mean())

    def batch(self) -> Features:
        """This face as a one-face :class:`Features` batch."""
        return Features(self.embedding[None], torch.tensor([self.norm]), self.occlusion[None], self.feature_map[None])


@dataclass
class _Job:
    crops: np.ndarray  # [n, 112, 112, 3]
    future: asyncio.Future[list[FaceFeatures]]
    loop: asyncio.AbstractEventLoop
    enqueued: float


class BatchStats:
    """Counters the worker updates and /metrics reads (plain ints: one writer thread)."""

    def __init__(self) -> None:
        self.batches = 0
        self.faces = 0
        self.max_batch = 0
        self.batch_sizes: list[int] = []  # recent, bounded
        self.hooks: list[Callable[[int, float], None]] = []

    def record(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.faces += size
        self.max_batch = max(self.max_batch, size)
        self.batch_sizes = (self.batch_sizes + [size])[-1000:]
        for hook in self.hooks:
            hook(size, seconds)


class Engine:
    """Model, detector, calibration and the batching worker.

    Args:
        settings: service settings.
        model / metadata: inject an already loaded model (tests); default loads ``settings.weights``.
    """

    def __init__(self, settings: Settings, model: OAMLNet | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        if model is None:
            model, metadata = load_checkpoint(settings.weights)
        # the same embedding path as `oaml calibrate` and `oaml eval`: the thresholds hold for it
        self.embedder = Embedder(model, device=settings.device, precision=settings.precision, batch_size=settings.max_batch)
        self.model = self.embedder.model.eval()
        self.device = self.embedder.device
        self.autocast = self.embedder.autocast
        self.metadata = metadata or {}
        self.model_version: str = self.metadata.get("model_version", "unversioned")
        cal = self.metadata.get("calibration")
        self.calibration = Calibration.from_dict(cal) if cal else DEFAULT_CALIBRATION
        quality = self.metadata.get("quality") or {}
        self.norm_mean = float(quality.get("norm_mean") or 20.0)
        self.norm_std = float(quality.get("norm_std") or 10.0)
        self.pipeline = FacePipeline(FaceDetector(threads=settings.detector_threads))
        self.cpu_pool = ThreadPoolExecutor(max_workers=settings.detection_workers, thread_name_prefix="oaml-detect")
        self.gallery_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="oaml-inference", daemon=True)
        self._stopped = threading.Event()
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def warm_up(self) -> None:
        """One detection and one forward pass so the first request does not pay for lazy init."""
        blank = np.zeros((self.settings.max_batch, 112, 112, 3), dtype=np.uint8)
        self._forward(blank[:1])
        self._forward(blank)
        self.pipeline.detector.detect(np.zeros((320, 320, 3), dtype=np.uint8))
        self.ready = True

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        self._worker.join(timeout=10)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return self._pending

    # -- CPU stages (thread pool) ------------------------------------------------------------

    async def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, max_pixels=self.settings.max_image_pixels)

    def detect_one(self, data: bytes, select: FaceSelection) -> AlignedFace:
        return self.pipeline.align_one(self.decode(data), select)

    def aligned_crop(self, data: bytes) -> np.ndarray:
        """An already aligned face: resized to 112x112 if needed (no detection)."""
        import cv2

        image = self.decode(data)
        if image.shape[:2] != (112, 112):
            image = cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA if image.shape[0] > 112 else cv2.INTER_LINEAR)
        return image

    # -- model stage (worker thread) ---------------------------------------------------------

    async def embed(self, crops: np.ndarray) -> list[FaceFeatures]:
        """Features of ``[n, 112, 112, 3]`` RGB crops, batched with other requests' faces."""
        n = len(crops)
        with self._pending_lock:
            if self._pending + n > self.settings.queue_size:
                raise Overloaded(f"inference queue is full ({self._pending} faces waiting); retry later")
            self._pending += n
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[FaceFeatures]] = loop.create_future()
        self._queue.put(_Job(crops, future, loop, time.perf_counter()))
        return await future

    def _run(self) -> None:
        carry: _Job | None = None
        while not self._stopped.is_set():
            first = carry or self._queue.get()
            carry = None
            if first is None:
                break
            jobs, size = [first], len(first.crops)
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while size < self.settings.max_batch:
                timeout = deadline - time.perf_counter()
                try:
                    job = self._queue.get(timeout=max(timeout, 0)) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._stopped.set()
                    break
                if size + len(job.crops) > self.settings.max_batch and size > 0:
                    carry = job  # starts the next batch
                    break
                jobs.append(job)
                size += len(job.crops)
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            self._execute(jobs)

    def _execute(self, jobs: list[_Job]) -> None:
        crops = np.concatenate([j.crops for j in jobs])
        started = time.perf_counter()
        try:
            feats = []
            for start in range(0, len(crops), self.settings.max_batch):  # one request may bring many faces
                feats += self._forward(crops[start : start + self.settings.max_batch])
            error: BaseException | None = None
        except BaseException as exc:  # delivered to every waiting request; the worker keeps running
            logger.exception("inference failed for a batch of %d faces", len(crops))
            feats, error = [], exc
        self.stats.record(len(crops), time.perf_counter() - started)
        offset = 0
        for job in jobs:
            part = feats[offset : offset + len(job.crops)]
            offset += len(job.crops)
            with self._pending_lock:
                self._pending -= len(job.crops)
            job.loop.call_soon_threadsafe(_resolve, job.future, part, error)

    def _forward(self, crops: np.ndarray) -> list[FaceFeatures]:
        f = self.embedder.forward(crops)
        return [FaceFeatures(f.embedding[i], float(f.norm[i]), f.occlusion[i], f.feature_map[i]) for i in range(len(crops))]

    # -- scoring -----------------------------------------------------------------------------

    def quality(self, norm: float) -> float:
        """Standardised AdaFace norm: how far above or below a typical training face."""
        return (norm - self.norm_mean) / max(self.norm_std, 1e-6)

    def score(self, a: Features, b: Features, ia: np.ndarray | None = None, ib: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Component scores, fused score and probability of pairs ``(a[ia[k]], b[ib[k]])``: the calibrated path."""
        s = score_pairs(self.model.qaconv, a, b, ia, ib)
        fused = self.calibration.score(s.cos, s.qa, s.visibility)
        return {"adaface": s.cos, "qaconv": s.qa, "visibility": s.visibility, "fused": fused, "probability": self.calibration.probability(fused)}

    def pair_scores(self, a: FaceFeatures, b: FaceFeatures) -> dict[str, float]:
        """:meth:`score` of one pair, as plain floats."""
        return {k: float(v[0]) for k, v in self.score(a.batch(), b.batch()).items()}

    def preset_lfw(self, name: str) -> dict[str, float | None]:
        """TAR and FAR of a preset on LFW clean pairs as `oaml eval --record` stored them (None if absent)."""
        metrics = (self.metadata.get("metrics") or {}).get("lfw") or {}
        row = ((metrics.get("protocols") or {}).get("clean") or {}).get("presets", {}).get(name) or {}
        return {"lfw_tar": row.get("tar"), "lfw_far": row.get("far")}

    def resolve_threshold(self, value: str | float | None) -> tuple[float, str | None]:
        """(fused-score threshold, preset name or None) for a preset name or a finite number."""
        value = self.settings.default_threshold if value is None or value == "" else value
        if isinstance(value, str) and value in self.calibration.thresholds:
            return float(self.calibration.thresholds[value]), value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"threshold must be a finite number or one of {sorted(self.calibration.thresholds)}, got {value!r}")
        return number, None


def _resolve(future: asyncio.Future[list[FaceFeatures]], result: list[FaceFeatures], error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
