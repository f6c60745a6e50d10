"""Shared fixtures: deterministic seeds, explicit thread counts, one detector per session."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from model.align import FaceDetector, FacePipeline
from model.net import OAMLNet, build_model
from service.store import FaceRecord
from tests.pg import PostgresServer, running_postgres

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: Aligned caches made by `make prepare-data` (the Makefile's DATA folder).
PREPARED_DATA = Path(os.environ.get("OAML_PREPARED_DATA", Path(__file__).resolve().parents[2] / "oaml_data"))

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """512x512 RGB photo with one frontal face (scikit-image sample data)."""
    return skdata.astronaut()


@pytest.fixture(scope="session")
def detector() -> FaceDetector:
    return FaceDetector(threads=1)


@pytest.fixture(scope="session")
def pipeline(detector: FaceDetector) -> FacePipeline:
    return FacePipeline(detector)


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised IR-18 weights file: enough for everything but recognition quality."""
    from model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "random_ir18.safetensors"
    torch.manual_seed(0)
    save_checkpoint(build_model("ir_18").eval(), path)
    return path


@pytest.fixture(scope="session")
def ir18() -> OAMLNet:
    torch.manual_seed(1)
    return build_model("ir_18").eval()


@pytest.fixture(scope="session")
def photo(astronaut: np.ndarray) -> bytes:
    """The astronaut as a PNG upload."""
    return encode(astronaut)


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    """Encode a PIL image or an RGB array to bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow (make test-slow)")
    parser.addoption(
        "--run-docker", action="store_true", default=False, help="build and run the Docker image (make docker-test)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    opt_in = {
        "slow": (
            config.getoption("--run-slow") or os.environ.get("OAML_RUN_SLOW") == "1",
            "slow, opt-in: run with `make test-slow` (pytest --run-slow)",
        ),
        "docker": (
            config.getoption("--run-docker"),
            "builds the Docker image (minutes), opt-in: run with `make docker-test` (pytest --run-docker)",
        ),
    }
    for marker, (wanted, reason) in opt_in.items():
        if wanted:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


def fake_face(face_id: str, subject: str, seed: int, channels: int = 512, collection: str = "default") -> FaceRecord:
    """A stored face with seeded random arrays (stores and indexes need no model for these)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=512).astype(np.float32)
    return FaceRecord(
        face_id=face_id,
        subject=subject,
        embedding=emb / np.linalg.norm(emb),
        feature_map=rng.normal(size=(channels, 7, 7)).astype(np.float16),
        occlusion=rng.uniform(size=(7, 7)).astype(np.float32),
        norm=20.0,
        quality=0.5,
        detection_score=0.99,
        box=[1.0, 2.0, 30.0, 40.0],
        created_at=1000.0 + seed,
        crop=b"jpeg" if seed % 2 else None,
        collection=collection,
    )


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (tests/pg.py); its tests are skipped, with the reason, without one."""
    try:
        with running_postgres() as server:
            yield server
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture()
def pg_url(pg: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg.new_database()
