"""Collections: named, isolated galleries in both stores, through the API, with keys limited to some,
followed by replicas, and migrated into from single-gallery databases without loss."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.errors import CollectionExists, CollectionNotFound, FaceNotFound, GalleryStoreError, SubjectNotFound
from service.store import DEFAULT_COLLECTION, Enrolment, FaceRecord, SQLiteGalleryStore
from tests.conftest import fake_face
from tests.test_service import jpeg, make_settings, png


@pytest.fixture(scope="module")
def people(astronaut: np.ndarray) -> dict[str, bytes]:
    from skimage import data

    camera = np.repeat(data.camera()[..., None], 3, axis=2)
    return {"eileen": png(astronaut), "cameraman": png(camera), "eileen_again": jpeg(astronaut[::-1, ::-1].copy())}


def record(face_id: str, subject: str, seed: int, collection: str = DEFAULT_COLLECTION) -> FaceRecord:
    return fake_face(face_id, subject, seed, channels=8, collection=collection)


def enrol(c: TestClient, subject: str, photo: bytes, collection: str | None = None, **headers: str) -> Any:
    return c.post(
        "/gallery",
        params={"collection": collection} if collection else None,
        data={"subject": subject},
        files=[("images", ("p.png", photo, "image/png"))],
        headers=headers,
    )


def identify(c: TestClient, photo: bytes, collection: str | None = None, **headers: str) -> Any:
    return c.post(
        "/identify",
        params={"collection": collection} if collection else None,
        files={"image": ("p.png", photo, "image/png")},
        headers=headers,
    )


# -- the store ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_collections_are_isolated_in_the_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        store: Any = SQLiteGalleryStore(tmp_path / "g.sqlite3", "v1")
    else:
        pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
        from service.store_pg import PostgresGalleryStore

        store = PostgresGalleryStore(request.getfixturevalue("pg_url"), "v1")
    assert [c.name for c in store.collections()] == [DEFAULT_COLLECTION]
    store.create_collection("site-a")
    with pytest.raises(CollectionExists):
        store.create_collection("site-a")
    with pytest.raises(CollectionNotFound):
        store.enrol(Enrolment("bob", None, None, [record("x", "bob", 9)], "nowhere"))
    # the same subject id in two collections: two subjects
    store.enrol(Enrolment("bob", "Bob (HQ)", None, [record("f1", "bob", 1)]))
    store.enrol(
        Enrolment("bob", "Bob (site A)", {"badge": 7}, [record("f2", "bob", 2), record("f3", "bob", 3)], "site-a")
    )
    assert store.subject("bob").name == "Bob (HQ)" and store.subject("bob", "site-a").faces == 2
    assert [f.face_id for f in store.faces_of("bob", "site-a")] == ["f2", "f3"]
    assert {f.face_id: f.collection for f in store.iter_faces()} == {"f1": "default", "f2": "site-a", "f3": "site-a"}
    assert [(c.name, c.subjects, c.faces) for c in store.collections()] == [("default", 1, 1), ("site-a", 1, 2)]
    page, total = store.subjects(0, 10, "site-a")
    assert total == 1 and page[0].metadata == {"badge": 7} and page[0].collection == "site-a"
    assert store.subjects(0, 10, None)[1] == 2
    with pytest.raises(FaceNotFound):
        store.delete_face("bob", "f1", "site-a")  # f1 is HQ's bob's
    with pytest.raises(SubjectNotFound):
        store.faces_of("alice", "site-a")
    store.update_subject("bob", {"name": None}, "site-a")
    assert store.subject("bob").name == "Bob (HQ)"  # the other collection's bob is untouched
    assert sorted(store.delete_collection("site-a")) == ["f2", "f3"]
    assert [c.name for c in store.collections()] == [DEFAULT_COLLECTION]
    assert store.faces_by_id(["f2", "f3"]) == [] and store.subject("bob").faces == 1
    with pytest.raises(CollectionNotFound):
        store.delete_collection("site-a")
    store.close()


#: A gallery as schema 1 (before collections) wrote it.
SQLITE_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE subjects (
    subject TEXT PRIMARY KEY, name TEXT, metadata TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL
);
CREATE TABLE faces (
    face_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL REFERENCES subjects(subject) ON DELETE CASCADE,
    model_version TEXT NOT NULL,
    embedding BLOB NOT NULL, feature_map BLOB NOT NULL, fmap_shape TEXT NOT NULL, occlusion BLOB NOT NULL,
    norm REAL NOT NULL, quality REAL NOT NULL, detection_score REAL, box TEXT, crop BLOB, created_at REAL NOT NULL
);
CREATE INDEX faces_subject ON faces(subject);
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, subject TEXT NOT NULL, response TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX idempotency_created ON idempotency(created_at);
CREATE INDEX idempotency_subject ON idempotency(subject);
"""


