"""The shipped weights: they load as `make serve` loads them, carry their metadata, and say true numbers.

The last two tests are slow and opt-in (`make test-slow`): they check, on real faces, that what
`/info` and the model card claim is what the served path delivers.
"""

from __future__ import annotations

import asyncio
import io
import math

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.calibration import PRESETS
from model.checkpoint import load_checkpoint, read_metadata
from model.embedder import FLIP_TEST, Features
from model.openset import IDENTIFY_PRESETS
from service.app import create_app
from service.config import DEFAULT_WEIGHTS, Settings
from service.engine import Engine
from tests.conftest import PREPARED_DATA, SHARED_DATA


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
    assert meta["training"]["data"] == ["celeba", "afdb"]
    assert meta["detector"]["name"] == "retinaface_mnet025"
    cal = meta["calibration"]
    assert cal["fitted"] is True and set(cal["thresholds"]) == set(PRESETS)
    # fitted on the path the service runs, with its probability measured
    assert cal["embedding"]["flip"] is FLIP_TEST and cal["prior"] == 0.5
    assert 0 <= cal["reliability"]["ece_cross_validated"] < 0.05
    assert not set(cal["holdout"]) & set(meta["training"]["data"])
    # the card's LFW numbers travel with the weights, preset by preset
    clean = meta["metrics"]["lfw"]["protocols"]["clean"]
    assert set(clean["presets"]) == set(PRESETS) and clean["fused"]["accuracy"] > 0.85
    # /identify's FPIR presets rest on a fitted stranger model, checked on strangers it was not fitted on
    open_set = cal["open_set"]
    assert open_set["source"] == "fitted" and open_set["validation"]["probes_checked"] >= 1000
    for row in open_set["validation"]["fpir"]:
        if row["fpir_target"] * row["strangers"] >= 10:
            sigma = math.sqrt(row["fpir_target"] * (1 - row["fpir_target"]) / row["strangers"])
            assert abs(row["fpir_measured"] - row["fpir_target"]) <= 4 * sigma, row
    assert set(meta["metrics"]["open_set"]["sizes"][0]["clean"]["presets"]) == set(IDENTIFY_PRESETS)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = Settings(data_dir=tmp_path_factory.mktemp("shipped"), torch_threads=2)
    with TestClient(create_app(settings)) as c:
        yield c


