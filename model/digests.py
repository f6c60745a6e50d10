"""SHA-256 of files and folders: what a recorded number was measured on, what a shipped file holds.

One place for the digests that travel with reports and files (the engine cache's sidecars, the GPU
bundle's parts, an evaluation's inputs), so that two reports name their inputs the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "tree_sha256"]


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of one file, read in 1 MiB blocks (weights and bundles run to hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root: Path, skip: frozenset[str] = frozenset()) -> str:
    """The hex SHA-256 of every regular file under ``root`` by relative path and content, symbolic links to files
    and folders followed (``../oaml_data`` is made of links into ``../shared``): equal when two folders hold the
    same files, whatever their timestamps or where they live. Files named in ``skip`` (at any depth) are left
    out, e.g. a manifest that records absolute source paths."""
    files = []
    for folder, _, names in os.walk(root, followlinks=True):
        files += [Path(folder) / n for n in names if n not in skip and (Path(folder) / n).is_file()]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()