def _schema_1_rows(n: int, version: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    from service.store import face_row

    subjects = [(f"s{i:03d}", f"name {i}", f'{{"i": {i}}}', 100.0 + i) for i in range(n)]
    faces = []
    for i in range(n):  # interleaved subjects, so a reordering would show
        for j in range(2):
            faces.append(face_row(record(f"f{i:03d}{j}", f"s{i:03d}", 10 * i + j), version)[:-1])
    faces.sort(key=lambda row: (row[0][-1], row[0]))
    return subjects, faces


def test_a_sqlite_gallery_of_schema_1_migrates_into_the_default_collection(tmp_path: Path) -> None:
    path = tmp_path / "gallery.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SQLITE_SCHEMA_1)
    subjects, faces = _schema_1_rows(30, "v1")
    db.executemany("INSERT INTO subjects VALUES (?, ?, ?, ?)", subjects)
    db.executemany(f"INSERT INTO faces VALUES ({', '.join('?' * 13)})", faces)
    db.execute("INSERT INTO idempotency VALUES ('key-1', 'hash', 's007', '{\"answer\": 1}', ?)", (time.time(),))
    db.commit()
    db.close()

    store = SQLiteGalleryStore(path, "v1")
    assert [(c.name, c.subjects, c.faces) for c in store.collections()] == [(DEFAULT_COLLECTION, 30, 60)]
    assert [f.face_id for f in store.iter_faces()] == [row[0] for row in faces]  # every face, in its order
    got = store.face("f0071")
    want = record("f0071", "s007", 71)
    np.testing.assert_array_equal(got.embedding, want.embedding)
    np.testing.assert_array_equal(got.occlusion, want.occlusion)
    assert (got.subject, got.collection, got.box) == ("s007", DEFAULT_COLLECTION, want.box)
    assert store.subject("s007").metadata == {"i": 7} and store.subject("s007").name == "name 7"
    assert store.answer_for("key-1") is not None  # a retry of an enrolment made before still gets its answer
    store.delete_subject("s007")  # foreign keys hold on the rebuilt tables: the faces go with the subject
    assert store.faces_by_id(["f0070", "f0071"]) == [] and store.answer_for("key-1").body == ""  # type: ignore[union-attr]
    store.close()
    again = SQLiteGalleryStore(path, "v1")  # opening a migrated gallery changes nothing
    assert [(c.name, c.subjects, c.faces) for c in again.collections()] == [(DEFAULT_COLLECTION, 29, 58)]
    again.close()


def test_a_gallery_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    SQLiteGalleryStore(tmp_path / "g.sqlite3", "v1").close()
    db = sqlite3.connect(tmp_path / "g.sqlite3")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(GalleryStoreError, match="schema 99, newer"):
        SQLiteGalleryStore(tmp_path / "g.sqlite3", "v1")


def test_a_schema_1_gallery_from_before_idempotency_keys_migrates(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "g.sqlite3")
    db.executescript(SQLITE_SCHEMA_1.split("CREATE TABLE idempotency")[0])
    db.execute("INSERT INTO subjects VALUES ('s', NULL, '{}', 1.0)")
    db.commit()
    db.close()
    store = SQLiteGalleryStore(tmp_path / "g.sqlite3", "v1")
    assert store.subject("s").collection == DEFAULT_COLLECTION and store.answer_for("k") is None
    store.close()


def test_a_postgresql_gallery_of_schema_2_migrates_into_the_default_collection(pg_url: str) -> None:
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    from service.store_pg import MIGRATIONS, PostgresGalleryStore

    subjects, faces = _schema_1_rows(20, "v1")
    with psycopg.connect(pg_url) as conn:  # the database as the release before collections left it
        conn.execute("CREATE TABLE oaml_migrations (version integer PRIMARY KEY, applied_at timestamptz DEFAULT now())")
        for version, sql in MIGRATIONS[:2]:
            conn.execute(sql)
            conn.execute("INSERT INTO oaml_migrations(version) VALUES (%s)", (version,))
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO oaml_subjects VALUES (%s, %s, %s, %s)", subjects)
            columns = "face_id, subject, model_version, embedding, feature_map, fmap_shape, occlusion, norm, quality, "
            columns += "detection_score, box, crop, created_at"
            cur.executemany(f"INSERT INTO oaml_faces({columns}) VALUES ({', '.join(['%s'] * 13)})", faces)
            cur.execute("INSERT INTO oaml_changes(op, subject, face_id) VALUES ('add', 's003', 'f0030')")
    store = PostgresGalleryStore(pg_url, "v1")
    assert [(c.name, c.subjects, c.faces) for c in store.collections()] == [(DEFAULT_COLLECTION, 20, 40)]
    assert [f.face_id for f in store.iter_faces()] == [row[0] for row in faces]
    assert store.subject("s003").metadata == {"i": 3}
    assert [(c.op, c.collection) for c in store.changes_since(0)] == [("add", DEFAULT_COLLECTION)]
    store.create_collection("site-a")
    store.enrol(Enrolment("s003", None, None, [record("g1", "s003", 99)], "site-a"))  # the new key holds
    assert store.subject("s003").faces == 2 and store.subject("s003", "site-a").faces == 1
    assert store.delete_subject("s003") == ["f0030", "f0031"]
    store.close()


# -- the API ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(weights, tmp_path_factory.mktemp("collections")))) as c:
        yield c


def test_a_collection_is_searched_listed_and_deleted_on_its_own(client: TestClient, people: dict[str, bytes]) -> None:
    c = client
    r = c.post("/collections", json={"name": "event-2026"})
    assert r.status_code == 201 and r.headers["location"] == "/collections/event-2026", r.text
    assert r.json()["face_count"] == 0 and set(r.json()["identify_presets"]) == {"lenient", "balanced", "strict"}
    assert c.post("/collections", json={"name": "event-2026"}).json()["code"] == "COLLECTION_EXISTS"
    assert c.post("/collections", json={"name": "bad name"}).status_code == 422
    # the default collection holds eileen; the event holds the cameraman under the same subject id
    assert enrol(c, "guest", people["eileen"]).status_code == 201
    r = enrol(c, "guest", people["cameraman"], "event-2026")
    assert r.status_code == 201 and r.json()["collection"] == "event-2026", r.text
    assert r.headers["location"] == "/gallery/guest?collection=event-2026"
    event_face = r.json()["faces"][0]["face_id"]
    found = identify(c, people["cameraman"], "event-2026").json()
    assert found["collection"] == "event-2026" and found["gallery_faces"] == 1
    assert [x["face_id"] for x in found["candidates"]] == [event_face]  # never the default collection's guest
    assert event_face not in {x["face_id"] for x in identify(c, people["cameraman"]).json()["candidates"]}
    assert c.get("/gallery/guest", params={"collection": "event-2026"}).json()["face_list"][0]["face_id"] == event_face
    listed = c.get("/gallery", params={"collection": "event-2026"}).json()
    assert listed["collection"] == "event-2026" and [s["subject"] for s in listed["subjects"]] == ["guest"]
    names = {x["name"]: (x["subject_count"], x["face_count"]) for x in c.get("/collections").json()["collections"]}
    assert names["event-2026"] == (1, 1) and names[DEFAULT_COLLECTION][1] >= 1
    # a face is read only through its collection
    assert c.get("/occlusion", params={"face_id": event_face}).json()["code"] == "FACE_NOT_FOUND"
    assert c.get("/occlusion", params={"face_id": event_face, "collection": "event-2026"}).status_code == 200
    # unknown collections are 404 on every route, before any photo is looked at
    for r in (
        identify(c, people["eileen"], "nowhere"),
        enrol(c, "x", people["eileen"], "nowhere"),
        c.get("/gallery", params={"collection": "nowhere"}),
        c.get("/collections/nowhere"),
    ):
        assert (r.status_code, r.json()["code"]) == (404, "COLLECTION_NOT_FOUND"), r.text
    assert c.delete(f"/collections/{DEFAULT_COLLECTION}").json()["code"] == "COLLECTION_PROTECTED"
    r = c.delete("/collections/event-2026")
    assert r.json() == {"name": "event-2026", "deleted_subjects": 1, "deleted_faces": 1}
    assert identify(c, people["cameraman"], "event-2026").json()["code"] == "COLLECTION_NOT_FOUND"
    assert c.get("/gallery/guest").json()["face_count"] == 1  # the default collection's guest is still there


def test_idempotency_keys_are_each_collections_own(client: TestClient, people: dict[str, bytes]) -> None:
    c = client
    assert c.post("/collections", json={"name": "keys"}).status_code == 201
    key = {"Idempotency-Key": "same-key"}
    first = enrol(c, "k1", people["eileen"], None, **key)
    other = enrol(c, "k1", people["eileen"], "keys", **key)  # the same key in another collection: its own request
    assert first.status_code == other.status_code == 201 and "idempotent-replayed" not in other.headers
    again = enrol(c, "k1", people["eileen"], "keys", **key)
    assert again.headers["idempotent-replayed"] == "true" and again.json() == other.json()
    assert c.delete("/collections/keys").status_code == 200


def test_collections_survive_a_restart(weights: Path, tmp_path: Path, people: dict[str, bytes]) -> None:
    settings = make_settings(weights, tmp_path)
    with TestClient(create_app(settings)) as c:
        assert c.post("/collections", json={"name": "door-1"}).status_code == 201
        face = enrol(c, "eileen", people["eileen"], "door-1").json()["faces"][0]["face_id"]
    with TestClient(create_app(settings)) as c:
        assert c.get("/info").json()["collections"] == 2
        found = identify(c, people["eileen"], "door-1").json()
        assert found["candidates"][0]["face_id"] == face and found["gallery_faces"] == 1
        assert identify(c, people["eileen"]).json()["candidates"] == []


def test_keys_limited_to_collections(weights: Path, tmp_path: Path, people: dict[str, bytes]) -> None:
    settings = make_settings(weights, tmp_path, api_keys="root,site:admin:site-a,door:match:site-a+site-b")
    with TestClient(create_app(settings)) as c:

        def as_(key: str) -> dict[str, str]:
            return {"X-API-Key": key}

        assert c.post("/collections", json={"name": "site-a"}, headers=as_("site")).json()["code"] == "FORBIDDEN"
        for name in ("site-a", "site-c"):
            assert c.post("/collections", json={"name": name}, headers=as_("root")).status_code == 201
        assert enrol(c, "eileen", people["eileen"], "site-a", **as_("site")).status_code == 201
        r = enrol(c, "eileen", people["eileen"], None, **as_("site"))  # the default collection is not its own
        assert (r.status_code, r.json()["code"]) == (403, "FORBIDDEN")
        assert enrol(c, "eileen", people["eileen"], "site-c", **as_("site")).status_code == 403
        assert [x["name"] for x in c.get("/collections", headers=as_("site")).json()["collections"]] == ["site-a"]
        assert c.get("/collections/site-c", headers=as_("site")).status_code == 403
        assert c.delete("/collections/site-a", headers=as_("site")).json()["code"] == "FORBIDDEN"
        # a match key: identify in its collections only, no gallery reads
        assert identify(c, people["eileen"], "site-a", **as_("door")).status_code == 200
        assert identify(c, people["eileen"], "site-c", **as_("door")).status_code == 403
        assert identify(c, people["eileen"], None, **as_("door")).status_code == 403
        assert c.get("/gallery", params={"collection": "site-a"}, headers=as_("door")).status_code == 403
        assert c.delete("/collections/site-c", headers=as_("root")).status_code == 200
        # /info tells a limited key nothing about the collections it may not use
        info = c.get("/info", headers=as_("door")).json()
        assert info["gallery_faces"] is None and info["identify_presets"] is None and info["collections"] is None
        assert c.get("/info", headers=as_("root")).json()["collections"] == 2


def test_a_bad_key_entry_is_refused_at_start() -> None:
    for entry in ("k:admin:", "k:admin:bad name", "k:owner"):
        with pytest.raises(ValueError):
            Settings(api_keys=entry)


def test_replicas_follow_collections(weights: Path, tmp_path: Path, pg_url: str, people: dict[str, bytes]) -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")

    def replica(name: str) -> TestClient:
        settings = Settings(
            weights=weights, data_dir=tmp_path / name, gallery_url=pg_url, torch_threads=1, gallery_poll_s=0.2
        )
        return TestClient(create_app(settings))

    def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if check():
                return True
            time.sleep(0.1)
        return check()

    with replica("a") as a, replica("b") as b:
        assert a.post("/collections", json={"name": "site-a"}).status_code == 201
        # enrolling through the other replica at once: it looks in the store before saying 404
        assert enrol(b, "early", people["cameraman"], "site-a").status_code == 201
        face = enrol(a, "eileen", people["eileen"], "site-a").json()["faces"][0]["face_id"]
        assert until(lambda: identify(b, people["eileen"], "site-a").status_code == 200)
        assert until(lambda: identify(b, people["eileen"], "site-a").json()["gallery_faces"] == 2)
        assert identify(b, people["eileen"], "site-a").json()["candidates"][0]["face_id"] == face
        assert identify(b, people["eileen"]).json()["candidates"] == []  # not in b's default collection
        assert b.delete("/collections/site-a").status_code == 200
        assert until(lambda: identify(a, people["eileen"], "site-a").status_code == 404)
        assert a.get("/info").json()["collections"] == 1
