"""Galleries that survive a model change (issue #33): each collection matched with its own model version, two
models served side by side, migration from stored crops in the background (dry run, switch, resume after
kill -9), enrolments and deletions during it, faces without crops, rollback, PostgreSQL replicas switching
together, and weights whose version does not name their tensors refused.

Real weights: A, the shipped ones (the default); B, the previous release in this repository's history (commit
308e7e0, LFW 84% where A has 91%), served side by side from one weights folder.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from model.errors import CheckpointError
from service import migration
from service.app import create_app
from service.config import Settings
from service.store import SQLiteGalleryStore
from tests.conftest import SHARED_DATA, encode
from tests.servers import free_port, start_server, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "oaml_ir18.safetensors"
PREVIOUS_RELEASE = "308e7e0"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder holding A (the shipped weights) and B (the previous release, from git history)."""
    folder = tmp_path_factory.mktemp("weights")
    done = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{PREVIOUS_RELEASE}:weights/oaml_ir18.safetensors"], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"the previous release's weights (commit {PREVIOUS_RELEASE}) are not in this checkout's history")
    (folder / "previous.safetensors").write_bytes(done.stdout)
    (folder / "oaml_ir18.safetensors").symlink_to(SHIPPED)
    return folder


@pytest.fixture(scope="module")
def versions(weights_dir: Path) -> tuple[str, str]:
    a = read_metadata(weights_dir / "oaml_ir18.safetensors")["model_version"]
    b = read_metadata(weights_dir / "previous.safetensors")["model_version"]
    assert a != b
    return a, b


@pytest.fixture(scope="module")
def people(astronaut: np.ndarray) -> dict[str, tuple[bytes, bytes, bool]]:
    """Subject -> (photo to enrol, the photo to identify, aligned?): two public-domain people, and ten identities
    of ../shared's celeba_extra (never trained on; aligned crops) where it is at hand. Each probe is its enrolled
    photo mirrored: these tests are about the gallery keeping its people through model changes, not about how
    well either model tells people apart (bench/RESULTS.md and the model card measure that)."""
    from skimage import data

    camera = np.repeat(data.camera()[..., None], 3, axis=2)
    found = {
        "eileen": (encode(astronaut), encode(astronaut[:, ::-1].copy(), "JPEG", quality=90), False),
        "cameraman": (encode(camera), encode(camera[:, ::-1].copy(), "JPEG", quality=90), False),
    }
    cache = SHARED_DATA / "train" / "aligned" / "celeba_extra"
    if cache.is_dir():  # the probe is the enrolled crop mirrored: what is tested is the gallery, not the model
        from PIL import Image

        for folder in sorted(p for p in cache.iterdir() if p.is_dir())[:10]:
            shot = sorted(folder.glob("*.jpg"))[0]
            mirrored = np.asarray(Image.open(shot).convert("RGB"))[:, ::-1].copy()
            found[f"c-{folder.name}"] = (shot.read_bytes(), encode(mirrored, "JPEG", quality=90), True)
    return found


def settings(weights_dir: Path, data_dir: Path, **kwargs: Any) -> Settings:
    return Settings(
        weights=weights_dir / "oaml_ir18.safetensors",
        weights_dir=weights_dir,
        data_dir=data_dir,
        torch_threads=2,
        **kwargs,
    )  # type: ignore[arg-type]


def enrol(c: Any, subject: str, photo: bytes, aligned: bool, collection: str = "site") -> Any:
    return c.post(
        "/gallery",
        params={"collection": collection},
        data={"subject": subject, "aligned": str(aligned).lower()},
        files=[("images", ("p.jpg", photo, "image/jpeg"))],
    )


