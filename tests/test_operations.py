"""Running OAML day to day (issue #35): the audit log (every biometric operation, who by key id, no biometric data
or names, pseudonyms once a subject is deleted), per-key quotas (429 with Retry-After and RateLimit-* headers),
merging and splitting subjects on both stores with a replica following, identity hygiene (duplicates among real
people enrolled twice), and export/import of a collection (same model, another model from crops, refused without
crops)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import key_id
from tests.conftest import SHARED_DATA
from tests.test_service import jpeg, make_settings, png

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "oaml_ir18.safetensors"

ADMIN = "admin-key-" + "a" * 20
OTHER = "other-admin-" + "b" * 20
MATCH = "match-key-" + "c" * 20
KEYS = f"{ADMIN}:admin,{OTHER}:admin,{MATCH}:match"


@pytest.fixture(scope="module")
def people(astronaut: np.ndarray) -> dict[str, bytes]:
    from skimage import data

    camera = np.repeat(data.camera()[..., None], 3, axis=2)
    return {"eileen": png(astronaut), "cameraman": png(camera), "eileen_again": jpeg(astronaut[:, ::-1].copy())}


def enrol(c: TestClient, subject: str, photo: bytes, key: str = ADMIN, collection: str = "site", **form: str) -> Any:
    return c.post(
        "/gallery",
        params={"collection": collection},
        data={"subject": subject, **form},
        files=[("images", ("p.png", photo, "image/png"))],
        headers={"X-API-Key": key},
    )


def until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture
def keyed(weights: Path, tmp_path: Path) -> Iterator[TestClient]:
    """A service with three keys (two admins, one match) and crops kept."""
    settings = make_settings(weights, tmp_path, api_keys=KEYS, store_crops=True, rate_limits="match=0,admin=0")
    with TestClient(create_app(settings)) as c:
        yield c


# -- the audit log --------------------------------------------------------------------------------------------


def test_every_biometric_operation_is_audited_without_biometric_data(
    keyed: TestClient, people: dict[str, bytes]
) -> None:
    c, a, b = keyed, {"X-API-Key": ADMIN}, {"X-API-Key": OTHER}
    assert c.post("/collections", json={"name": "site"}, headers=a).status_code == 201
    meta = json.dumps({"badge": "B-7731", "department": "flight"})
    assert enrol(c, "eileen", people["eileen"], name="Eileen Collins", metadata=meta).status_code == 201
    assert enrol(c, "cameraman", people["cameraman"], key=OTHER).status_code == 201
    assert enrol(c, "eileen-2", people["eileen_again"], name="E. Collins").status_code == 201
    renamed = c.patch("/gallery/eileen", params={"collection": "site"}, json={"name": "Eileen M. Collins"}, headers=a)
    assert renamed.status_code == 200
    merged = c.post("/gallery/eileen/merge", params={"collection": "site"}, json={"from": "eileen-2"}, headers=a)
    assert merged.status_code == 200 and merged.json()["faces"] == 2
    moved_face = merged.json()["face_list"][1]["face_id"]
    moved = c.post(
        "/gallery/eileen/faces/move",
        params={"collection": "site"},
        json={"faces": [moved_face], "to": "someone"},
        headers=b,
    )
    assert moved.status_code == 200 and moved.json()["subject"] == "someone" and moved.json()["faces"] == 1
    face = c.get("/gallery/cameraman", params={"collection": "site"}, headers=a).json()["face_list"][0]["face_id"]
    assert c.delete(f"/gallery/cameraman/faces/{face}", params={"collection": "site"}, headers=a).status_code == 200
    assert c.delete("/gallery/someone", params={"collection": "site"}, headers=b).status_code == 200
    assert c.delete("/gallery/nobody", params={"collection": "site"}, headers=a).status_code == 404  # refused
    exported = c.get("/collections/site/export", headers=a)
    assert exported.status_code == 200
    imported = c.post("/collections/copy/import", content=exported.content, headers=a)
    assert imported.status_code == 201, imported.text
    assert c.delete("/collections/copy", headers=a).status_code == 200

    assert c.get("/audit", headers={"X-API-Key": MATCH}).status_code == 403
    page = c.get("/audit", headers=a, params={"limit": 1000})
    assert page.status_code == 200 and page.json()["next"] is None
    entries = page.json()["entries"]
    actions = [e["action"] for e in entries]
    for action in (
        "collection_create",
        "enrol",
        "update_subject",
        "merge_subjects",
        "move_faces",
        "delete_face",
        "delete_subject",
        "export",
        "import",
        "collection_delete",
    ):
        assert action in actions, (action, actions)
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    # who: the key's id, never the key
    by_key = {e["key_id"] for e in entries}
    assert by_key == {key_id(ADMIN), key_id(OTHER)}
    assert next(e for e in entries if e["action"] == "move_faces")["key_id"] == key_id(OTHER)
    # the outcome, refusals included
    refused = [e for e in entries if e["outcome"] != "ok"]
    assert [(e["action"], e["outcome"]) for e in refused] == [("delete_subject", "SUBJECT_NOT_FOUND")]
    enrolled = [e for e in entries if e["action"] == "enrol"]
    assert [e["faces"] for e in enrolled] == [1, 1, 1] and enrolled[0]["subject"] == "eileen"
    # no images, embeddings, names or metadata anywhere in the log
    text = c.get("/audit/export", headers=a).text
    for secret in ("Eileen Collins", "E. Collins", "Eileen M. Collins", "B-7731", "flight", ADMIN, OTHER):
        assert secret not in text
    assert not re.search(r"[A-Za-z0-9+/]{200,}", text)  # no base64 payloads (embeddings, maps, crops)
    # a deleted subject is kept as a pseudonym, one per person, in every entry about it
    lines = [json.loads(line) for line in text.splitlines()]
    assert [e["seq"] for e in lines[:-1]] == [e["seq"] for e in entries]
    assert lines[-1]["action"] == "export" and lines[-1]["detail"] == {"what": "audit log"}  # the export is logged
    assert "someone" not in text and "eileen-2" not in text  # deleted, and merged away
    move = next(e for e in lines if e["action"] == "move_faces")
    deletion = next(e for e in lines if e["action"] == "delete_subject" and e["outcome"] == "ok")
    assert move["subject"] == "eileen" and move["other_subject"].startswith("deleted-")
    assert deletion["subject"] == move["other_subject"]  # one pseudonym per person
    merge = next(e for e in lines if e["action"] == "merge_subjects")
    assert merge["subject"] == "eileen" and merge["other_subject"].startswith("deleted-")
    assert enrolled[2]["subject"] == merge["other_subject"]  # eileen-2's enrolment: the id merged away
    # filters
    only = c.get("/audit", headers=a, params={"action": "enrol", "collection": "site"}).json()["entries"]
    assert [e["seq"] for e in only] == [e["seq"] for e in enrolled]


def test_audit_entries_past_their_retention_are_deleted(
    weights: Path, tmp_path: Path, people: dict[str, bytes]
) -> None:
    from service.audit import AuditEntry
    from service.store import SQLiteGalleryStore

    store = SQLiteGalleryStore(tmp_path / "gallery.sqlite3", "v1")
    store.append_audit(AuditEntry("enrol", "default", "old", faces=1, at=time.time() - 400 * 86400))
    store.append_audit(AuditEntry("enrol", "default", "new", faces=1))
    assert store.prune_audit(time.time() - 365 * 86400) == 1
    assert [e["subject"] for e in store.audit_entries()] == ["new"]
    store.close()


# -- quotas ---------------------------------------------------------------------------------------------------


def test_requests_beyond_a_keys_rate_get_429_with_retry_after(weights: Path, tmp_path: Path) -> None:
    settings = make_settings(weights, tmp_path, api_keys=KEYS, rate_limits="match=1/3,admin=0")
    with TestClient(create_app(settings)) as c:
        answers = [c.get("/info", headers={"X-API-Key": MATCH}) for _ in range(4)]
        assert [r.status_code for r in answers[:3]] == [200, 200, 200]
        assert answers[0].headers["RateLimit-Limit"] == "3" and answers[0].headers["RateLimit-Remaining"] == "2"
        assert answers[0].headers["RateLimit-Policy"] == "3;w=3"
        last = answers[3]
        assert last.status_code == 429 and last.json()["code"] == "RATE_LIMITED"
        assert int(last.headers["Retry-After"]) >= 1 and last.headers["RateLimit-Remaining"] == "0"
        # per key: another key is not held back, and an admin role without a limit has no headers
        free = c.get("/info", headers={"X-API-Key": ADMIN})
        assert free.status_code == 200 and "RateLimit-Limit" not in free.headers
        time.sleep(1.1)  # a token back after a second
        assert c.get("/info", headers={"X-API-Key": MATCH}).status_code == 200


def test_a_keys_daily_enrolment_quota_is_counted_from_the_audit_log(
    weights: Path, tmp_path: Path, people: dict[str, bytes]
) -> None:
    settings = make_settings(weights, tmp_path, api_keys=KEYS, enrol_faces_per_day=2, rate_limits="admin=0")
    with TestClient(create_app(settings)) as c:
        c.post("/collections", json={"name": "site"}, headers={"X-API-Key": ADMIN})
        assert enrol(c, "eileen", people["eileen"]).status_code == 201
        assert enrol(c, "cameraman", people["cameraman"]).status_code == 201
        over = enrol(c, "third", people["eileen_again"])
        assert over.status_code == 429 and over.json()["code"] == "QUOTA_EXCEEDED"
        assert int(over.headers["Retry-After"]) > 0
        assert c.get("/gallery/third", params={"collection": "site"}, headers={"X-API-Key": ADMIN}).status_code == 404
        assert enrol(c, "third", people["eileen_again"], key=OTHER).status_code == 201  # another key's own quota
    with TestClient(create_app(settings)) as c:  # a restart does not reset it: it is in the store
        assert enrol(c, "fourth", people["eileen_again"]).status_code == 429


# -- merging and splitting on both stores ------------------------------------------------------------------------


def listed(c: TestClient, collection: str = "site") -> dict[str, int]:
    """Subject -> its face count."""
    return {s["subject"]: s["faces"] for s in c.get("/gallery", params={"collection": collection}).json()["subjects"]}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_merge_and_move_are_atomic_and_replicas_follow(
    kind: str, weights: Path, tmp_path: Path, people: dict[str, bytes], request: pytest.FixtureRequest
) -> None:
    extra: dict[str, Any] = {"rate_limits": "admin=0,match=0"}
    if kind == "postgresql":
        pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
        extra.update(gallery_url=request.getfixturevalue("pg_url"), gallery_poll_s=0.2)
    one = TestClient(create_app(make_settings(weights, tmp_path / "one", **extra)))
    with one:
        one.post("/collections", json={"name": "site"})
        for subject, photo in (("eileen", "eileen"), ("eileen-b", "eileen_again"), ("cameraman", "cameraman")):
            assert enrol(one, subject, people[photo], name=f"{subject} name").status_code == 201
        # a merge into a subject that does not exist changes nothing
        r = one.post("/gallery/nobody/merge", params={"collection": "site"}, json={"from": "eileen-b"})
        assert r.status_code == 404 and r.json()["code"] == "SUBJECT_NOT_FOUND"
        r = one.post("/gallery/eileen/merge", params={"collection": "site"}, json={"from": "eileen"})
        assert r.status_code == 422
        r = one.post("/gallery/eileen/merge", params={"collection": "site"}, json={"from": "eileen-b"})
        assert r.status_code == 200 and r.json()["faces"] == 2 and r.json()["name"] == "eileen name"
        assert one.get("/gallery/eileen-b", params={"collection": "site"}).status_code == 404
        found = one.post(
            "/identify",
            params={"collection": "site"},
            data={"threshold": "-1000", "top_k": "5"},
            files={"image": ("q.png", people["eileen_again"], "image/png")},
        ).json()
        assert {x["subject"] for x in found["candidates"]} == {"eileen", "cameraman"}
        # moving a face that is not the subject's moves nothing
        other = one.get("/gallery/cameraman", params={"collection": "site"}).json()["face_list"][0]["face_id"]
        r = one.post("/gallery/eileen/faces/move", params={"collection": "site"}, json={"faces": [other], "to": "x"})
        assert r.status_code == 404 and r.json()["code"] == "FACE_NOT_FOUND"
        assert one.get("/gallery/x", params={"collection": "site"}).status_code == 404
        faces = one.get("/gallery/eileen", params={"collection": "site"}).json()["face_list"]
        r = one.post(
            "/gallery/eileen/faces/move",
            params={"collection": "site"},
            json={"faces": [faces[1]["face_id"]], "to": "eileen-b"},
        )
        assert r.status_code == 200 and r.json()["faces"] == 1
        assert one.get("/gallery/eileen", params={"collection": "site"}).json()["faces"] == 1
        subjects = {
            s["subject"]: s["faces"] for s in one.get("/gallery", params={"collection": "site"}).json()["subjects"]
        }
        assert subjects == {"eileen": 1, "eileen-b": 1, "cameraman": 1}
        found = one.post(
            "/identify",
            params={"collection": "site"},
            data={"threshold": "-1000", "top_k": "5"},
            files={"image": ("q.png", people["eileen_again"], "image/png")},
        ).json()
        assert {x["subject"] for x in found["candidates"]} == {"eileen", "eileen-b", "cameraman"}
        if kind == "postgresql":  # a second replica follows both from the change log
            two = TestClient(create_app(make_settings(weights, tmp_path / "two", **extra)))
            with two:
                listed = lambda: {  # noqa: E731
                    s["subject"]: s["faces"]
                    for s in two.get("/gallery", params={"collection": "site"}).json()["subjects"]
                }
                assert until(lambda: listed() == subjects)
                r = one.post("/gallery/eileen/merge", params={"collection": "site"}, json={"from": "eileen-b"})
                assert r.status_code == 200
                assert until(lambda: listed() == {"eileen": 2, "cameraman": 1})
                probe = two.post(
                    "/identify",
                    params={"collection": "site"},
                    data={"threshold": "-1000", "top_k": "5"},
                    files={"image": ("q.png", people["eileen_again"], "image/png")},
                ).json()
                assert {x["subject"] for x in probe["candidates"]} == {"eileen", "cameraman"}


# -- export and import ----------------------------------------------------------------------------------------


def test_a_collection_exported_and_imported_matches_as_before(keyed: TestClient, people: dict[str, bytes]) -> None:
    c, a = keyed, {"X-API-Key": ADMIN}
    c.post("/collections", json={"name": "site"}, headers=a)
    enrol(c, "eileen", people["eileen"], name="Eileen", metadata='{"badge": 1}')
    enrol(c, "cameraman", people["cameraman"])
    exported = c.get("/collections/site/export", headers=a)
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in exported.text.splitlines()]
    header = lines[0]
    assert header["format"] == "oaml-collection" and header["subjects"] == 2 and header["faces"] == 2
    assert all(line["crop"] for line in lines if line["type"] == "face")
    r = c.post("/collections/copy/import", content=exported.content, headers=a)
    assert r.status_code == 201 and r.json()["faces"] == 2 and r.json()["embedded_again"] == 0
    assert c.get("/gallery/eileen", params={"collection": "copy"}, headers=a).json()["metadata"] == {"badge": 1}

    def best(collection: str) -> tuple[str, float]:
        found = c.post(
            "/identify",
            params={"collection": collection},
            data={"threshold": "-1000"},
            files={"image": ("q.jpg", people["eileen_again"], "image/jpeg")},
            headers=a,
        ).json()["candidates"][0]
        return found["subject"], found["score"]

    assert best("copy") == best("site")
    # into a collection that is not empty: refused, nothing added
    r = c.post("/collections/copy/import", content=exported.content, headers=a)
    assert r.status_code == 409 and r.json()["code"] == "COLLECTION_NOT_EMPTY"
    assert c.get("/collections/copy", headers=a).json()["face_count"] == 2
    # a file cut short or malformed leaves no collection behind
    broken = exported.content.rsplit(b"\n", 2)[0] + b'\n{"type": "face", "subject": "eileen"}\n'
    r = c.post("/collections/broken/import", content=broken, headers=a)
    assert r.status_code == 422 and r.json()["code"] == "VALIDATION_ERROR"
    assert c.get("/collections/broken", headers=a).status_code == 404
    r = c.post("/collections/junk/import", content=b"not json\n", headers=a)
    assert r.status_code == 422 and c.get("/collections/junk", headers=a).status_code == 404
    # a match key may not export biometric data
    assert c.get("/collections/site/export", headers={"X-API-Key": MATCH}).status_code == 403


def test_an_export_of_another_model_is_embedded_again_from_crops_or_refused(
    keyed: TestClient, people: dict[str, bytes]
) -> None:
    c, a = keyed, {"X-API-Key": ADMIN}
    c.post("/collections", json={"name": "site"}, headers=a)
    enrol(c, "eileen", people["eileen"])
    enrol(c, "cameraman", people["cameraman"])
    lines = c.get("/collections/site/export", headers=a).text.splitlines()
    header = json.loads(lines[0])
    header["model_version"] = "some-other-model"
    other = "\n".join([json.dumps(header), *lines[1:]]).encode()
    r = c.post("/collections/moved/import", content=other, headers=a)
    assert r.status_code == 201, r.text
    assert r.json()["embedded_again"] == 2 and r.json()["model_version"] != "some-other-model"
    found = c.post(
        "/identify",
        params={"collection": "moved"},
        data={"threshold": "-1000"},
        files={"image": ("q.png", people["eileen"], "image/png")},
        headers=a,
    ).json()
    assert (
        found["candidates"][0]["subject"] == "eileen"
        and found["candidates"][0]["score"] > 0.99 * found["candidates"][0]["score"]
    )
    without = [json.dumps(header)] + [
        json.dumps({**json.loads(line), "crop": None}) if json.loads(line)["type"] == "face" else line
        for line in lines[1:]
    ]
    r = c.post("/collections/refused/import", content="\n".join(without).encode(), headers=a)
    assert r.status_code == 409 and r.json()["code"] == "MODEL_VERSION_MISMATCH"
    assert c.get("/collections/refused", headers=a).status_code == 404


# -- identity hygiene on real people ---------------------------------------------------------------------------


LFW = SHARED_DATA / "eval" / "lfw"


@pytest.mark.skipif(not LFW.is_dir(), reason="../shared/data/eval/lfw is not at hand (real faces needed)")
def test_people_enrolled_twice_under_two_names_are_found(tmp_path: Path) -> None:
    """Ten LFW people with two photos or more, each enrolled twice (one photo each, two subject ids), beside
    twenty people enrolled once, and one subject holding two people's photos: the review lists mostly the
    true duplicate pairs, and the mixed subject."""
    folders = sorted(p for p in LFW.iterdir() if p.is_dir())
    twice = [p for p in folders if len(list(p.glob("*.jpg"))) >= 2][:10]
    once = [p for p in folders if len(list(p.glob("*.jpg"))) == 1][:20]
    settings = make_settings(SHIPPED, tmp_path, rate_limits="admin=0,match=0")
    with TestClient(create_app(settings)) as c:
        c.post("/collections", json={"name": "lfw"})

        def add(subject: str, photo: Path) -> None:
            r = enrol(c, subject, photo.read_bytes(), collection="lfw", face="largest")
            assert r.status_code == 201, r.text

        for p in twice:
            shots = sorted(p.glob("*.jpg"))
            add(f"{p.name}-a", shots[0])
            add(f"{p.name}-b", shots[1])
        for p in once:
            add(p.name, next(p.glob("*.jpg")))
        add("mixed", next(once[0].glob("*.jpg")))
        add("mixed", sorted(twice[0].glob("*.jpg"))[0])
        review = c.get("/collections/lfw/duplicates", params={"threshold": "lenient"}).json()
    assert review["faces"] == 2 * len(twice) + len(once) + 2
    true_pairs = {(f"{p.name}-a", f"{p.name}-b") for p in twice}
    listed = [tuple(d["subjects"]) for d in review["duplicates"]]
    found = true_pairs & set(listed)
    # the model's LFW accuracy is 91% (model card): most, not all, of the ten pairs pass /identify's threshold
    assert len(found) >= 6, listed
    # what is listed is mostly true: pairs made by the "mixed" subject's photos are true too
    explained = {pair for pair in listed if pair in true_pairs or "mixed" in pair}
    assert len(explained) >= 0.7 * len(listed), listed
    assert [m["subject"] for m in review["mixed"]][:1] == ["mixed"]
