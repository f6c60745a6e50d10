"""The HTTP service driven over HTTP with real photos.

Verify, gallery, identify, heatmaps, errors, batching, durability.
"""

from __future__ import annotations

import io
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model.align import FaceDetector, FacePipeline
from model.checkpoint import save_checkpoint
from model.embedder import FLIP_TEST
from model.net import build_model
from service.app import create_app
from service.config import Settings
from service.engine import BatchStats
from service.index import GalleryIndex
from service.render import BAR_WIDTH
from service.store import Enrolment, FaceRecord, SQLiteGalleryStore
from tests.servers import free_port, start_server, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(astronaut: np.ndarray) -> dict[str, bytes]:
    from skimage import data

    camera = np.repeat(data.camera()[..., None], 3, axis=2)
    two = np.full((512, 1024, 3), 200, dtype=np.uint8)
    two[:, :512] = astronaut
    two[128:384, 640:896] = cv2.resize(astronaut, (256, 256))
    photo_640 = cv2.resize(astronaut, (640, 480))
    return {
        "astronaut": png(astronaut),
        "astronaut_jpeg": jpeg(photo_640),
        "camera": png(camera),
        "coffee": jpeg(np.ascontiguousarray(data.coffee())),
        "two_faces": png(two),
        "tight": png(np.ascontiguousarray(astronaut[65:165, 180:270])),
    }


def make_settings(weights: Path, data_dir: Path, **kwargs: object) -> Settings:
    return Settings(weights=weights, data_dir=data_dir, torch_threads=2, **kwargs)


