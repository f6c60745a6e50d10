"""The inference engine: one worker thread owns the model and every other piece of device work.

What runs where:

- The event loop parses requests and awaits; it never runs model code or tensor ops.
- ``cpu_pool`` threads decode photos, prepare them for the detector, decode its output and align
  faces (OpenCV, Pillow and onnxruntime release the GIL) and render heatmaps. On a CPU-only host
  they also run the detector network (onnxruntime, faster there). The gallery's store has threads
  of its own (:mod:`service.gallery`), so a slow database never takes these.
- The worker thread runs everything that touches the model's device: embedding batches, the
  detector network when it runs in torch on the model's device (``OAML_DETECTOR_BACKEND``; the
  default on a GPU), pair scoring (QAConv), and gallery-index search, insertion and removal
  (:meth:`Engine.run_device`, :meth:`Engine.call_device`). One owner means no two threads race
  for the device or its threads, and a GPU sees one ordered stream of work.

Batching: ``await engine.embed(crops)`` queues the crops (``await engine.detect_one(photo)`` its
prepared photo); the worker takes the first waiting job, keeps collecting until ``max_batch``
faces (or photos) or ``max_wait_ms`` after that first job, runs one forward pass per kind
(detector, then embedder) and resolves each request's future. Device calls (scoring, index updates:
milliseconds each) run in arrival order as soon as the worker is free; one that arrives while a
batch is collecting runs at once without ending the collection. A full queue answers 503
(``OVERLOADED``) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.align import (
    AlignedFace,
    DetectedFace,
    DetectorInput,
    DetectorOutput,
    FaceDetector,
    FacePipeline,
    FaceSelection,
    decode_image,
    decoding_cost,
    read_header,
)
from model.card import WeightsCard
from model.embedder import Features
from model.net import OAMLNet
from model.qaconv import PairExplanation
from service.config import Settings
from service.errors import Overloaded, Stopping
from service.index import matching_dtype
from service.memory import TRIM_AFTER_BYTES, ByteBudget, release_free_memory
from service.models import ModelShelf, ServedModel

__all__ = ["FaceFeatures", "Engine", "BatchStats"]

logger = logging.getLogger(__name__)


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
    """Faces to embed with one model version; each holds a place in the queue until its batch has run."""

    crops: np.ndarray  # [n, 112, 112, 3]
    future: Future[list[FaceFeatures]]
    version: str = ""

    @property
    def size(self) -> int:
        return len(self.crops)

    @property
    def places(self) -> int:
        """Places in the queue this job releases when it is done."""
        return self.size


@dataclass
class _DetectJob:
    """Photos (prepared for the detector) whose network pass runs on the model's device."""

    inputs: list[DetectorInput]
    future: Future[list[DetectorOutput]]

    @property
    def size(self) -> int:
        return len(self.inputs)

    @property
    def places(self) -> int:
        return 0  # the photo's place is held by detect_one, from admission to its aligned face


