"""Occlusion heatmaps: an enrolled face's visibility map (as its collection's model saw it), or an uploaded one's."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from model.align import FaceSelection
from service.errors import FaceNotFound
from service.render import heatmap_png
from service.state import AppState
from service.store import DEFAULT_COLLECTION
from service.usecases.common import Heatmap, Photo, find_face

__all__ = ["heatmap_of_face", "heatmap_of_photo"]


async def heatmap_of_face(state: AppState, face_id: str, scale: int, collection: str = DEFAULT_COLLECTION) -> Heatmap:
    """An enrolled face's visibility map at its collection's model version (over its crop when crops are stored,
    else over grey); a face of another collection is not found (a key limited to one collection sees no other's
    faces)."""
    gallery = state.gallery
    held = await gallery.find(collection)
    record = await gallery.read(gallery.store.face, face_id, held.version or gallery.default_version)
    if record.collection != collection:
        raise FaceNotFound(f"face {face_id!r} is not enrolled in collection {collection!r}")
    crop = np.asarray(Image.open(io.BytesIO(record.crop), formats=["JPEG"]).convert("RGB")) if record.crop else None
    png = await state.engine.run_cpu(heatmap_png, crop, record.occlusion, scale)
    return Heatmap(png, float(record.occlusion.mean()))


async def heatmap_of_photo(state: AppState, photo: Photo, select: FaceSelection, aligned: bool, scale: int) -> Heatmap:
    """An uploaded face's visibility map, by the default weights' occlusion head."""
    face = await find_face(state, photo, select, aligned)
    (feats,) = await state.engine.embed(face.crop[None])
    png = await state.engine.run_cpu(heatmap_png, face.crop, feats.occlusion.numpy(), scale)
    return Heatmap(png, feats.visibility)