def verify(client: TestClient, a: bytes, b: bytes, **data: str) -> dict:
    r = client.post(
        "/verify", files={"image_a": ("a.jpg", a, "image/jpeg"), "image_b": ("b.jpg", b, "image/jpeg")}, data=data
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_same_face_outscores_different_people(client: TestClient, astronaut: np.ndarray) -> None:
    """A rescaled, re-cropped, re-compressed copy of a photo against a different person, at the default preset."""
    from skimage import data

    a = jpeg(cv2.resize(astronaut, (640, 480)))
    same_photo = jpeg(np.ascontiguousarray(astronaut[20:480, 40:500]), quality=70)
    other = jpeg(np.repeat(data.camera()[..., None], 3, axis=2))
    same = verify(client, a, same_photo)
    diff = verify(client, a, other)
    assert same["threshold_preset"] == "balanced"
    assert same["match"] is True and diff["match"] is False
    assert same["probability"] > 0.5 > diff["probability"]
    assert same["score"] > diff["score"] + 2.0
    assert same["face_a"]["visibility"] > 0.8 and same["face_b"]["visibility"] > 0.8


LFW = SHARED_DATA / "eval" / "lfw"


def lfw_photo(name: str, number: str) -> bytes:
    return (LFW / name / f"{name}_{int(number):04d}.jpg").read_bytes()


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(
    not (LFW / "pairs.txt").is_file(), reason="needs ../shared/data/eval/lfw (LFW photos and pairs.txt)"
)
def test_lfw_first_200_pairs_at_the_default_preset_meet_the_published_rates(client: TestClient) -> None:
    """The first 100 genuine and the first 100 impostor pairs of pairs.txt, as photos, through `POST /verify`
    at the default threshold. TAR and FAR must agree with what `/info` publishes for that preset (measured by
    `oaml eval` on all 6,000 LFW pairs and stated in the model card) within the sampling error of 100 pairs."""
    lines = (LFW / "pairs.txt").read_text().splitlines()
    per_fold = int(lines[0].split()[1])
    genuine = [line.split("\t") for line in lines[1 : 1 + 100]]
    impostor = [line.split("\t") for line in lines[1 + per_fold : 1 + per_fold + 100]]
    assert all(len(g) == 3 for g in genuine) and all(len(i) == 4 for i in impostor)
    accepted_genuine = sum(verify(client, lfw_photo(n, a), lfw_photo(n, b))["match"] for n, a, b in genuine)
    answers = [verify(client, lfw_photo(n1, a), lfw_photo(n2, b)) for n1, a, n2, b in impostor]
    accepted_impostor = sum(r["match"] for r in answers)
    info = client.get("/info").json()
    preset = info["default_threshold"]
    assert answers[0]["threshold_preset"] == preset
    claim = info["presets"][preset]
    tar, far = claim["lfw_tar"], claim["lfw_far"]
    # TAR: inside a 3-sigma binomial band around the published rate
    assert abs(accepted_genuine / 100 - tar) <= 3 * math.sqrt(tar * (1 - tar) / 100) + 0.01, (accepted_genuine, tar)
    # FAR: no more false accepts than the published rate makes plausible (one-sided, p >= 0.001)
    rate = max(far, claim["far"])
    assert binomial_tail(accepted_impostor, 100, rate) >= 1e-3 or accepted_impostor == 0, (accepted_impostor, rate)


def served_features(engine: Engine, crops: np.ndarray, chunk: int = 64) -> Features:
    """Features through the service's own batching worker (the path `/verify` uses)."""

    async def run() -> Features:
        parts = []
        for start in range(0, len(crops), chunk):
            parts += [f.batch() for f in await engine.embed(crops[start : start + chunk])]
        return Features.cat(parts)

    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(
    not (PREPARED_DATA / "celeba" / "manifest.jsonl").is_file() or not SHARED_DATA.is_dir(),
    reason="needs ../shared/data and the aligned caches of `make prepare-data` (../oaml_data)",
)
def test_each_preset_far_through_the_served_path_is_the_published_far() -> None:
    """Fresh pairs of the calibration identities (new occluded copies, new pairs), embedded by the running
    engine and fused by it: each preset's FAR equals the FAR `/info` publishes within binomial sampling error.
    A calibration fitted on any other path (flip test, fp32, another precision) moves these rates."""
    from model.training.evaluate import held_out_faces, held_out_views, sample_pairs

    engine = Engine(Settings(weights=DEFAULT_WEIGHTS, torch_threads=2))
    engine.start()
    try:
        meta = engine.card.metadata
        cal = meta["calibration"]
        sampled = cal["pairs_sampled"]
        holdout = [SHARED_DATA / "train" / "aligned" / name for name in cal["holdout"]]
        images, labels, landmarks = held_out_faces(meta["training"]["config"], PREPARED_DATA, holdout, lineage=meta)
        seed = sampled["seed"] + 1000  # not the calibration's draw
        views = held_out_views(images, landmarks, SHARED_DATA / "occluders", seed)
        pairs = sample_pairs(labels, seed, sampled["max_genuine"], sampled["max_impostor"])
        feats = served_features(engine, views)
        fused = engine.call_device(engine.score, feats, feats, pairs.ia, pairs.ib)["fused"]
    finally:
        engine.stop()
    impostor = fused[~pairs.same]
    n = len(impostor)
    for name, far in PRESETS.items():
        measured = float((impostor > engine.calibration.thresholds[name]).mean())
        sigma = math.sqrt(far * (1 - far) / n)
        assert abs(measured - far) <= 4 * sigma, (
            f"{name}: FAR {measured:.2e} on {n} impostor pairs, published {far:.0e}"
        )


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(
    not (PREPARED_DATA / "lfw" / "manifest.jsonl").is_file() or not SHARED_DATA.is_dir(),
    reason="needs ../shared/data and the LFW cache of `make prepare-data` (../oaml_data/lfw)",
)
def test_identify_presets_keep_their_fpir_on_lfw_at_every_gallery_size() -> None:
    """Open set through the running service on LFW (a domain the stranger model never saw): at 100 and 1,000
    people enrolled, the strangers each preset matches to someone are its FPIR target within binomial
    sampling error."""
    from oaml.openset_eval import evaluate_open_set

    report = evaluate_open_set(DEFAULT_WEIGHTS, PREPARED_DATA / "lfw", sizes=(100, 1000), strangers=1000)
    for row in report["sizes"]:
        for name, preset in row["clean"]["presets"].items():
            n, target = row["strangers"], preset["fpir_target"]
            slack = 4 * math.sqrt(target * (1 - target) * n) + 1
            assert abs(preset["false_positives"] - target * n) <= slack, (row["gallery_people"], name, preset)


def test_the_cards_suite_table_is_the_recorded_report() -> None:
    """The model card's benchmark table is what the weights' metadata recorded (``oaml eval --record``)."""
    from model.card_tables import SUITE
    from model.training.suite import suite_table

    meta = read_metadata(DEFAULT_WEIGHTS)
    report = meta["metrics"]["suite"]
    assert set(report["sets"]) == {"LFW", "CFP-FP", "CFP-FF"}
    card = (DEFAULT_WEIGHTS.parent / "README.md").read_text()
    assert SUITE.read(card) == suite_table(report).strip()


def test_the_cards_open_set_table_is_the_recorded_report() -> None:
    """The model card's /identify table is what ``oaml eval-identify --record`` stored, and says which CPU, path
    and inputs it was measured on."""
    from model.card_tables import OPEN_SET
    from oaml.openset_eval import markdown_open_set

    report = read_metadata(DEFAULT_WEIGHTS)["metrics"]["open_set"]
    assert {"cpu", "served", "map_storage", "lfw_manifest_sha256", "occluders_sha256"} <= set(report["ran_on"])
    card = (DEFAULT_WEIGHTS.parent / "README.md").read_text()
    assert OPEN_SET.read(card) == markdown_open_set(report).strip()


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(
    not (PREPARED_DATA / "lfw" / "manifest.jsonl").is_file() or not (SHARED_DATA / "eval" / "cfp").is_dir(),
    reason="needs ../shared/data (CFP, occluders) and the LFW cache of `make prepare-data` (../oaml_data/lfw)",
)
def test_a_fresh_suite_run_on_the_fixed_subset_gives_the_recorded_numbers() -> None:
    """Folds 1 and 2 of every set, embedded afresh on the served path with the SFace peer: the numbers the
    card's run recorded for that subset, so the card's table is the model's and not a stale one."""
    from model.calibration import Calibration
    from model.embedder import Embedder
    from model.training.suite import SUBSET_FOLDS, public_sets, run_suite
    from model.training.teacher import SFaceTeacher

    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    recorded = meta["metrics"]["suite"]
    sets = [
        s.subset(SUBSET_FOLDS)
        for s in public_sets(PREPARED_DATA / "lfw", SHARED_DATA / "eval/lfw/pairs.txt", SHARED_DATA / "eval/cfp")
    ]
    setting = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[recorded["embedding"]["precision"]]
    embedder = Embedder(model, precision=setting, flip=recorded["embedding"]["flip"])
    fresh = run_suite(
        sets, embedder, SHARED_DATA / "occluders", Calibration.from_dict(meta["calibration"]), SFaceTeacher(threads=2)
    )[0]
    for name, entry in fresh["sets"].items():
        for condition in ("clean", "occluded"):
            want, got = recorded["subset"][name][condition], entry[condition]
            assert (got["pairs"], got["pairs_without_face"]) == (want["pairs"], want["pairs_without_face"])
            for matcher in ("adaface", "qaconv", "fused", "sface_peer"):
                for metric in ("accuracy", "auc", "tar_far_1e-2"):
                    assert abs(got[matcher][metric] - want[matcher][metric]) <= 0.005, (name, condition, matcher)