def identify(c: Any, photo: bytes, aligned: bool, collection: str = "site") -> dict[str, Any]:
    r = c.post(
        "/identify",
        params={"collection": collection},
        data={"aligned": str(aligned).lower(), "threshold": "-1000", "top_k": "3"},
        files={"image": ("q.jpg", photo, "image/jpeg")},
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def everyone_found(c: Any, people: dict[str, tuple[bytes, bytes, bool]], version: str) -> None:
    """Each enrolled person is the first candidate for their other photo, answered by model ``version``."""
    for subject, (_, probe, aligned) in people.items():
        answer = identify(c, probe, aligned)
        assert answer["model_version"] == version
        assert answer["candidates"][0]["subject"] == subject, (subject, answer["candidates"])


def until(check: Callable[[], Any], timeout: float = 300.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError("timed out")


def migration_state(c: Any, collection: str = "site") -> dict[str, Any]:
    return c.get(f"/collections/{collection}/migration").json()  # type: ignore[no-any-return]


def test_a_collection_moves_to_other_weights_looks_first_and_comes_back(
    weights_dir: Path,
    versions: tuple[str, str],
    people: dict[str, tuple[bytes, bytes, bool]],
    tmp_path: Path,
) -> None:
    a, b = versions
    with TestClient(create_app(settings(weights_dir, tmp_path))) as c:
        created = c.post("/collections", json={"name": "site", "store_crops": True}).json()
        assert created["model_version"] == a and created["store_crops"] is True  # a new collection: the default
        for subject, (photo, _, aligned) in people.items():
            assert enrol(c, subject, photo, aligned).status_code == 201
        everyone_found(c, people, a)  # before

        # a dry run: every face re-embedded by B in the background, a report, no switch
        r = c.post("/collections/site/migration", json={"to": b, "switch": False})
        assert r.status_code == 202, r.text
        ready = until(lambda: (s := migration_state(c))["migration"]["state"] == "ready" and s)
        report = ready["migration"]["report"]
        assert ready["model_version"] == a and ready["migration"]["done"] == ready["migration"]["faces"] == len(people)
        assert (report["old"], report["new"], report["faces"]) == (a, b, len(people))
        assert set(report["presets"]) == {"lenient", "balanced", "strict"}
        assert {"threshold", "pairs_passing", "new_lookalikes"} <= set(report["presets"]["balanced"])
        everyone_found(c, people, a)  # during: A still answers
        assert c.get("/collections/site").json()["migration"]["state"] == "ready"

        # the switch: B answers, A kept for rollback
        switched = c.post("/collections/site/migration/switch").json()
        assert (switched["model_version"], switched["previous_version"], switched["migration"]) == (b, a, None)
        everyone_found(c, people, b)  # after
        assert c.get("/info").json()["model_version"] == a  # /verify and new collections keep the default

        # an enrolment after the switch lands in both versions: a rollback finds it
        eileen_again = people["eileen"][1]
        assert enrol(c, "eileen-2", eileen_again, False).status_code == 201
        back = c.post("/collections/site/rollback").json()
        assert (back["model_version"], back["previous_version"]) == (a, b)
        assert identify(c, eileen_again, False)["candidates"][0]["subject"] in ("eileen", "eileen-2")
        everyone_found(c, {k: v for k, v in people.items() if k != "eileen"}, a)

        # dropping the previous version erases its data; no rollback after
        dropped = c.delete("/collections/site/previous").json()
        assert dropped["previous_version"] is None
        store = c.app.state.oaml.gallery.store  # type: ignore[attr-defined]
        assert store.version_coverage("site", b) == (0, len(people) + 1)
        assert c.post("/collections/site/rollback").json()["code"] == "MIGRATION_CONFLICT"


def test_faces_without_crops_stay_on_their_model_and_say_so(
    weights_dir: Path, versions: tuple[str, str], people: dict[str, tuple[bytes, bytes, bool]], tmp_path: Path
) -> None:
    a, b = versions
    with TestClient(create_app(settings(weights_dir, tmp_path))) as c:  # crops not kept: the default
        c.post("/collections", json={"name": "site"})
        for subject in ("eileen", "cameraman"):
            photo, _, aligned = people[subject]
            assert enrol(c, subject, photo, aligned).status_code == 201
        r = c.post("/collections/site/migration", json={"to": b})
        assert r.status_code == 409 and r.json()["code"] == "FACES_WITHOUT_CROPS", r.text
        body = r.json()
        assert body["faces_without_crops"] == 2
        assert [s["subject"] for s in body["subjects"]] == ["cameraman", "eileen"]
        assert "re-enrol" in body["detail"] and "missing='drop'" in body["detail"]
        assert migration_state(c)["model_version"] == a and migration_state(c)["migration"] is None  # stays on A

        # crops kept from now on: a face enrolled now can move, the old ones cannot; dropping them is explicit
        assert c.patch("/collections/site", json={"store_crops": True}).json()["store_crops"] is True
        photo, _, aligned = people["eileen"]
        assert enrol(c, "eileen-kept", photo, aligned).status_code == 201
        r = c.post("/collections/site/migration", json={"to": b, "missing": "drop"})
        assert r.status_code == 202 and r.json()["migration"]["without_crops"] == 2
        done = until(lambda: (s := migration_state(c))["migration"] is None and s)
        assert done["model_version"] == b
        subjects = {
            s["subject"]: s["face_count"] for s in c.get("/gallery", params={"collection": "site"}).json()["subjects"]
        }
        assert subjects == {"cameraman": 0, "eileen": 0, "eileen-kept": 1}  # their faces deleted, as asked


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_heads_only_release_moves_faces_without_crops_from_their_stored_maps(
    weights_dir: Path,
    versions: tuple[str, str],
    people: dict[str, tuple[bytes, bytes, bool]],
    tmp_path: Path,
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    """C: the shipped trunk with new heads (a 64-channel projection and another occlusion head), as `oaml heads
    export` makes. A collection of A enrolled without crops moves to C in full: C's data is made from what A
    stored (the trunk's own maps), and matches what C makes of the same photo, within the engines' rounding."""
    from model.training.heads import HeadConfig, Heads, export_heads

    a, _ = versions
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "oaml_ir18.safetensors").symlink_to(SHIPPED)
    base, _ = load_checkpoint(SHIPPED)
    heads = Heads(base, HeadConfig(channels=64)).eval()
    with torch.no_grad():
        for p in heads.occlusion.parameters():
            p.mul_(1.5)  # another occlusion head: the visibility must come from C's, not be copied from A's
    c_version = export_heads(SHIPPED, heads, folder / "heads64.safetensors", {})["model_version"]
    subjects = ("eileen", "cameraman")
    extra: dict[str, Any] = {}
    if store == "postgresql":
        pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
        extra["gallery_url"] = request.getfixturevalue("pg_url")
    with TestClient(create_app(settings(folder, tmp_path / "a", **extra))) as c:  # crops not kept: the default
        c.post("/collections", json={"name": "site"})
        for subject in subjects:
            photo, _, aligned = people[subject]
            assert enrol(c, subject, photo, aligned).status_code == 201
        r = c.post("/collections/site/migration", json={"to": c_version})
        assert r.status_code == 202, r.text
        assert r.json()["migration"]["without_crops"] == 0 and r.json()["migration"]["derived_from"] == a
        done = until(lambda: (s := migration_state(c))["migration"] is None and s)
        assert done["model_version"] == c_version and done["previous_version"] == a
        everyone_found(c, {k: people[k] for k in subjects}, c_version)
        held = c.app.state.oaml.gallery.store  # type: ignore[attr-defined]
        derived = {f.subject: f for f in held.faces_for("site", c_version)}
        stored = {f.subject: f for f in held.faces_for("site", a)}
    on_c = Settings(weights=folder / "heads64.safetensors", data_dir=tmp_path / "c", torch_threads=2)  # type: ignore[call-arg]
    with TestClient(create_app(on_c)) as c:
        for subject in subjects:  # the same photos enrolled afresh by C: what a re-embedding would have made
            photo, _, aligned = people[subject]
            assert enrol(c, subject, photo, aligned, collection="default").status_code == 201
        fresh = {f.subject: f for f in c.app.state.oaml.gallery.store.faces_for("default", c_version)}  # type: ignore[attr-defined]

    def cosine(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    for subject in subjects:
        d, f, s = derived[subject], fresh[subject], stored[subject]
        assert d.feature_map.shape == f.feature_map.shape == (64, 7, 7) and s.feature_map.shape == (512, 7, 7)
        assert np.array_equal(d.embedding, s.embedding) and d.norm == s.norm  # the trunk's: as stored
        assert cosine(d.embedding, f.embedding) > 0.99 and cosine(d.feature_map, f.feature_map) > 0.99
        # the int8 default engine of one service against the fp32 second engine of the other: measured 0.07 at most
        assert np.abs(d.occlusion - f.occlusion).max() < 0.15 and np.abs(d.occlusion - f.occlusion).mean() < 0.01
        assert np.abs(d.occlusion - s.occlusion).max() > 0.05  # C's occlusion head, not A's


def test_enrolments_and_deletions_during_a_migration_land_in_both_versions(
    weights_dir: Path,
    versions: tuple[str, str],
    people: dict[str, tuple[bytes, bytes, bool]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = versions
    gate = threading.Event()
    real = migration._embed_patiently

    async def held(engine: Any, crops: np.ndarray, version: str) -> list[Any]:
        import asyncio

        await asyncio.to_thread(gate.wait, 120)  # the migration stays running until the test lets it go
        return await real(engine, crops, version)

    monkeypatch.setattr(migration, "_embed_patiently", held)
    with TestClient(create_app(settings(weights_dir, tmp_path, store_crops=True, migration_batch=1))) as c:
        c.post("/collections", json={"name": "site"})
        for subject in ("eileen", "cameraman"):
            photo, _, aligned = people[subject]
            assert enrol(c, subject, photo, aligned).status_code == 201
        assert c.post("/collections/site/migration", json={"to": b}).status_code == 202
        assert migration_state(c)["migration"]["state"] == "running"
        store = c.app.state.oaml.gallery.store  # type: ignore[attr-defined]
        photo, probe, aligned = people["eileen"]
        new_face = enrol(c, "eileen-late", probe, aligned).json()["faces"][0]["face_id"]
        assert store.face(new_face, b).model_version == b  # written at both versions as it was enrolled
        assert c.delete("/gallery/cameraman", params={"collection": "site"}).status_code == 200
        gate.set()
        done = until(lambda: (s := migration_state(c))["migration"] is None and s)
        assert done["model_version"] == b
        assert store.version_coverage("site", b) == (2, 2)  # eileen and eileen-late, cameraman gone from both
        assert store.version_coverage("site", a) == (2, 2)
        found = identify(c, people["eileen"][1], False)
        assert found["model_version"] == b and found["candidates"][0]["subject"] in ("eileen", "eileen-late")
        assert "cameraman" not in {x["subject"] for x in identify(c, people["cameraman"][1], False)["candidates"]}


def test_a_migration_killed_mid_way_resumes_where_it_stopped(
    weights_dir: Path, versions: tuple[str, str], astronaut: np.ndarray, tmp_path: Path
) -> None:
    a, b = versions
    port = free_port()
    env = {
        "OAML_WEIGHTS_DIR": str(weights_dir),
        "OAML_STORE_CROPS": "true",
        "OAML_MIGRATION_BATCH": "1",
        "OAML_TORCH_THREADS": "2",
    }
    weights = weights_dir / "oaml_ir18.safetensors"
    url = f"http://127.0.0.1:{port}"
    shots = [
        encode(np.ascontiguousarray(astronaut[:, ::-1] if i % 2 else astronaut), "JPEG", quality=70 + i)
        for i in range(40)
    ]
    proc = start_server(weights, tmp_path, port, **env)
    try:
        wait_ready(proc, port)
        for i, shot in enumerate(shots):
            assert enrol(httpx.Client(base_url=url, timeout=60), f"s{i}", shot, False, "default").status_code == 201
        assert httpx.post(f"{url}/collections/default/migration", json={"to": b}, timeout=30).status_code == 202

        def half_way() -> dict[str, Any] | None:
            m = httpx.get(f"{url}/collections/default/migration").json()["migration"]
            assert m is not None, "the migration ended before it could be killed"
            return m if 0 < m["done"] < len(shots) else None

        part = until(half_way, every=0.05)
        assert part["state"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = SQLiteGalleryStore(tmp_path / "gallery.sqlite3", a)
    have, total = store.version_coverage("default", b)
    store.close()
    assert 0 < have < total == len(shots)  # stopped half way: some faces have B, the collection is still on A
    proc = start_server(weights, tmp_path, port, **env)
    try:
        wait_ready(proc, port)
        during = httpx.post(f"{url}/identify", files={"image": ("q.jpg", shots[0], "image/jpeg")}, timeout=60).json()
        assert during["model_version"] in (a, b)  # one version per search, whichever it is at this moment
        done = until(lambda: (s := httpx.get(f"{url}/collections/default/migration").json())["migration"] is None and s)
        assert done["model_version"] == b and done["previous_version"] == a
        after = httpx.post(f"{url}/identify", files={"image": ("q.jpg", shots[0], "image/jpeg")}, timeout=60).json()
        assert after["model_version"] == b and after["candidates"][0]["subject"].startswith("s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_replicas_on_postgresql_switch_together(
    weights_dir: Path,
    versions: tuple[str, str],
    people: dict[str, tuple[bytes, bytes, bool]],
    tmp_path: Path,
    pg_url: str,
) -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    a, b = versions
    one = TestClient(
        create_app(settings(weights_dir, tmp_path / "one", gallery_url=pg_url, store_crops=True, gallery_poll_s=0.2))
    )
    two = TestClient(create_app(settings(weights_dir, tmp_path / "two", gallery_url=pg_url, gallery_poll_s=0.2)))
    with one, two:
        one.post("/collections", json={"name": "site"})
        for subject in ("eileen", "cameraman"):
            photo, _, aligned = people[subject]
            assert enrol(one, subject, photo, aligned).status_code == 201
        until(lambda: len(two.get("/gallery", params={"collection": "site"}).json()["subjects"]) == 2)
        assert identify(two, people["eileen"][1], False)["model_version"] == a
        assert one.post("/collections/site/migration", json={"to": b}).status_code == 202
        until(lambda: migration_state(one)["migration"] is None)
        # the other replica loaded B when it saw the migration, and follows the switch from the change log
        found = until(lambda: (x := identify(two, people["eileen"][1], False))["model_version"] == b and x, timeout=30)
        assert found["candidates"][0]["subject"] == "eileen"
        assert identify(one, people["cameraman"][1], False)["candidates"][0]["subject"] == "cameraman"


def test_weights_whose_version_names_other_tensors_are_refused(tmp_path: Path) -> None:
    import torch

    from model.net import build_model

    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    meta = save_checkpoint(build_model("ir_18").eval(), path)
    forged = dict(meta, model_version="ir_18-33578dd8d7d0")  # another file's version, these tensors
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"oaml": json.dumps(forged)})
    with pytest.raises(CheckpointError, match="does not name these tensors"):
        load_checkpoint(path)


def test_a_gallery_of_schema_2_gets_its_collections_versions(tmp_path: Path) -> None:
    import sqlite3

    from service.store import Enrolment
    from tests.conftest import fake_face

    store = SQLiteGalleryStore(tmp_path / "g.sqlite3", "ir_18-aaaa")
    store.enrol(Enrolment("s", None, None, [fake_face("f1", "s", 1)]))
    store.create_collection("empty")
    store.close()
    db = sqlite3.connect(tmp_path / "g.sqlite3", isolation_level=None)  # back to schema 2, as a release before wrote it
    for column in ("model_version", "previous_version", "migration", "store_crops", "switched_at"):
        db.execute(f"ALTER TABLE collections DROP COLUMN {column}")
    db.execute("DROP TABLE face_embeddings")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()
    again = SQLiteGalleryStore(tmp_path / "g.sqlite3", "ir_18-bbbb")  # served by other default weights now
    assert again.collection("default").model_version == "ir_18-aaaa"  # the version of its faces
    assert again.collection("empty").model_version is None  # no face: it takes the default with its first
    assert [f.face_id for f in again.faces_for("default", "ir_18-aaaa")] == ["f1"]
    again.close()


def test_the_migrate_command_says_where_a_derived_migration_takes_its_data() -> None:
    from oaml.migrate import _summary

    status = {"collection": "site", "model_version": "ir_18-a", "previous_version": None}
    running = {**status, "migration": {"to": "ir_18-b", "state": "running", "derived_from": "ir_18-a"}}
    assert "stored data at ir_18-a: no crops needed" in _summary(running)
    embedded = {**status, "migration": {"to": "ir_18-b", "state": "running", "derived_from": None}}
    assert "stored data" not in _summary(embedded) and "running" in _summary(embedded)