@pytest.fixture(scope="module")
def client(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = make_settings(
        weights,
        tmp_path_factory.mktemp("data"),
        max_wait_ms=100.0,
        max_image_bytes=2_000_000,
        max_image_pixels=3_000_000,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def files(**named: tuple[str, bytes] | tuple[str, bytes, str]) -> dict[str, tuple[str, bytes, str]]:
    return {k: (v[0], v[1], v[2] if len(v) == 3 else "image/png") for k, v in named.items()}  # type: ignore[misc]


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["status"] == status and "Traceback" not in response.text
    return body


class TestVerify:
    def test_response_describes_both_faces_and_the_scores(self, client: TestClient, photos: dict[str, bytes]) -> None:
        r = client.post(
            "/verify",
            files=files(
                image_a=("a.png", photos["astronaut"]), image_b=("b.jpg", photos["astronaut_jpeg"], "image/jpeg")
            ),
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) >= {
            "match",
            "score",
            "probability",
            "threshold",
            "scores",
            "face_a",
            "face_b",
            "model_version",
        }
        assert body["threshold_preset"] == "balanced"
        assert set(body["scores"]) == {"adaface", "qaconv", "weights"}
        assert body["match"] == (body["score"] > body["threshold"])
        # one scale for the decision: the probability passes the threshold's probability exactly when the score does
        assert body["match"] == (body["probability"] > body["threshold_probability"])
        for side in ("face_a", "face_b"):
            face = body[side]
            assert len(face["landmarks"]) == 5 and len(face["box"]) == 4
            assert np.array(face["visibility_map"]).shape == (7, 7)
            occlusion = face["occlusion"]  # the regions and summaries, read from the same map
            assert set(occlusion["regions"]) == set(occlusion["occluded"]) == {"forehead", "eyes", "nose", "mouth"}
            assert isinstance(occlusion["mask_like"], bool) and isinstance(occlusion["glasses_like"], bool)
            assert face["visibility"] == pytest.approx(np.mean(face["visibility_map"]), abs=1e-3)
            assert 0 <= body["probability"] <= 1
        # 640x480 resize of the same photo: the detector finds the face at the scaled place
        assert body["face_b"]["landmarks"][0][0] == pytest.approx(body["face_a"]["landmarks"][0][0] * 640 / 512, abs=5)

    def test_identical_photos_score_higher_than_different_people(
        self, client: TestClient, photos: dict[str, bytes]
    ) -> None:
        same = client.post(
            "/verify", files=files(image_a=("a.png", photos["astronaut"]), image_b=("b.png", photos["astronaut"]))
        ).json()
        diff = client.post(
            "/verify", files=files(image_a=("a.png", photos["astronaut"]), image_b=("b.png", photos["camera"]))
        ).json()
        assert same["scores"]["adaface"] == pytest.approx(1.0, abs=1e-3)
        assert same["score"] > diff["score"]

    def test_threshold_numbers_and_presets(self, client: TestClient, photos: dict[str, bytes]) -> None:
        f = files(image_a=("a.png", photos["astronaut"]), image_b=("b.png", photos["camera"]))
        low = client.post("/verify", files=f, data={"threshold": "-1000"}).json()
        high = client.post("/verify", files=f, data={"threshold": "1000"}).json()
        assert low["match"] is True and high["match"] is False and low["threshold_preset"] is None
        assert low["threshold_probability"] == pytest.approx(0.0) and high["threshold_probability"] == pytest.approx(
            1.0
        )
        assert (
            low["probability"] > low["threshold_probability"] and high["probability"] <= high["threshold_probability"]
        )
        for bad in (
            "nan",
            "inf",
            "-inf",
            "1e309",
            "-Infinity",
        ):  # a non-finite threshold would make every answer the same
            body = assert_problem(client.post("/verify", files=f, data={"threshold": bad}), 422, "VALIDATION_ERROR")
            assert body["field"] == "threshold"
        info = client.get("/info").json()
        strict = client.post("/verify", files=f, data={"threshold": "strict"}).json()
        assert strict["threshold"] == pytest.approx(info["presets"]["strict"]["threshold"])
        assert info["presets"]["strict"]["far"] == 1e-4
        assert info["probability_prior"] == 0.5 and info["flip_test"] is FLIP_TEST
        assert (
            info["presets"]["strict"]["probability"]
            > info["presets"]["balanced"]["probability"]
            > info["presets"]["lenient"]["probability"]
        )

    def test_tight_crops_and_aligned_input(
        self, client: TestClient, photos: dict[str, bytes], pipeline: FacePipeline, astronaut: np.ndarray
    ) -> None:
        r = client.post(
            "/verify", files=files(image_a=("a.png", photos["tight"]), image_b=("b.png", photos["astronaut"]))
        )
        assert r.status_code == 200, r.text
        crop = pipeline.align_one(astronaut).crop
        r = client.post(
            "/verify", files=files(image_a=("a.png", png(crop)), image_b=("b.png", png(crop))), data={"aligned": "true"}
        )
        assert r.status_code == 200 and r.json()["face_a"]["box"] is None
        assert r.json()["scores"]["adaface"] == pytest.approx(1.0, abs=1e-3)

    def test_face_selection_on_group_photos(self, client: TestClient, photos: dict[str, bytes]) -> None:
        f = files(image_a=("a.png", photos["two_faces"]), image_b=("b.png", photos["astronaut"]))
        first = client.post("/verify", files=f).json()
        second = client.post("/verify", files=f, data={"face_a": "1"}).json()
        assert first["face_a"]["box"][0] < 512 < second["face_a"]["box"][0]


class TestExplain:
    def test_the_evidence_adds_up_to_the_answer(self, client: TestClient, photos: dict[str, bytes]) -> None:
        f = files(image_a=("a.png", photos["astronaut"]), image_b=("b.jpg", photos["astronaut_jpeg"], "image/jpeg"))
        verify = client.post("/verify", files=f).json()
        r = client.post("/explain", files=f)
        assert r.status_code == 200, r.text
        body = r.json()
        for key in ("match", "score", "probability", "threshold", "scores"):
            assert body[key] == verify[key], key  # the verify answer, unchanged
        shares = sum(c["share"] for side in ("evidence_a", "evidence_b") for c in body[side]["correspondences"])
        assert shares + body["qaconv_bias"] == pytest.approx(body["scores"]["qaconv"], abs=1e-3)
        for side in ("evidence_a", "evidence_b"):
            evidence = body[side]
            assert evidence["crop"].startswith("data:image/jpeg;base64,")
            assert np.array(evidence["visibility_map"]).shape == (7, 7)
            assert [c["location"] for c in evidence["correspondences"]] == list(range(49))
            assert all(0 <= c["match"] < 49 and c["similarity"] >= 0 for c in evidence["correspondences"])
        assert body["picture"] is None

    def test_the_picture(self, client: TestClient, photos: dict[str, bytes]) -> None:
        f = files(image_a=("a.png", photos["astronaut"]), image_b=("b.png", photos["camera"]))
        png = client.post("/explain", files=f, data={"format": "png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert image.size[0] == 2 * 112 * 3 + 60 and image.size[1] > 112 * 3
        embedded = client.post("/explain", files=f, data={"picture": "true"}).json()["picture"]
        assert embedded.startswith("data:image/png;base64,")
        assert_problem(client.post("/explain", files=f, data={"format": "gif"}), 422, "VALIDATION_ERROR")


class TestDemo:
    def test_the_page_and_its_files_are_served_without_a_key(self, weights: Path, tmp_path: Path) -> None:
        with TestClient(create_app(make_settings(weights, tmp_path, api_keys="k1"))) as c:  # type: ignore[arg-type]
            assert c.get("/", follow_redirects=False).headers["location"] == "/demo/"
            page = c.get("/demo/")
            assert page.status_code == 200 and '<script src="/demo/app.js">' in page.text
            assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere: works offline
            assert c.get("/demo/app.js").headers["content-type"].startswith("text/javascript")
            assert c.get("/demo/style.css").status_code == 200
            assert_problem(c.get("/demo/secrets.txt"), 404, "NOT_FOUND")
            assert_problem(c.post("/explain"), 401, "UNAUTHORIZED")  # the API behind it still wants the key


class TestGalleryAndIdentify:
    def test_enrol_identify_delete(self, client: TestClient, photos: dict[str, bytes]) -> None:
        r = client.post(
            "/gallery",
            data={"subject": "eileen", "name": "Eileen Collins", "metadata": json.dumps({"team": "STS-93"})},
            files=[
                ("images", ("a.png", photos["astronaut"], "image/png")),
                ("images", ("c.jpg", photos["coffee"], "image/jpeg")),
                ("images", ("g.png", photos["two_faces"], "image/png")),
            ],
        )
        assert r.status_code == 201, r.text
        assert r.headers["location"] == "/gallery/eileen"
        body = r.json()
        assert len(body["faces"]) == 1 and body["face_count"] == body["total_faces"] == 1
        assert {(x["image_index"], x["code"]) for x in body["rejected"]} == {(1, "NO_FACE"), (2, "MULTIPLE_FACES")}
        face_id = body["faces"][0]["face_id"]
        r = client.post(
            "/gallery", data={"subject": "photographer"}, files=[("images", ("c.png", photos["camera"], "image/png"))]
        )
        assert r.status_code == 201, r.text

        found = client.post(
            "/identify",
            files=files(image=("a.jpg", photos["astronaut_jpeg"], "image/jpeg")),
            data={"top_k": "5", "threshold": "-1000"},
        ).json()
        assert [c["subject"] for c in found["candidates"]] == ["eileen", "photographer"]
        assert found["match"]["subject"] == "eileen" and found["match"]["name"] == "Eileen Collins"
        assert found["candidates"][0]["face_id"] == face_id and found["gallery_faces"] == 2
        unknown = client.post(
            "/identify", files=files(image=("a.png", photos["astronaut"])), data={"threshold": "1000"}
        ).json()
        assert unknown["match"] is None and len(unknown["candidates"]) == 2

        page = client.get("/gallery", params={"limit": 1}).json()
        assert page["total"] == 2 and [s["subject"] for s in page["subjects"]] == ["eileen"]
        assert page["subjects"][0]["face_count"] == page["subjects"][0]["faces"] == 1  # `faces`: deprecated count
        detail = client.get("/gallery/eileen").json()
        assert detail["metadata"] == {"team": "STS-93"} and detail["face_list"][0]["face_id"] == face_id
        candidate = found["candidates"][0]
        assert candidate["scores"]["adaface"] == candidate["adaface"] and set(candidate["scores"]["weights"]) == {
            "adaface",
            "qaconv",
        }  # the same naming as /verify's `scores`

        renamed = client.patch("/gallery/eileen", json={"name": "E. Collins"}).json()
        assert renamed["name"] == "E. Collins" and renamed["metadata"] == {"team": "STS-93"}
        cleared = client.patch("/gallery/eileen", json={"name": None, "metadata": {"crew": 4}}).json()
        assert cleared["name"] is None and cleared["metadata"] == {"crew": 4} and cleared["face_count"] == 1
        again = client.post("/identify", files=files(image=("a.png", photos["astronaut"])), data={"threshold": "-1000"})
        assert again.json()["candidates"][0]["name"] is None  # the index's names follow
        assert_problem(client.patch("/gallery/nobody", json={"name": "x"}), 404, "SUBJECT_NOT_FOUND")
        assert_problem(client.patch("/gallery/eileen", json={}), 422, "VALIDATION_ERROR")
        assert_problem(client.patch("/gallery/eileen", json={"face": 1}), 422, "VALIDATION_ERROR")
        assert_problem(client.patch("/gallery/eileen", json={"metadata": "text"}), 422, "VALIDATION_ERROR")

        png_resp = client.get("/occlusion", params={"face_id": face_id})
        assert png_resp.status_code == 200 and png_resp.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png_resp.content)).size == (224 + BAR_WIDTH, 224)

        assert client.delete(f"/gallery/eileen/faces/{face_id}").json()["deleted_faces"] == [face_id]
        assert_problem(client.get("/occlusion", params={"face_id": face_id}), 404, "FACE_NOT_FOUND")
        assert client.delete("/gallery/eileen").status_code == 200
        assert client.delete("/gallery/photographer").json()["deleted_faces"]
        after = client.post("/identify", files=files(image=("a.png", photos["astronaut"]))).json()
        assert after["candidates"] == [] and after["match"] is None

    def test_identify_presets_are_fpir_targets_set_for_the_gallerys_size(
        self, weights: Path, tmp_path: Path, photos: dict[str, bytes]
    ) -> None:
        with TestClient(create_app(make_settings(weights, tmp_path))) as c:
            probe = files(image=("a.png", photos["astronaut"]))
            thresholds = []
            for i, photo in enumerate((photos["astronaut"], photos["camera"], photos["tight"])):
                r = c.post("/gallery", data={"subject": f"s{i}"}, files=[("images", ("p.png", photo, "image/png"))])
                assert r.status_code == 201, r.text
                found = c.post("/identify", files=probe).json()
                assert found["threshold_preset"] == "balanced" and found["fpir"] == 1e-3
                assert found["gallery_faces"] == i + 1 and found["gallery_subjects"] == i + 1
                info = c.get("/info").json()["identify_presets"]
                assert info["balanced"] == {"fpir": 1e-3, "threshold": found["threshold"]}
                assert info["lenient"]["threshold"] < info["balanced"]["threshold"] < info["strict"]["threshold"]
                thresholds.append(found["threshold"])
                total = sum(x["probability"] for x in found["candidates"]) + found["probability_unknown"]
                assert total == pytest.approx(1.0, abs=1e-4) and found["probability_prior"] == 0.5
            assert thresholds[0] < thresholds[1] < thresholds[2]  # more faces, more evidence for the same FPIR
            numeric = c.post("/identify", files=probe, data={"threshold": str(thresholds[2])}).json()
            assert numeric["threshold_preset"] is None and numeric["fpir"] == pytest.approx(1e-3, rel=1e-2)
            assert c.get("/info").json()["identify_model"] == "from_pairwise"  # the test weights have no open-set fit

    def test_every_face_of_a_group_photo_is_identified_with_its_box(
        self, weights: Path, tmp_path: Path, photos: dict[str, bytes]
    ) -> None:
        with TestClient(create_app(make_settings(weights, tmp_path))) as c:
            enrol = c.post(
                "/gallery", data={"subject": "eileen"}, files=[("images", ("a.png", photos["astronaut"], "image/png"))]
            )
            assert enrol.status_code == 201
            group = files(image=("g.png", photos["two_faces"]))
            r = c.post("/identify", files=group, data={"face": "all", "threshold": "-1000"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["faces_found"] == body["faces_identified"] == 2 == len(body["faces"])
            boxes = [f["face"]["box"] for f in body["faces"]]
            assert boxes[0][2] - boxes[0][0] > boxes[1][2] - boxes[1][0]  # largest first, each with its box
            assert all(f["match"]["subject"] == "eileen" for f in body["faces"])  # both are the astronaut
            single = c.post("/identify", files=group, data={"threshold": "-1000"}).json()
            # the default still answers for the largest face (found by the coarse and refining passes: the box
            # within a few pixels of the whole photo's pass)
            x1, y1, x2, y2 = single["face"]["box"]
            a1, b1, a2, b2 = boxes[0]
            inter = max(0, min(x2, a2) - max(x1, a1)) * max(0, min(y2, b2) - max(y1, b1))
            assert inter / ((x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter) >= 0.85
            assert_problem(
                c.post("/identify", files=files(image=("c.jpg", photos["coffee"], "image/jpeg")), data={"face": "all"}),
                422,
                "NO_FACE",
            )
            assert_problem(
                c.post("/identify", files=group, data={"face": "all", "aligned": "true"}), 422, "VALIDATION_ERROR"
            )

    def test_a_photo_is_verified_against_an_enrolled_subject(
        self, weights: Path, tmp_path: Path, photos: dict[str, bytes]
    ) -> None:
        with TestClient(create_app(make_settings(weights, tmp_path))) as c:
            images = [
                ("images", (f"{i}.png", p, "image/png")) for i, p in enumerate((photos["astronaut"], photos["tight"]))
            ]
            assert c.post("/gallery", data={"subject": "eileen", "name": "Eileen"}, files=images).status_code == 201
            probe = files(image=("p.jpg", photos["astronaut_jpeg"], "image/jpeg"))
            r = c.post("/gallery/eileen/verify", files=probe)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["subject"] == "eileen" and body["name"] == "Eileen" and body["faces_compared"] == 2
            assert body["threshold_preset"] == "balanced" and body["far"] == 1e-3
            assert set(body) >= {"match", "score", "probability", "scores", "face_a", "face_b", "threshold"}
            faces = {f["face_id"]: f for f in c.get("/gallery/eileen").json()["face_list"]}
            assert body["face_b"]["box"] == faces[body["face_id"]]["box"]
            one = c.post(
                "/verify",
                files=files(
                    image_a=("p.jpg", photos["astronaut_jpeg"], "image/jpeg"), image_b=("a.png", photos["astronaut"])
                ),
                data={"face_b": "single"},  # the enrolled face as the enrolment found it (the whole photo's pass)
            ).json()
            assert body["threshold"] > one["threshold"]  # two faces, two chances for a stranger: more evidence asked
            for face_id in list(faces)[1:]:
                c.delete(f"/gallery/eileen/faces/{face_id}")
            lone = c.post("/gallery/eileen/verify", files=probe).json()
            assert lone["faces_compared"] == 1 and lone["threshold"] == one["threshold"]  # one face: /verify's
            assert body["score"] >= one["score"] - 0.05  # the best of the subject's faces
            assert_problem(c.post("/gallery/nobody/verify", files=probe), 404, "SUBJECT_NOT_FOUND")
            c.delete(f"/gallery/eileen/faces/{list(faces)[0]}")
            assert_problem(c.post("/gallery/eileen/verify", files=probe), 409, "SUBJECT_HAS_NO_FACES")

    def test_an_optional_gate_refuses_probes_too_small_or_too_poor(
        self, weights: Path, tmp_path: Path, photos: dict[str, bytes]
    ) -> None:
        pair = files(image_a=("a.png", photos["astronaut"]), image_b=("b.png", photos["astronaut"]))
        with TestClient(create_app(make_settings(weights, tmp_path / "open"))) as c:
            assert c.post("/verify", files=pair).status_code == 200  # no gate by default
        with TestClient(create_app(make_settings(weights, tmp_path / "size", probe_min_face_size=400))) as c:
            body = assert_problem(c.post("/verify", files=pair), 422, "FACE_TOO_SMALL")
            assert body["field"] == "image_a" and "400" in body["detail"]
            group = c.post("/identify", files=files(image=("g.png", photos["two_faces"])), data={"face": "all"}).json()
            assert group["faces"] == [] and [x["code"] for x in group["skipped"]] == ["FACE_TOO_SMALL"] * 2
        with TestClient(create_app(make_settings(weights, tmp_path / "quality", probe_min_quality=1e9))) as c:
            probe = files(image=("a.png", photos["astronaut"]))
            assert_problem(c.post("/identify", files=probe), 422, "LOW_QUALITY")
            assert (
                c.post(
                    "/gallery", data={"subject": "e"}, files=[("images", ("a.png", photos["astronaut"], "image/png"))]
                ).status_code
                == 201
            )  # enrolment has its own gate
            assert_problem(c.post("/gallery/e/verify", files=probe), 422, "LOW_QUALITY")

    def test_more_photos_of_a_subject_do_not_inflate_its_probability(
        self, weights: Path, tmp_path: Path, photos: dict[str, bytes]
    ) -> None:
        """A subject's evidence is the mean likelihood ratio over its faces, not the best one's (the best of k
        would make a stranger look likelier to be someone enrolled with more photos). One subject, two different
        photos: P = m / (1 + m) with m the mean of exp(score) over the two, as /verify scores each pair."""
        with TestClient(create_app(make_settings(weights, tmp_path))) as c:
            enrolled = [photos["astronaut"], photos["tight"]]
            images = [("images", (f"{i}.png", photo, "image/png")) for i, photo in enumerate(enrolled)]
            assert c.post("/gallery", data={"subject": "x"}, files=images).json()["face_count"] == 2
            probe = photos["camera"]
            found = c.post("/identify", files=files(image=("p.png", probe))).json()["candidates"][0]
            scores = [
                c.post("/verify", files=files(image_a=("p.png", probe), image_b=("e.png", e))).json()["score"]
                for e in enrolled
            ]
        lr = np.exp(scores)
        mean, best = lr.mean() / (1 + lr.mean()), lr.max() / (1 + lr.max())
        assert abs(found["probability"] - mean) < abs(found["probability"] - best) / 3, (found, scores)

    def test_identify_through_the_inverted_file(self, weights: Path, tmp_path: Path, photos: dict[str, bytes]) -> None:
        # tests/test_ann.py covers the search itself; here: settings reach the index, /info says so, answers hold
        settings = make_settings(weights, tmp_path, ann_min_faces=2, ann_probe=1, shortlist=1)
        with TestClient(create_app(settings)) as c:
            assert c.get("/info").json()["gallery_search"]["method"] == "exact"
            for subject, photo in (("eileen", photos["astronaut"]), ("photographer", photos["camera"])):
                r = c.post("/gallery", data={"subject": subject}, files=[("images", ("p.png", photo, "image/png"))])
                assert r.status_code == 201, r.text
            training = c.app.state.oaml.gallery.index.cosine._training  # type: ignore[attr-defined]
            if training is not None:  # trained beside the service; the next search switches to it
                training.join()
            found = c.post(
                "/identify", files=files(image=("a.jpg", photos["astronaut_jpeg"], "image/jpeg")), data={"top_k": "5"}
            ).json()
            assert [x["subject"] for x in found["candidates"]] == ["eileen"]  # one list read, shortlist of one
            search = c.get("/info").json()["gallery_search"]
            assert search["method"] == "inverted_file" and search["ann_lists"] == 1 and search["ann_probe"] == 1
        with TestClient(create_app(settings)) as c:  # a restart trains the file while loading, before ready
            assert c.get("/info").json()["gallery_search"]["method"] == "inverted_file"
            found = c.post("/identify", files=files(image=("a.png", photos["astronaut"])), data={"top_k": "5"}).json()
            assert [x["subject"] for x in found["candidates"]] == ["eileen"]

    def test_int8_map_storage_serves_the_same_gallery_after_a_restart(
        self, weights: Path, tmp_path: Path, photos: dict[str, bytes]
    ) -> None:
        """OAML_MAP_STORAGE reaches the index and /info; the stores keep fp16 maps either way, so a restart may
        change it, and /identify then ranks the same faces with scores a rounding apart."""
        found = {}
        for storage in ("int8", "native"):
            with TestClient(create_app(make_settings(weights, tmp_path, map_storage=storage))) as c:
                assert c.get("/info").json()["gallery_search"]["map_storage"] == storage
                if storage == "int8":
                    for subject, photo in (("eileen", photos["astronaut"]), ("photographer", photos["camera"])):
                        images = [("images", ("p.png", photo, "image/png"))]
                        assert c.post("/gallery", data={"subject": subject}, files=images).status_code == 201
                    assert c.app.state.oaml.gallery.index._maps.chunks[0].dtype == torch.int8  # type: ignore[attr-defined]
                r = c.post("/identify", files=files(image=("a.jpg", photos["astronaut_jpeg"], "image/jpeg")),
                           data={"top_k": "5", "threshold": "-1000"})  # fmt: skip
                assert r.status_code == 200, r.text
                found[storage] = {x["subject"]: x["score"] for x in r.json()["candidates"]}
        assert list(found["int8"]) == list(found["native"]) == ["eileen", "photographer"]
        for subject, score in found["native"].items():
            assert found["int8"][subject] == pytest.approx(score, abs=0.05)

    def test_heatmap_of_an_uploaded_photo_has_the_crop_size(self, client: TestClient, photos: dict[str, bytes]) -> None:
        r = client.post("/occlusion", files=files(image=("a.png", photos["astronaut"])), data={"scale": "3"})
        assert r.status_code == 200
        image = Image.open(io.BytesIO(r.content))
        assert image.size == (336 + BAR_WIDTH, 336) and image.mode == "RGB"
        assert 0 <= float(r.headers["x-oaml-visibility"]) <= 1


class TestErrors:
    def test_each_error_code(self, client: TestClient, photos: dict[str, bytes]) -> None:
        ast = ("a.png", photos["astronaut"])
        assert_problem(
            client.post("/verify", files=files(image_a=("c.jpg", photos["coffee"], "image/jpeg"), image_b=ast)),
            422,
            "NO_FACE",
        )
        body = assert_problem(
            client.post(
                "/verify", files=files(image_a=ast, image_b=("g.png", photos["two_faces"])), data={"face_b": "single"}
            ),
            422,
            "MULTIPLE_FACES",
        )
        assert body["field"] == "image_b"
        assert_problem(
            client.post(
                "/verify", files=files(image_a=ast, image_b=("g.png", photos["astronaut"])), data={"face_b": "3"}
            ),
            422,
            "FACE_INDEX_OUT_OF_RANGE",
        )
        assert_problem(
            client.post("/verify", files=files(image_a=("x.png", b"\x89PNG\r\n\x1a\nbroken"), image_b=ast)),
            400,
            "INVALID_IMAGE",
        )
        assert_problem(
            client.post("/verify", files=files(image_a=("x.txt", b"hello", "text/plain"), image_b=ast)),
            415,
            "UNSUPPORTED_MEDIA",
        )
        big = png(
            np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
        )  # > 2 MB in the test settings
        assert_problem(
            client.post("/verify", files=files(image_a=("big.png", big), image_b=ast)), 413, "IMAGE_TOO_LARGE"
        )
        many_pixels = png(np.zeros((2000, 2000, 3), dtype=np.uint8))  # small file, 4 Mpx > 3 Mpx limit
        assert_problem(
            client.post("/verify", files=files(image_a=("px.png", many_pixels), image_b=ast)), 413, "IMAGE_TOO_LARGE"
        )
        assert_problem(client.post("/verify", files=files(image_a=ast)), 422, "VALIDATION_ERROR")
        assert_problem(
            client.post("/verify", files=files(image_a=ast, image_b=ast), data={"threshold": "loose"}),
            422,
            "VALIDATION_ERROR",
        )
        assert_problem(
            client.post("/gallery", data={"subject": "bad id!"}, files=[("images", ast + ("image/png",))]),
            422,
            "VALIDATION_ERROR",
        )
        assert_problem(
            client.post("/gallery", data={"subject": "x", "metadata": "[1]"}, files=[("images", ast + ("image/png",))]),
            422,
            "VALIDATION_ERROR",
        )
        body = assert_problem(
            client.post(
                "/gallery", data={"subject": "nobody"}, files=[("images", ("c.jpg", photos["coffee"], "image/jpeg"))]
            ),
            422,
            "NO_USABLE_FACE",
        )
        assert body["rejected"][0]["code"] == "NO_FACE"
        assert_problem(client.get("/gallery/nobody"), 404, "SUBJECT_NOT_FOUND")
        assert_problem(client.delete("/gallery/nobody"), 404, "SUBJECT_NOT_FOUND")
        assert_problem(client.get("/occlusion", params={"face_id": "missing"}), 404, "FACE_NOT_FOUND")
        assert_problem(client.get("/nowhere"), 404, "NOT_FOUND")

    def test_api_keys(self, weights: Path, tmp_path: Path, photos: dict[str, bytes]) -> None:
        settings = make_settings(weights, tmp_path, api_keys="k1,k2")  # type: ignore[arg-type]
        assert settings.api_keys == ["k1", "k2"]
        with TestClient(create_app(settings)) as c:
            assert c.get("/health").status_code == 200
            assert_problem(c.get("/info"), 401, "UNAUTHORIZED")
            assert_problem(c.get("/info", headers={"X-API-Key": "nope"}), 401, "UNAUTHORIZED")
            assert c.get("/info", headers={"X-API-Key": "k2"}).status_code == 200
            assert c.get("/gallery", headers={"Authorization": "Bearer k1"}).status_code == 200


def batch_sizes_of_8_concurrent_requests(client: TestClient, photo: bytes, stats: BatchStats) -> list[int]:
    """Send 8 /occlusion requests at once; the sizes of the batches ``stats`` recorded for them."""
    before = stats.batches
    f = files(image=("a.png", photo))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.post("/occlusion", files=f).status_code, range(8)))
    assert results == [200] * 8
    return stats.batch_sizes[-(stats.batches - before) :]


class TestOperations:
    def test_concurrent_requests_are_batched(self, client: TestClient, photos: dict[str, bytes]) -> None:
        engine = client.app.state.oaml.engine  # type: ignore[attr-defined]
        sizes = batch_sizes_of_8_concurrent_requests(client, photos["astronaut"], engine.stats)
        assert sum(sizes) == 8 and max(sizes) > 1
        metrics = client.get("/metrics").text
        assert "oaml_batch_size_bucket" in metrics and 'route="/occlusion"' in metrics and "oaml_queue_depth" in metrics

    def test_the_torch_detector_batches_photos_and_answers_as_onnxruntime_does(
        self, client: TestClient, weights: Path, tmp_path: Path, photos: dict[str, bytes]
    ) -> None:
        # the GPU default (OAML_DETECTOR_BACKEND=auto on CUDA), forced here so it runs on any host
        pairs = [
            files(image_a=("a.png", photos["astronaut"]), image_b=("b.jpg", photos["astronaut_jpeg"], "image/jpeg")),
            files(image_a=("a.png", photos["tight"]), image_b=("b.png", photos["two_faces"])),  # padded retry; 2 faces
        ]
        expected = [client.post("/verify", files=f).json() for f in pairs]
        settings = make_settings(weights, tmp_path, max_wait_ms=100.0, detector_backend="torch")
        with TestClient(create_app(settings)) as c:
            engine = c.app.state.oaml.engine  # type: ignore[attr-defined]
            assert engine.batched_detection and c.get("/info").json()["detector_backend"] == "torch"
            for f, want in zip(pairs, expected, strict=True):
                got = c.post("/verify", files=f).json()
                for side in ("face_a", "face_b"):
                    assert np.allclose(got[side]["box"], want[side]["box"], atol=1.0)
                    assert np.allclose(got[side]["landmarks"], want[side]["landmarks"], atol=1.0)
                # random weights: a sub-pixel landmark difference moves the score by up to ~0.1
                assert got["score"] == pytest.approx(want["score"], abs=0.1)
            assert_problem(
                c.post("/occlusion", files=files(image=("c.jpg", photos["coffee"], "image/jpeg"))), 422, "NO_FACE"
            )
            sizes = batch_sizes_of_8_concurrent_requests(c, photos["astronaut"], engine.detect_stats)
            # two passes per photo (coarse, then around its face); concurrent requests' photos share passes
            assert sum(sizes) == 16 and max(sizes) > 1

    def test_the_detector_passes_are_a_setting_and_info_says_which(
        self, client: TestClient, weights: Path, tmp_path: Path, photos: dict[str, bytes], astronaut: np.ndarray
    ) -> None:
        pair = files(image_a=("a.png", photos["astronaut"]), image_b=("b.png", photos["astronaut"]))
        assert client.get("/info").json()["detector_passes"] == "coarse 320, refined"
        refined = client.post("/verify", files=pair).json()["face_a"]["landmarks"]
        whole = FaceDetector().detect(astronaut)[0].landmarks  # the 512-pixel photo's own pass
        with TestClient(create_app(make_settings(weights, tmp_path, detector_refine=False))) as c:
            assert c.get("/info").json()["detector_passes"] == "whole photo"
            before = c.post("/verify", files=pair).json()["face_a"]["landmarks"]
        np.testing.assert_allclose(before, whole, atol=0.06)  # rounded to 0.1 px in the answer
        assert np.abs(np.array(refined) - whole).max() > 0.5  # refined: from a 128-pixel view of the face

    def test_health_ready_info_docs(self, client: TestClient) -> None:
        assert client.get("/health").json() == {"status": "ok", "detail": None}
        assert client.get("/ready").json()["status"] == "ready"
        info = client.get("/info").json()
        expected_device = "cuda" if torch.cuda.is_available() else "cpu"  # OAML_DEVICE=auto
        assert (
            info["architecture"] == "ir_18"
            and info["device"] == expected_device
            and set(info["presets"]) == {"lenient", "balanced", "strict"}
        )
        assert info["gallery_store"] == "sqlite" and info["gallery_sync"] is None
        assert info["gallery_search"] == {
            "method": "exact",  # a small gallery, below OAML_ANN_MIN_FACES
            "shortlist": 100,
            "ann_min_faces": 200_000,
            "ann_lists": None,
            "ann_probe": 256,
            "map_storage": "int8",  # OAML_MAP_STORAGE's default
        }
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/verify", "/gallery", "/identify", "/occlusion"}


class TestGalleryStore:
    def record(self, fid: str, subject: str, seed: int) -> FaceRecord:
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=512).astype(np.float32)
        return FaceRecord(
            fid,
            subject,
            emb / np.linalg.norm(emb),
            rng.normal(size=(512, 7, 7)).astype(np.float16),
            rng.random((7, 7)).astype(np.float32),
            20.0,
            0.0,
            0.9,
            [0, 0, 10, 10],
            time.time(),
        )

    def test_a_collection_keeps_the_model_version_of_its_faces(self, tmp_path: Path) -> None:
        store = SQLiteGalleryStore(tmp_path / "g.sqlite3", "ir_18-aaaa")
        store.enrol(Enrolment("s", None, None, [self.record("f1", "s", 0)]))
        store.close()
        other = SQLiteGalleryStore(tmp_path / "g.sqlite3", "ir_18-bbbb")  # a service with other default weights
        assert other.collection("default").model_version == "ir_18-aaaa"  # not taken over by the new default
        assert [f.face_id for f in other.faces_for("default", "ir_18-bbbb")] == []  # no data at the new version
        loaded = next(other.faces_for("default", "ir_18-aaaa"))
        assert loaded.model_version == "ir_18-aaaa"
        np.testing.assert_array_equal(loaded.feature_map, self.record("f1", "s", 0).feature_map)

    def test_the_index_keeps_each_faces_norm_for_the_fusion_through_deletes(self) -> None:
        """The quality-form fusion needs each enrolled face's feature norm beside its scores: the index keeps it
        per slot, moved with the face when a delete fills the hole."""
        import dataclasses

        qa = build_model("ir_18").qaconv.eval()
        index = GalleryIndex(qa, torch.device("cpu"), torch.float32)
        recs = [dataclasses.replace(self.record(f"f{i}", f"s{i}", i), norm=10.0 + i) for i in range(70)]
        index.add_records(recs)
        index.remove(["f3", "f10"])  # f69 moves into slot 3
        for probe in (recs[69], recs[11]):
            found = index.search(
                torch.from_numpy(probe.embedding),
                torch.from_numpy(probe.feature_map).float(),
                torch.from_numpy(probe.occlusion),
                70,
            )
            norms = dict(zip(found["face_ids"], found["norm"], strict=True))
            assert len(norms) == 68 and "f3" not in norms and norms["f69"] == 79.0 and norms["f11"] == 21.0
            vis = dict(zip(found["face_ids"], found["visibility"], strict=True))
            assert vis["f69"] == pytest.approx(float(recs[69].occlusion.mean()))
        scored = index.score_faces(
            ["f69", "f5", "f3"], torch.from_numpy(recs[5].embedding), torch.zeros(512, 7, 7), torch.ones(7, 7)
        )
        assert scored["face_ids"] == ["f69", "f5"] and scored["norm"].tolist() == [79.0, 15.0]
        index.add(["x"], ["x"], torch.zeros(1, 512), torch.zeros(1, 512, 7, 7), torch.ones(1, 1, 7, 7))
        assert np.isnan(index.score_faces(["x"], torch.zeros(512), torch.zeros(512, 7, 7), torch.ones(7, 7))["norm"][0])

    def test_index_search_survives_deletes(self) -> None:
        qa = build_model("ir_18").qaconv.eval()
        index = GalleryIndex(qa, torch.device("cpu"), torch.bfloat16)
        recs = [self.record(f"f{i}", f"s{i % 3}", i) for i in range(70)]  # crosses the initial capacity of 64
        index.add(
            [r.face_id for r in recs],
            [r.subject for r in recs],
            torch.from_numpy(np.stack([r.embedding for r in recs])),
            torch.from_numpy(np.stack([r.feature_map for r in recs])).float(),
            torch.from_numpy(np.stack([r.occlusion for r in recs]))[:, None],
        )
        index.remove(["f3", "f10", "f69"])
        assert len(index) == 67
        probe = recs[50]
        found = index.search(
            torch.from_numpy(probe.embedding),
            torch.from_numpy(probe.feature_map).float(),
            torch.from_numpy(probe.occlusion),
            5,
        )
        assert found["face_ids"][0] == "f50" and found["cosine"][0] == pytest.approx(1.0, abs=1e-5)
        full = qa.match(
            torch.from_numpy(probe.feature_map).float()[None],
            qa.prepare_gallery(
                torch.from_numpy(probe.feature_map).float()[None], torch.from_numpy(probe.occlusion)[None, None]
            ),
            probe_occ=torch.from_numpy(probe.occlusion)[None, None],
        )
        assert found["qaconv"][0] == pytest.approx(float(full[0, 0]), abs=0.05)


def test_enrolments_survive_sigkill_and_other_weights_serve_them_only_beside_their_own(
    weights: Path, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    port = free_port()
    proc = start_server(weights, tmp_path, port)
    try:
        wait_ready(proc, port)
        r = httpx.post(
            f"http://127.0.0.1:{port}/gallery",
            data={"subject": "eileen"},
            files=[("images", ("a.png", photos["astronaut"], "image/png"))],
            timeout=60,
        )
        assert r.status_code == 201, r.text
        face_id = r.json()["faces"][0]["face_id"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start_server(weights, tmp_path, port)
    try:
        wait_ready(proc, port)
        detail = httpx.get(f"http://127.0.0.1:{port}/gallery/eileen", timeout=10).json()
        assert [f["face_id"] for f in detail["face_list"]] == [face_id]
        found = httpx.post(
            f"http://127.0.0.1:{port}/identify",
            files={"image": ("a.png", photos["astronaut"], "image/png")},
            timeout=60,
        ).json()
        assert found["candidates"][0]["face_id"] == face_id
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_checkpoint(build_model("ir_18").eval(), other)
    proc = start_server(other, tmp_path, port)
    try:
        out = proc.finish(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2  # refused before the port is bound, in one line: the gallery's weights are missing
    assert "collection 'default' is matched with model ir_18-" in out and "OAML_WEIGHTS_DIR" in out
    assert "Traceback" not in out
    proc = start_server(other, tmp_path, port, OAML_WEIGHTS_DIR=str(weights.parent))  # its weights found there
    try:
        wait_ready(proc, port)
        info = httpx.get(f"http://127.0.0.1:{port}/collections/default", timeout=10).json()
        assert info["model_version"] != httpx.get(f"http://127.0.0.1:{port}/info", timeout=10).json()["model_version"]
        found = httpx.post(
            f"http://127.0.0.1:{port}/identify",
            files={"image": ("a.png", photos["astronaut"], "image/png")},
            timeout=60,
        ).json()
        assert found["candidates"][0]["face_id"] == face_id and found["model_version"] == info["model_version"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_quality_form_calibration_scores_alike_on_every_path(weights: Path, tmp_path: Path, photo: bytes) -> None:
    """Weights whose fusion weighs the pair's lower feature norm (``oaml calibrate --fusion quality``): /verify of
    two photos, /identify against the gallery and the subject's /verify give the pair one fused score, and the
    norm term is in it (the same calibration without it scores otherwise)."""
    from model.calibration import Calibration
    from model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(weights)
    quality = Calibration(0.0, 0.1, 0.0, 1.0, [0.5, 0.5, -0.25, 0.25, 0.8, 0.1, 0.0], -2.5, norm_mean=1.0, norm_std=0.5)
    quality.thresholds = {"lenient": -0.853, "balanced": -0.315, "strict": 0.130}
    path = tmp_path / "weights" / "quality.safetensors"
    path.parent.mkdir()
    save_checkpoint(
        model,
        path,
        {k: v for k, v in meta.items() if k not in ("model_version", "content_sha256")}
        | {"calibration": quality.to_dict()},
    )
    settings = Settings(weights=path, data_dir=tmp_path / "data", torch_threads=1)
    with TestClient(create_app(settings)) as c:
        enrolled = c.post("/gallery", data={"subject": "eileen"}, files={"images": ("a.png", photo, "image/png")})
        assert enrolled.status_code == 201, enrolled.text
        pair = c.post(
            "/verify", files={"image_a": ("a.png", photo, "image/png"), "image_b": ("b.png", photo, "image/png")}
        )
        found = c.post("/identify", data={"threshold": "-1000"}, files={"image": ("q.png", photo, "image/png")})
        own = c.post("/gallery/eileen/verify", files={"image": ("q.png", photo, "image/png")})
        assert pair.status_code == found.status_code == own.status_code == 200, (pair.text, found.text, own.text)
    for answer in (pair.json(), own.json()):  # each score is the quality form's of its own components
        s, a, b = answer["scores"], answer["face_a"], answer["face_b"]
        visibility, norm = min(a["visibility"], b["visibility"]), min(a["quality"]["norm"], b["quality"]["norm"])
        assert answer["score"] == pytest.approx(
            float(quality.score(s["adaface"], s["qaconv"], visibility, norm)), abs=2e-3
        )
        without = Calibration(**{**quality.to_dict(), "coef": quality.coef[:4], "norm_mean": None, "norm_std": None})
        assert abs(float(without.score(s["adaface"], s["qaconv"], visibility)) - answer["score"]) > 0.01
    # /identify fuses the same stored face as the subject's /verify does
    assert found.json()["candidates"][0]["score"] == pytest.approx(own.json()["score"], abs=1e-4)
