"""The shipped weights: they load as `make serve` loads them, carry their metadata, and recognise a face."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.checkpoint import load_checkpoint, read_metadata
from service.app import create_app
from service.config import DEFAULT_WEIGHTS, Settings
from tests.conftest import SHARED_DATA


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_shipped_weights_load_with_complete_metadata() -> None:
    meta = read_metadata(DEFAULT_WEIGHTS)
    model, loaded = load_checkpoint(DEFAULT_WEIGHTS)  # recomputes and checks the content hash
    assert loaded == meta and meta["model_version"] == f"{meta['architecture']}-{meta['content_sha256'][:12]}"
    assert model.arch == meta["architecture"]
    assert meta["input"]["channel_order"] == "BGR"
    assert meta["calibration"]["fitted"] is True
    assert set(meta["calibration"]["thresholds"]) == {"lenient", "balanced", "strict"}
    assert meta["training"]["data"] == ["celeba", "afdb"]
    assert meta["detector"]["name"] == "retinaface_mnet025"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = Settings(data_dir=tmp_path_factory.mktemp("shipped"), torch_threads=2)
    with TestClient(create_app(settings)) as c:
        yield c


def verify(client: TestClient, a: bytes, b: bytes, **data: str) -> dict:
    r = client.post("/verify", files={"image_a": ("a.jpg", a, "image/jpeg"), "image_b": ("b.jpg", b, "image/jpeg")}, data=data)
    assert r.status_code == 200, r.text
    return r.json()


def test_same_face_outscores_different_people(client: TestClient, astronaut: np.ndarray) -> None:
    """A rescaled, re-cropped, re-compressed copy of a photo against a different person.

    Checked at the lenient preset: the shipped CPU-trained model is not strong enough for the default
    (balanced, FAR 1e-3) one; the LFW test below asks for that on real people.
    """
    from skimage import data

    a = jpeg(cv2.resize(astronaut, (640, 480)))
    same_photo = jpeg(np.ascontiguousarray(astronaut[20:480, 40:500]), quality=70)
    other = jpeg(np.repeat(data.camera()[..., None], 3, axis=2))
    same = verify(client, a, same_photo)
    diff = verify(client, a, other)
    assert same["probability"] > 0.5 > diff["probability"]
    assert same["score"] > diff["score"] + 2.0
    assert diff["match"] is False
    assert verify(client, a, same_photo, threshold="lenient")["match"] is True
    assert same["face_a"]["visibility"] > 0.8 and same["face_b"]["visibility"] > 0.8


LFW = SHARED_DATA / "eval" / "lfw"


def lfw_photo(name: str, number: str) -> bytes:
    return (LFW / name / f"{name}_{int(number):04d}.jpg").read_bytes()


@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason="needs ../shared/data/eval/lfw (LFW photos and pairs.txt)")
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="known gap (shipped-weights issue): the CPU-trained model scores the first genuine pair below the "
    "balanced threshold (it matches at 'lenient'); strict, so a model that passes turns this into a failure "
    "until the marker is removed",
)
def test_lfw_people_at_the_default_threshold(client: TestClient) -> None:
    """The first genuine and the first impostor pair of the official pairs.txt, as photos, at the default
    (balanced) threshold: no hand-picked pairs."""
    lines = (LFW / "pairs.txt").read_text().splitlines()
    per_fold = int(lines[0].split()[1])
    same = lines[1].split("\t")
    other = lines[1 + per_fold].split("\t")
    assert len(same) == 3 and len(other) == 4
    genuine = verify(client, lfw_photo(same[0], same[1]), lfw_photo(same[0], same[2]))
    impostor = verify(client, lfw_photo(other[0], other[1]), lfw_photo(other[2], other[3]))
    assert genuine["threshold_preset"] == "balanced"
    assert genuine["match"] is True, genuine
    assert impostor["match"] is False, impostor
