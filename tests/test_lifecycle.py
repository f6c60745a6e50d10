"""Biometric data lifecycle and faults, on the embedded (SQLite) store.

Deletion that deletes (no embedding, map or crop left in the database files), one transaction
per enrolment, readers that see committed data only, retries recognised by their idempotency key,
overload answered 503 before detection starts, a stuck store that bounds enrolment and never
blocks matching, and a service that starts read-only on a full disk and recovers by itself. The
PostgreSQL counterparts are in tests/test_shared_store.py.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.errors import GalleryStoreError, Overloaded
from service.store import Enrolment, FaceRecord, SQLiteGalleryStore
from tests.conftest import encode
from tests.servers import Server, free_port, start_server, wait_ready

Client = TestClient | httpx.Client


@pytest.fixture(scope="module")
def mirrored(astronaut: np.ndarray) -> bytes:
    return encode(np.ascontiguousarray(astronaut[:, ::-1]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def client(weights: Path, data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(weights=weights, data_dir=data_dir, torch_threads=2, store_crops=True, store_timeout_s=1.0)
    with TestClient(create_app(settings)) as c:
        yield c


def enrol(client: Client, subject: str, *images: bytes, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post("/gallery", data={"subject": subject}, files=files, headers=headers)


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code, body
    if status == 503:
        assert r.headers["retry-after"] == "1"
    return body  # type: ignore[no-any-return]


# -- deletion --------------------------------------------------------------------------------


def traces(face: FaceRecord) -> dict[str, bytes]:
    """Windows of a face's stored bytes: finding any of them in a file means the face is recoverable from it."""
    emb, fmap = face.embedding.astype(np.float32).tobytes(), face.feature_map.astype(np.float16).tobytes()
    assert face.crop is not None
    return {
        "embedding": emb[:64],
        "embedding_end": emb[-64:],
        "map": fmap[:64],
        "map_middle": fmap[len(fmap) // 2 : len(fmap) // 2 + 64],
        "map_end": fmap[-64:],
        "crop": face.crop[len(face.crop) // 2 : len(face.crop) // 2 + 64],
    }


def found_in(folder: Path, face: FaceRecord) -> list[str]:
    contents = b"".join(p.read_bytes() for p in sorted(folder.glob("gallery.sqlite3*")))
    return sorted(name for name, window in traces(face).items() if window in contents)


class TestDeletion:
    def test_deleted_faces_leave_no_biometric_bytes_in_the_database_files(
        self, client: TestClient, data_dir: Path, photo: bytes, mirrored: bytes
    ) -> None:
        r = enrol(client, "erase-me", photo, mirrored)
        assert r.status_code == 201, r.text
        kept_id, gone_id = (f["face_id"] for f in r.json()["faces"])
        store = client.app.state.oaml.gallery.store  # type: ignore[attr-defined]
        kept, gone = store.face(kept_id), store.face(gone_id)
        everything = sorted(traces(kept))
        assert found_in(data_dir, kept) == everything and found_in(data_dir, gone) == everything  # the search works
        assert client.delete(f"/gallery/erase-me/faces/{gone_id}").status_code == 200
        assert found_in(data_dir, gone) == []
        assert found_in(data_dir, kept) == everything  # the other face is still there, byte for byte
        assert client.delete("/gallery/erase-me").status_code == 200
        assert found_in(data_dir, kept) == []


# -- one transaction, committed reads, answers from the commit ------------------------------------


class TestOneTransaction:
    def test_an_enrolment_that_fails_half_way_writes_nothing(
        self, client: TestClient, data_dir: Path, photo: bytes
    ) -> None:
        db = sqlite3.connect(data_dir / "gallery.sqlite3", isolation_level=None)
        db.execute(  # the faces' insert fails after the subject's row was written, as a full disk would
            "CREATE TRIGGER fail_half BEFORE INSERT ON faces WHEN NEW.subject = 'half' "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        try:
            problem(enrol(client, "half", photo), 503, "STORE_UNAVAILABLE")
        finally:
            db.execute("DROP TRIGGER fail_half")
            db.close()
        problem(client.get("/gallery/half"), 404, "SUBJECT_NOT_FOUND")
        assert "half" not in client.app.state.oaml.gallery.collection("default").names  # type: ignore[attr-defined]

    def test_readers_see_committed_faces_only(self, tmp_path: Path) -> None:
        store = SQLiteGalleryStore(tmp_path / "g.sqlite3", "v1")
        rng = np.random.default_rng(0)
        face = FaceRecord(
            "f1", "s", rng.normal(size=512).astype(np.float32), np.zeros((512, 7, 7), np.float16),
            np.ones((7, 7), np.float32), 20.0, 0.0, 0.9, None, time.time(),
        )  # fmt: skip
        inside, release = threading.Event(), threading.Event()

        def render(total: int) -> str:  # runs inside the transaction
            inside.set()
            release.wait(30)
            return f'{{"total": {total}}}'

        writer = threading.Thread(target=store.enrol, args=(Enrolment("s", None, None, [face]), "k", "h", render))
        writer.start()
        try:
            assert inside.wait(30)
            with ThreadPoolExecutor(1) as reader:  # another thread, as the service's readers are
                seen = reader.submit(
                    lambda: (store.subjects(0, 10), [f.face_id for f in store.iter_faces()], store.answer_for("k"))
                ).result(timeout=30)
        finally:
            release.set()
            writer.join()
        assert seen == (([], 0), [], None)
        assert [f.face_id for f in store.iter_faces()] == ["f1"] and store.answer_for("k") is not None
        store.close()

    def test_the_answer_is_built_from_the_commit_not_from_a_read_after_it(
        self, client: TestClient, photo: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = client.app.state.oaml.gallery.store  # type: ignore[attr-defined]

        def unreadable(*_: object) -> None:
            raise GalleryStoreError("the gallery database cannot be read right now; retry later")

        for read in ("subject", "subjects", "faces_of", "face"):
            monkeypatch.setattr(store, read, unreadable)  # the database goes away right after the commit
        r = enrol(client, "after-commit", photo)
        assert r.status_code == 201, r.text
        assert r.json()["total_faces"] == 1 and len(r.json()["faces"]) == 1

    def test_an_index_that_fails_after_the_commit_is_reconciled_with_the_store(
        self, client: TestClient, photo: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        index = client.app.state.oaml.gallery.index  # type: ignore[attr-defined]
        add, failed = index.add_records, []

        def once(records: list[FaceRecord]) -> None:
            if not failed:
                failed.append(1)
                raise RuntimeError("device out of memory")
            add(records)

        monkeypatch.setattr(index, "add_records", once)
        r = enrol(client, "reconciled", photo)
        assert r.status_code == 201 and failed == [1], r.text
        assert r.json()["faces"][0]["face_id"] in index  # searchable: the reconcile added what was committed

    def test_an_expired_key_is_a_new_key(self, tmp_path: Path) -> None:
        store = SQLiteGalleryStore(tmp_path / "g.sqlite3", "v1")
        face = FaceRecord(
            "f1", "s", np.ones(512, np.float32), np.zeros((512, 7, 7), np.float16), np.ones((7, 7), np.float32),
            20.0, 0.0, 0.9, None, time.time(),
        )  # fmt: skip
        assert store.enrol(Enrolment("s", None, None, [face]), "k", "h", lambda n: "first").body == "first"
        db = sqlite3.connect(tmp_path / "g.sqlite3", isolation_level=None)
        db.execute("UPDATE idempotency SET created_at = created_at - 86401")
        db.close()
        assert store.answer_for("k") is None
        face.face_id = "f2"
        again = store.enrol(Enrolment("s", None, None, [face]), "k", "h", lambda n: "second")
        assert again.replayed is None and again.body == "second" and again.total_faces == 2
        store.close()


# -- idempotent retries ------------------------------------------------------------------------


class TestIdempotency:
    def test_a_retry_with_the_key_gets_the_first_answer_and_enrols_nothing_more(
        self, client: TestClient, photo: bytes, mirrored: bytes
    ) -> None:
        key = str(uuid.uuid4())
        first = enrol(client, "retry", photo, key=key)
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers
        again = enrol(client, "retry", photo, key=key)
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        assert len(client.get("/gallery/retry").json()["face_list"]) == 1
        problem(enrol(client, "retry", mirrored, key=key), 422, "IDEMPOTENCY_KEY_REUSED")
        problem(enrol(client, "other", photo, key=key), 422, "IDEMPOTENCY_KEY_REUSED")
        for bad in ("", "with space", "x" * 256):
            assert (
                problem(enrol(client, "retry", photo, key=bad), 422, "VALIDATION_ERROR")["field"] == "Idempotency-Key"
            )
        assert client.delete("/gallery/retry").status_code == 200  # the answer goes with the subject ...
        late = problem(enrol(client, "retry", photo, key=key), 422, "IDEMPOTENCY_KEY_REUSED")
        assert "deleted" in late["detail"]  # ... and a late retry does not enrol the deleted subject again
        problem(client.get("/gallery/retry"), 404, "SUBJECT_NOT_FOUND")
        assert enrol(client, "retry", photo, key=str(uuid.uuid4())).status_code == 201  # a new key does

    def test_concurrent_requests_with_one_key_enrol_once(self, client: TestClient, photo: bytes) -> None:
        key = str(uuid.uuid4())
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: enrol(client, "together", photo, key=key), range(4)))
        assert [a.status_code for a in answers] == [201] * 4
        assert len({a.json()["faces"][0]["face_id"] for a in answers}) == 1
        assert len(client.get("/gallery/together").json()["face_list"]) == 1
        assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 3


# -- overload ----------------------------------------------------------------------------------


def test_detection_is_admitted_before_it_runs(weights: Path, tmp_path: Path, photo: bytes) -> None:
    """A full queue refuses new photos at once, on a CPU host too, instead of queueing them behind detection."""
    settings = Settings(
        weights=weights, data_dir=tmp_path, torch_threads=1, queue_size=2, max_images_per_request=2, detection_workers=1
    )
    with TestClient(create_app(settings)) as c:
        engine = c.app.state.oaml.engine  # type: ignore[attr-defined]
        slow, align = threading.Event(), engine._align_one

        def held(*args: Any) -> Any:
            slow.wait(30)  # the first request's photos hold the queue's two places
            return align(*args)

        engine._align_one = held
        pair = {"image_a": ("a.png", photo, "image/png"), "image_b": ("b.png", photo, "image/png")}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/verify", files=pair)
            deadline = time.time() + 30
            while engine.queue_depth < 2 and time.time() < deadline:
                time.sleep(0.01)
            refused = [c.post("/verify", files=pair) for _ in range(3)]
            refused.append(enrol(c, "later", photo))
            slow.set()
            assert first.result(timeout=60).status_code == 200
        for r in refused:
            problem(r, 503, "OVERLOADED")
        assert c.post("/verify", files=pair).status_code == 200  # places released


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_overload_during_enrolment_is_503_not_a_rejected_photo(
    weights: Path, tmp_path: Path, photo: bytes, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(weights=weights, data_dir=tmp_path, torch_threads=1, detector_backend=backend)
    with TestClient(create_app(settings)) as c:
        engine = c.app.state.oaml.engine  # type: ignore[attr-defined]

        def full(n: int) -> None:
            raise Overloaded("inference queue is full (256 faces waiting); retry later")

        monkeypatch.setattr(engine, "_admit", full)
        problem(enrol(c, "busy", photo, photo), 503, "OVERLOADED")
        problem(c.post("/identify", files={"image": ("a.png", photo, "image/png")}), 503, "OVERLOADED")
        aligned = {"image": ("a.png", encode(np.zeros((112, 112, 3), np.uint8)), "image/png")}
        problem(c.post("/identify", files=aligned, data={"aligned": "true"}), 503, "OVERLOADED")
        monkeypatch.undo()
        problem(c.get("/gallery/busy"), 404, "SUBJECT_NOT_FOUND")


# -- a stuck store -----------------------------------------------------------------------------


def match_while_writes_wait(client: Client, photo: bytes, hold: Callable[[], Any], release: Callable[[], Any]) -> None:
    """With the gallery's write lock held elsewhere, enrolments wait (bounded) and fail 503; matching and reads
    are answered meanwhile, before the lock is released. Shared by the SQLite and PostgreSQL tests."""
    assert enrol(client, "before-the-lock", photo).status_code == 201
    hold()
    try:
        with ThreadPoolExecutor(3) as pool:
            waiting: list[Future[httpx.Response]] = [pool.submit(enrol, client, f"stuck{i}", photo) for i in range(3)]
            pair = {"image_a": ("a.png", photo, "image/png"), "image_b": ("b.png", photo, "image/png")}
            matched = [
                client.post("/verify", files=pair),
                client.post("/identify", files={"image": ("a.png", photo, "image/png")}),
                client.get("/gallery"),
                client.get("/gallery/before-the-lock"),
            ]
            assert [r.status_code for r in matched] == [200] * 4, [r.text for r in matched]
            assert matched[1].json()["candidates"]  # the gallery was searched
            answers = [f.result(timeout=120) for f in waiting]  # bounded: they come back while the lock is held
        for r in answers:
            problem(r, 503, "STORE_UNAVAILABLE")
    finally:
        release()
    assert enrol(client, "after-the-lock", photo).status_code == 201
    for i in range(3):
        assert client.get(f"/gallery/stuck{i}").status_code == 404  # nothing half-written


def test_a_held_write_lock_bounds_enrolment_and_never_blocks_matching(
    client: TestClient, data_dir: Path, photo: bytes
) -> None:
    other = sqlite3.connect(data_dir / "gallery.sqlite3", isolation_level=None, check_same_thread=False)
    match_while_writes_wait(
        client, photo, lambda: other.execute("BEGIN IMMEDIATE"), lambda: (other.execute("ROLLBACK"), other.close())
    )


# -- a full disk: refused writes, a read-only start, recovery -----------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, to fill for real; skipped where mounting is not allowed (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_refuses_writes_then_the_service_restarts_read_only_and_recovers(
    weights: Path, small_disk: Path, photo: bytes, mirrored: bytes
) -> None:
    data, port = small_disk / "gallery", free_port()

    def serve() -> tuple[Server, httpx.Client]:
        proc = start_server(weights, data, port)
        wait_ready(proc, port)
        return proc, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    proc, c = serve()
    acknowledged: list[str] = []
    statuses: list[int] = []
    try:
        for i in range(3):
            r = enrol(c, f"early{i}", photo)
            assert r.status_code == 201, r.text
            acknowledged.append(r.json()["faces"][0]["face_id"])
        filler = fill(small_disk)
        for i in range(4):
            r = enrol(c, f"full{i}", photo, mirrored)
            statuses.append(r.status_code)
            if r.status_code == 201:
                acknowledged += [f["face_id"] for f in r.json()["faces"]]
            else:
                problem(r, 503, "STORE_UNAVAILABLE")
        assert 503 in statuses and 500 not in statuses
        assert c.post("/identify", files={"image": ("a.png", photo, "image/png")}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # a clean shutdown, whose checkpoint meets the full disk
        proc.wait(timeout=60)
    proc, c = serve()  # the disk is still full
    try:
        assert c.get("/ready").json()["gallery_writable"] is False
        info = c.get("/info").json()
        assert info["gallery_writable"] is False and info["gallery_faces"] == len(acknowledged)
        found = c.post("/identify", files={"image": ("a.png", photo, "image/png")}).json()
        assert found["candidates"][0]["face_id"] in acknowledged
        problem(enrol(c, "while-read-only", photo), 503, "STORE_READ_ONLY")
        problem(c.delete("/gallery/early0"), 503, "STORE_READ_ONLY")
        filler.unlink()  # space returns: the service leaves read-only mode by itself
        deadline = time.time() + 30
        while (r := enrol(c, "after-space-returned", photo)).status_code != 201 and time.time() < deadline:
            time.sleep(0.5)
        assert r.status_code == 201, r.text
        assert c.get("/ready").json()["gallery_writable"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    db = sqlite3.connect(data / "gallery.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {row[0] for row in db.execute("SELECT face_id FROM faces")}
        assert set(acknowledged) <= stored
        empty = db.execute(
            "SELECT COUNT(*) FROM subjects s WHERE NOT EXISTS (SELECT 1 FROM faces f WHERE f.subject = s.subject)"
        )
        assert empty.fetchone() == (0,)  # refused enrolments left no subjects behind
    finally:
        db.close()


def test_a_slow_client_holding_many_connections_costs_no_enrolment(weights: Path, tmp_path: Path, photo: bytes) -> None:
    port = free_port()
    proc = start_server(weights, tmp_path, port, OAML_HEADER_TIMEOUT="2")
    slow: list[Any] = []
    try:
        wait_ready(proc, port)
        for _ in range(60):  # headers sent, then a body that drips: the header timeout does not apply
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(
                b"POST /gallery HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 1000000\r\n\r\n--b\r\n"
            )
            slow.append(s)
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(0.5):
                for s in slow:
                    try:
                        s.sendall(b"x")
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        acknowledged, statuses = [], []
        for i in range(6):
            r = enrol(c, f"busy{i}", photo)
            statuses.append(r.status_code)
            if r.status_code == 201:
                acknowledged.append(r.json()["faces"][0]["face_id"])
        pair = {"image_a": ("a.png", photo, "image/png"), "image_b": ("b.png", photo, "image/png")}
        statuses.append(c.post("/verify", files=pair).status_code)
        stop.set()
        assert 500 not in statuses and len(acknowledged) == 6, statuses
        stored = sum(len(c.get(f"/gallery/busy{i}").json()["face_list"]) for i in range(6))
        assert stored == 6
    finally:
        for s in slow:
            s.close()
        proc.kill()
        proc.wait()


def test_work_handed_to_a_stopped_engine_fails_instead_of_waiting_forever(weights: Path, tmp_path: Path) -> None:
    from service.engine import Engine
    from service.errors import Stopping

    engine = Engine(Settings(weights=weights, data_dir=tmp_path, torch_threads=1))
    engine.start()
    assert engine.call_device(lambda: 42) == 42
    engine.stop()
    with ThreadPoolExecutor(1) as pool:  # a store thread reaching the index after shutdown began
        late = pool.submit(engine.call_device, lambda: 43)
        with pytest.raises(Stopping):
            late.result(timeout=30)
