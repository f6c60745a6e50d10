"""Face image folders: listing raw photos by identity, and the aligned cache that training reads.

Two identity rules:

* one folder per identity (``root/<identity>/<image>``), the default;
* the file-name rule of the OAML seed data, where the identity is the first two dash-separated
  fields of the file name (``S1-P1-F-39-1.jpg`` -> ``S1-P1``), for flat folders.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "Face", "FaceFolder", "identity_from_filename", "AlignedRecord", "AlignedCache"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def identity_from_filename(name: str) -> str:
    """``S1-P1-F-39-1.jpg`` -> ``S1-P1``: the first two dash-separated fields of the stem."""
    stem = Path(name).stem
    parts = stem.split("-")
    if len(parts) < 3:
        raise ValueError(f"file name {name!r} does not follow the <set>-<person>-... identity rule")
    return "-".join(parts[:2])


class Face:
    """A *folder* of face photos: image paths and integer labels (one photo per sample, not one face).

    The name is the one the project started with; :data:`FaceFolder` is the same class under a
    name that says what it is.

    Args:
        root: the folder.
        filename_identity: use :func:`identity_from_filename` on a flat folder instead of one
            sub-folder per identity.

    Attributes:
        samples: ``(path, label)`` pairs, sorted by identity then path (deterministic labels).
        classes: identity names; ``classes[label]`` is the identity of a label.
    """

    def __init__(self, root: str | Path, filename_identity: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such folder: {self.root}")
        pairs: list[tuple[str, Path]] = []
        if filename_identity:
            for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                pairs.append((identity_from_filename(path.name), path))
        else:
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                    pairs.append((folder.name, path))
        self.classes: list[str] = sorted({identity for identity, _ in pairs})
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [(path, index[identity]) for identity, path in sorted(pairs)]

    @property
    def num_ids(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[tuple[Path, int]]:
        return iter(self.samples)


#: What :class:`Face` is: a labelled folder of face photos.
FaceFolder = Face


@dataclass(frozen=True)
class AlignedRecord:
    """One aligned crop in a cache made by ``oaml prepare``."""

    path: str  # relative to the cache root
    source: str
    identity: str
    landmarks: list[list[float]]  # in the source photo
    aligned_landmarks: list[list[float]]  # the same points in the 112x112 crop
    score: float


class EvaluationDataError(ValueError):
    """A training input holds evaluation data (``eval/``): training on it would make every benchmark a lie."""


def refuse_evaluation_data(root: str | Path, records: list[AlignedRecord]) -> None:
    """Raise :class:`EvaluationDataError` when the cache at ``root`` is, or was made from, evaluation data: a
    folder named ``eval`` on its resolved path (links followed) or on any of its crops' source paths."""
    resolved = Path(root).resolve()
    if "eval" in resolved.parts:
        raise EvaluationDataError(f"{root} is evaluation data ({resolved}): never train on eval/")
    for r in records:
        if "eval" in Path(r.source).parts:
            raise EvaluationDataError(
                f"{root} was made from evaluation data ({r.source}, and maybe more): never train on eval/"
            )


class AlignedCache:
    """Reads a cache written by ``oaml prepare``: ``manifest.jsonl`` plus one crop per record."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.jsonl"
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest} not found: run `oaml prepare` first")
        with manifest.open() as f:
            self.records = [AlignedRecord(**json.loads(line)) for line in f if line.strip()]
        self.classes = sorted({r.identity for r in self.records})
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([index[r.identity] for r in self.records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def without(self, identities: set[str]) -> AlignedCache:
        """The cache less the crops of ``identities`` (names as in the cache), relabelled."""
        kept = copy.copy(self)
        kept.records = [r for r in self.records if r.identity not in identities]
        kept.classes = sorted({r.identity for r in kept.records})
        index = {name: i for i, name in enumerate(kept.classes)}
        kept.labels = np.array([index[r.identity] for r in kept.records], dtype=np.int64)
        return kept

    def load_images(self) -> np.ndarray:
        """All crops as one ``uint8`` array ``[N, 112, 112, 3]`` (RGB); ~37 KB per face. Decoded by a thread per
        core (the decoders release the GIL): a GPU host's 16 cores load a 30,000-crop bundle in seconds."""
        from concurrent.futures import ThreadPoolExecutor

        from model.align import load_image

        paths = [self.root / r.path for r in self.records]
        workers = min(16, os.cpu_count() or 1)
        if workers == 1 or len(paths) < 256:
            return np.stack([load_image(p) for p in paths])
        with ThreadPoolExecutor(workers) as pool:
            return np.stack(list(pool.map(load_image, paths, chunksize=64)))