@dataclass
class _Call:
    """Any other device work, run by the worker in arrival order."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: Future[Any]


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
    """Model, detector, calibration and the worker thread that owns the device.

    Args:
        settings: service settings.
        model / metadata: inject an already loaded model (tests); default loads ``settings.weights``.
    """

    def __init__(
        self, settings: Settings, model: OAMLNet | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        assert settings.torch_threads is not None and settings.detection_workers is not None  # sized by Settings
        torch.set_num_threads(settings.torch_threads)
        default = None
        if model is not None:  # injected (tests): served as the default model
            card = WeightsCard.from_metadata(metadata or {"model_version": "unversioned", "architecture": model.arch})
            default = ServedModel.build(model, card, settings)
        #: every model version served: the default weights and those collections still use (service.models)
        self.models = ModelShelf(settings, default)
        served = self.models.default
        # the default model's parts, under the names the routes used before there could be several
        self.embedder, self.served_path, self.card = served.embedder, served.served_path, served.card
        self.model = served.model
        self.device = served.device
        self.autocast = self.embedder.autocast
        self.model_version = served.version
        self.calibration = served.calibration
        backend = settings.detector_backend
        if backend == "auto":
            backend = "torch" if self.device.type == "cuda" else "onnxruntime"
        self.detector = FaceDetector(
            threads=settings.detector_threads,
            backend=backend,
            device=self.device,
            coarse_side=settings.detector_coarse_side or None,
            refine=settings.detector_refine,
        )
        self.pipeline = FacePipeline(self.detector)
        self.cpu_pool = ThreadPoolExecutor(max_workers=settings.detection_workers, thread_name_prefix="oaml-detect")
        self.gallery_dtype = matching_dtype(self.device, settings.map_storage)
        self.stats = BatchStats()
        self.detect_stats = BatchStats()
        self._queue: queue.Queue[_Job | _DetectJob | _Call | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.decode_budget = ByteBudget(settings.decode_budget_mb * 2**20)
        self._worker = threading.Thread(target=self._run, name="oaml-inference", daemon=True)
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def warm_up(self, version: str | None = None) -> None:
        """One detection and two forward passes so the first request does not pay for lazy init (``version``:
        a model loaded later, its forward passes only)."""
        blank = np.zeros((self.settings.max_batch, 112, 112, 3), dtype=np.uint8)
        model = self.models.get(version or self.model_version)
        self.call_device(self._forward, model, blank[:1])
        self.call_device(self._forward, model, blank)
        if version is not None:
            return
        blank_photo = self.detector.prepare(np.zeros((480, 640, 3), dtype=np.uint8))
        self.call_device(self.detector.forward, [blank_photo.blob])  # lazy init, wherever the detector runs
        self.ready = True

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self._fail_pending()

    def _fail_pending(self) -> None:
        """Answer whatever is still queued after the worker stopped: nobody will run it."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(Stopping("the service is shutting down"))

    @property
    def queue_depth(self) -> int:
        return self._pending

    # -- CPU stages (thread pool) ------------------------------------------------------------

    async def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    def decode(self, data: bytes) -> np.ndarray:
        """The photo as detection and alignment need it: at most ``OAML_DECODE_MAX_SIDE`` on its longer side."""
        return decode_image(data, self.settings.max_image_pixels, self.settings.decode_max_side or None)

    @property
    def batched_detection(self) -> bool:
        """Whether the detector network runs batched on the worker thread (torch) rather than in cpu_pool."""
        return self.detector.backend == "torch"

    @contextmanager
    def _admitted_photo(self, data: bytes) -> Iterator[int]:
        """Admit a photo before it is decoded: a place in the queue (503 when full) and its decoded cost in the
        decoding budget (503 when photos in flight would pass ``OAML_DECODE_BUDGET_MB``), both held until its
        face is aligned, whichever backend detects it. Yields the cost. A photo that cost much has its freed
        memory handed back to the system when it is done, so one large upload does not leave the process at
        its peak."""
        header = read_header(data, self.settings.max_image_pixels)  # refusals before any pixel is decoded
        cost = decoding_cost(header, self.settings.decode_max_side or None)
        self._admit(1)
        try:
            self.decode_budget.take(cost)
        except BaseException:
            self._release(1)
            raise
        try:
            yield cost
        finally:
            self.decode_budget.give(cost)
            self._release(1)
            if cost >= TRIM_AFTER_BYTES:
                release_free_memory()

    async def detect_one(self, data: bytes, select: FaceSelection) -> AlignedFace:
        """Decode a photo, find its faces and align the one ``select`` picks (see :class:`FacePipeline`),
        admitted by :meth:`_admitted_photo`: a full queue or budget answers 503 at once instead of piling
        photos up behind the detection workers."""
        with self._admitted_photo(data):
            if not self.batched_detection:
                return await self.run_cpu(self._align_one, data, select)
            image = await self.run_cpu(self.decode, data)
            faces = await self._detect(image, coarse=select == "largest")
            face = await self._refine(image, self.pipeline.select(faces, select))
            return await self.run_cpu(self.pipeline.align, image, face)

    def _align_one(self, data: bytes, select: FaceSelection) -> AlignedFace:
        return self.pipeline.align_one(self.decode(data), select)

    async def detect_all(self, data: bytes, limit: int) -> tuple[list[AlignedFace], int]:
        """The ``limit`` largest faces of a photo (a group photo), aligned, largest first, and how many were
        found. Only those are refined and aligned, and each takes a place in the queue (the photo's own, then
        one more per face beyond the first: 503 when the queue cannot hold them)."""
        with self._admitted_photo(data):
            image = await self.run_cpu(self.decode, data)
            found = (
                await self._detect(image) if self.batched_detection else await self.run_cpu(self.detector.detect, image)
            )
            chosen = found[:limit]
            extra = max(0, len(chosen) - 1)
            self._admit(extra)
            try:
                if self.batched_detection:
                    faces = await asyncio.gather(*(self._refine(image, f) for f in chosen))
                    return [await self.run_cpu(self.pipeline.align, image, f) for f in faces], len(found)
                return await self.run_cpu(self.pipeline.align_all, image, chosen), len(found)
            finally:
                self._release(extra)

    async def _detect(self, image: np.ndarray, coarse: bool = False) -> list[DetectedFace]:
        """:meth:`FaceDetector.detect` with the network passes batched on the worker thread."""
        first = await self.run_cpu(self.detector.coarse_input, image) if coarse else None
        if first is not None:
            found = await self._detect_input(first)
            if self.detector.coarse_answers(first, found):
                largest = await self._refine(image, found[0])
                if largest.refined:
                    return [largest, *found[1:]]
        faces = await self._detect_input(await self.run_cpu(self.detector.prepare, image, False))
        if not faces and self.detector.retry_padded(image):
            faces = await self._detect_input(await self.run_cpu(self.detector.prepare, image, True))
        return faces

    async def _refine(self, image: np.ndarray, face: DetectedFace) -> DetectedFace:
        """:meth:`FaceDetector.refine` with its network pass batched on the worker thread."""
        if face.refined or not self.detector.refining:
            return face
        inp = await self.run_cpu(self.detector.refine_input, image, face)
        return self.detector.refined(face, await self._detect_input(inp))

    async def _detect_input(self, inp: DetectorInput) -> list[DetectedFace]:
        future: Future[list[DetectorOutput]] = Future()
        self._queue.put(_DetectJob([inp], future))
        (out,) = await asyncio.wrap_future(future)
        return await self.run_cpu(self.detector.decode, inp, out)

    async def aligned_one(self, data: bytes) -> np.ndarray:
        """:meth:`aligned_crop` in the CPU pool, admitted as a photo to detect is (:meth:`_admitted_photo`)."""
        with self._admitted_photo(data):
            crop: np.ndarray = await self.run_cpu(self.aligned_crop, data)
            return crop

    def aligned_crop(self, data: bytes) -> np.ndarray:
        """An already aligned face: resized to 112x112 if needed (no detection)."""
        import cv2

        image = self.decode(data)
        if image.shape[:2] != (112, 112):
            image = cv2.resize(
                image, (112, 112), interpolation=cv2.INTER_AREA if image.shape[0] > 112 else cv2.INTER_LINEAR
            )
        return image

    # -- device stage (worker thread) --------------------------------------------------------

    async def embed(self, crops: np.ndarray, version: str | None = None) -> list[FaceFeatures]:
        """Features of ``[n, 112, 112, 3]`` RGB crops by model ``version`` (default: the default weights),
        batched with other requests' faces of the same version."""
        version = version or self.model_version
        self.models.get(version)  # ModelNotAvailable now, not in the worker
        self._admit(len(crops))
        future: Future[list[FaceFeatures]] = Future()
        self._queue.put(_Job(crops, future, version))
        return await asyncio.wrap_future(future)

    def model_for(self, version: str | None) -> ServedModel:
        """The served model of ``version`` (None: the default)."""
        return self.models.get(version or self.model_version)

    def _admit(self, n: int) -> None:
        """Take ``n`` places in the queue, or refuse with 503 when it is full (released as jobs finish)."""
        with self._pending_lock:
            if self._pending + n > self.settings.queue_size:
                raise Overloaded(f"inference queue is full ({self._pending} faces waiting); retry later")
            self._pending += n

    async def run_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread (device work) and await its result."""
        future: Future[Any] = Future()
        self._queue.put(_Call(fn, args, future))
        return await asyncio.wrap_future(future)

    def call_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking :meth:`run_device` for threads that are not the event loop (start-up, store commits)."""
        if threading.current_thread() is self._worker:
            return fn(*args)
        future: Future[Any] = Future()
        self._queue.put(_Call(fn, args, future))
        while True:  # never wait on a worker that has stopped (shutdown): its queue is not read any more
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if not self._worker.is_alive():
                    self._fail_pending()
                    if not future.done():
                        raise Stopping("the service is shutting down") from None

    def _run(self) -> None:
        carry: _Job | _DetectJob | _Call | None = None
        stopping = False
        while not stopping:
            first = carry or self._queue.get()
            carry = None
            if first is None:
                break
            if isinstance(first, _Call):
                _settle(first.future, first.fn, *first.args)
                continue
            batches: dict[type, list[Any]] = {_DetectJob: [], _Job: []}  # one open batch per kind
            item: _Job | _DetectJob | _Call | None = first
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while True:
                if isinstance(item, _Call):
                    # short device work (scoring, index updates) runs at once, while the batch is still
                    # collecting: it neither cuts the batch short nor waits for its forward pass
                    _settle(item.future, item.fn, *item.args)
                elif item is not None:
                    batch = batches[type(item)]
                    size = sum(job.size for job in batch)
                    other_model = isinstance(item, _Job) and batch and batch[0].version != item.version
                    if batch and (size + item.size > self.settings.max_batch or other_model):
                        carry = item  # starts the next batch (one model version a batch)
                        break
                    batch.append(item)
                    if size + item.size >= self.settings.max_batch:
                        break
                timeout = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
            if batches[_DetectJob]:
                self._execute(batches[_DetectJob], self._detect_batch, self.detect_stats, "detection")
            if batches[_Job]:
                self._execute(batches[_Job], self._embed_batch, self.stats, "inference")

    def _live(self, jobs: list[Any]) -> list[Any]:
        """The jobs whose requests still wait; the others' places in the queue are released."""
        live = []
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                live.append(job)
            else:  # its request went away
                self._release(job.places)
        return live

    def _execute(self, jobs: list[Any], run: Callable[[list[Any]], list[Any]], stats: BatchStats, what: str) -> None:
        """One batch of ``jobs`` (all of one kind): ``run`` them, hand each job its slice of the results."""
        live = self._live(jobs)
        if not live:
            return
        size = sum(job.size for job in live)
        started = time.perf_counter()
        try:
            results = run(live)
            error: BaseException | None = None
        except BaseException as exc:  # delivered to every waiting request; the worker keeps running
            logger.exception("%s failed for a batch of %d", what, size)
            results, error = [], exc
        stats.record(size, time.perf_counter() - started)
        offset = 0
        for job in live:
            self._release(job.places)
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(results[offset : offset + job.size])
            offset += job.size

    def _embed_batch(self, jobs: list[_Job]) -> list[FaceFeatures]:
        crops = np.concatenate([j.crops for j in jobs])
        model = self.models.get(jobs[0].version)
        feats = []
        for start in range(0, len(crops), self.settings.max_batch):  # one request may bring many faces
            feats += self._forward(model, crops[start : start + self.settings.max_batch])
        return feats

    def _detect_batch(self, jobs: list[_DetectJob]) -> list[DetectorOutput]:
        return self.detector.forward([inp.blob for job in jobs for inp in job.inputs])

    def _release(self, faces: int) -> None:
        with self._pending_lock:
            self._pending -= faces

    @staticmethod
    def _forward(model: ServedModel, crops: np.ndarray) -> list[FaceFeatures]:
        f = model.forward(crops)
        return [
            FaceFeatures(f.embedding[i], float(f.norm[i]), f.occlusion[i], f.feature_map[i]) for i in range(len(crops))
        ]

    # -- scoring (device work: call through run_device / call_device) ------------------------
    # The default model's (``/verify``, ``/explain``, ``/occlusion``); a collection's own through
    # :meth:`model_for`.

    def quality(self, norm: float) -> float:
        """Standardised AdaFace norm of the default weights: how far above or below a typical training face."""
        return self.models.default.quality(norm)

    def score(
        self, a: Features, b: Features, ia: np.ndarray | None = None, ib: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Component scores, fused score and probability of pairs ``(a[ia[k]], b[ib[k]])``: the calibrated path."""
        return self.models.default.score(a, b, ia, ib)

    def pair_scores(self, a: FaceFeatures, b: FaceFeatures, version: str | None = None) -> dict[str, float]:
        """:meth:`score` of one pair by model ``version`` (default: the default weights), as plain floats."""
        return {k: float(v[0]) for k, v in self.model_for(version).score(a.batch(), b.batch()).items()}

    def explain_pair(self, a: FaceFeatures, b: FaceFeatures) -> PairExplanation:
        """QAConv's score of one pair, location by location (device work: call through run_device)."""
        return self.models.default.explain(a.batch(), b.batch())

    def resolve_identify_threshold(self, value: str | float | None, faces: int) -> tuple[float, str | None, float]:
        """:meth:`service.models.ServedModel.resolve_identify_threshold` of the default weights."""
        return self.models.default.resolve_identify_threshold(value, faces)

    def resolve_threshold(self, value: str | float | None) -> tuple[float, str | None]:
        """:meth:`service.models.ServedModel.resolve_threshold` of the default weights."""
        return self.models.default.resolve_threshold(value)


def _settle(future: Future[Any], fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` for a waiting caller; its exception goes to the caller, never kills the worker."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except BaseException as exc:
        future.set_exception(exc)
