"""PostgreSQL as a shared store of record: the store itself, its change feed, and replicas on one gallery.

Against a real server the suite starts (tests/pg.py); skipped with the reason when PostgreSQL or
psycopg is not installed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.errors import FaceNotFound, GalleryStoreError, SubjectNotFound
from service.store import EnrolCommit, Enrolment, FaceRecord, SQLiteGalleryStore
from tests.conftest import fake_face
from tests.pg import PostgresServer, running_postgres
from tests.servers import Server, free_port, start_server, wait_ready
from tests.test_lifecycle import match_while_writes_wait

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
from service.store_pg import MIGRATIONS, Change, ChangeFollower, PostgresGalleryStore  # noqa: E402


@pytest.fixture()
def url(pg_url: str) -> str:
    return pg_url


def record(face_id: str, subject: str, seed: int) -> FaceRecord:
    return fake_face(face_id, subject, seed)


def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class TestStore:
    @pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
    def test_both_stores_keep_the_same_records(self, kind: str, url: str, tmp_path: Path) -> None:
        store = (
            SQLiteGalleryStore(tmp_path / "g.sqlite3", "v1") if kind == "sqlite" else PostgresGalleryStore(url, "v1")
        )
        store.check_writable()
        done = store.enrol(Enrolment("bob", "Bob", {"team": "a", "n": [1, 2]}, [record("f1", "bob", 1)]))
        assert done == EnrolCommit(total_faces=1)
        store.enrol_many([Enrolment("al", None, None, [record("f3", "al", 3)])])
        done = store.enrol(Enrolment("bob", None, None, [record("f2", "bob", 2)]))  # keeps the name and metadata
        assert done.total_faces == 2
        bob = store.subject("bob")
        assert (bob.name, bob.metadata, bob.faces) == ("Bob", {"team": "a", "n": [1, 2]}, 2)
        store.update_subject("bob", {"name": None})  # a name can be cleared; what is not sent is kept
        assert (store.subject("bob").name, store.subject("bob").metadata) == (None, {"team": "a", "n": [1, 2]})
        store.update_subject("bob", {"name": "Bob", "metadata": {"team": "b"}})
        assert (store.subject("bob").name, store.subject("bob").metadata) == ("Bob", {"team": "b"})
        with pytest.raises(SubjectNotFound):
            store.update_subject("nobody", {"name": "x"})
        page, total = store.subjects(0, 1)
        assert total == 2 and [s.subject for s in page] == ["al"]
        got = store.face("f1")
        want = record("f1", "bob", 1)
        np.testing.assert_array_equal(got.feature_map, want.feature_map)
        np.testing.assert_array_equal(got.embedding, want.embedding)
        assert (got.box, got.crop, got.created_at) == (want.box, want.crop, want.created_at)
        assert [f.face_id for f in store.faces_of("bob")] == ["f1", "f2"]
        assert [f.face_id for f in store.iter_faces()] == ["f1", "f3", "f2"]
        store.delete_face("bob", "f1")
        with pytest.raises(FaceNotFound):
            store.delete_face("bob", "f1")
        with pytest.raises(SubjectNotFound):
            store.delete_subject("nobody")
        assert store.delete_subject("bob") == ["f2"]
        with pytest.raises(FaceNotFound):
            store.face("f2")
        assert store.collection("default").model_version == "v1"  # the version of its faces, recorded
        store.close()

    def test_migrations_apply_once_when_replicas_start_together(self, url: str) -> None:
        with ThreadPoolExecutor(4) as pool:
            stores = list(pool.map(lambda _: PostgresGalleryStore(url, "v1"), range(4)))
        with psycopg.connect(url) as conn:
            applied = sorted(conn.execute("SELECT version FROM oaml_migrations").fetchall())
        assert applied == [(version,) for version, _ in MIGRATIONS]  # each once, though four replicas raced
        for s in stores:
            s.close()

    def test_a_collection_keeps_the_version_of_its_faces_under_other_weights(self, url: str) -> None:
        store = PostgresGalleryStore(url, "v1")
        store.enrol(Enrolment("bob", None, None, [record("f1", "bob", 1)]))
        store.close()
        other = PostgresGalleryStore(url, "v2")  # a replica with other default weights
        assert other.collection("default").model_version == "v1"
        assert list(other.faces_for("default", "v2")) == [] and len(list(other.faces_for("default", "v1"))) == 1
        other.close()

    def test_an_unreachable_server_is_a_store_error_without_the_password(self) -> None:
        with pytest.raises(GalleryStoreError) as info:
            PostgresGalleryStore(f"postgresql://oaml:secret@127.0.0.1:{free_port()}/x?connect_timeout=2", "v1")
        assert "secret" not in str(info.value) and info.value.code == "STORE_UNAVAILABLE"

    def test_start_up_without_the_database_stops_in_one_line(self, weights: Path, tmp_path: Path) -> None:
        url = f"postgresql://oaml:secret@127.0.0.1:{free_port()}/oaml"
        proc = start_server(weights, tmp_path, free_port(), OAML_GALLERY_URL=url)
        out = proc.finish(timeout=90)
        assert proc.returncode == 2 and "Traceback" not in out and "secret" not in out
        assert "cannot open the gallery database (postgresql://oaml:***@127.0.0.1" in out


class TestChangeFeed:
    def test_a_follower_applies_other_writes_in_order_and_survives_a_dropped_connection(
        self, url: str, pg: PostgresServer
    ) -> None:
        writer = PostgresGalleryStore(url, "v1")
        reader = PostgresGalleryStore(url, "v1")
        seen: list[Change] = []
        lock = threading.Lock()

        def apply(changes: list[Change]) -> None:
            with lock:
                seen.extend(changes)

        follower = ChangeFollower(reader, apply, poll_s=30.0)  # notifications only
        follower.start()
        try:
            assert until(lambda: follower.connected)
            writer.enrol(Enrolment("bob", None, None, [record("f1", "bob", 1)]))
            started = time.perf_counter()
            assert until(lambda: any(c.face_id == "f1" for c in seen), timeout=5)
            assert time.perf_counter() - started < 2  # a notification, not the 30 s poll
            first_pid = follower.listener_pid
            assert first_pid is not None
            pg.terminate(first_pid)  # the listener's connection drops ...
            writer.enrol(Enrolment("bob", None, None, [record("f2", "bob", 2)]))  # ... while another replica writes
            writer.delete_face("bob", "f1")
            assert until(lambda: any(c.op == "delete" and c.face_id == "f1" for c in seen), timeout=10)
            assert follower.reconnects >= 1 and follower.listener_pid != first_pid
            with lock:
                seqs = [c.seq for c in seen]
                assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
                assert [(c.op, c.face_id) for c in seen if c.face_id] == [
                    ("add", "f1"),
                    ("add", "f2"),
                    ("delete", "f1"),
                ]
        finally:
            follower.stop()
            writer.close()
            reader.close()

    def test_the_change_log_is_pruned_once_every_replica_has_applied_it(self, url: str) -> None:
        writer, a, b = (PostgresGalleryStore(url, "v1") for _ in range(3))
        fa, fb = ChangeFollower(a, lambda _: None, poll_s=0.2), ChangeFollower(b, lambda _: None, poll_s=0.2)

        def logged(subject: str) -> int:
            with psycopg.connect(url) as conn:
                return int(
                    conn.execute("SELECT COUNT(*) FROM oaml_changes WHERE subject = %s", (subject,)).fetchone()[0]
                )

        try:
            writer.enrol(Enrolment("alice", "Alice", None, [record("f1", "alice", 1)]))
            writer.delete_subject("alice")
            fa.start()
            assert until(lambda: fa.seq == writer.last_seq())
            time.sleep(0.5)
            assert logged("alice") == 4  # b has not applied them yet: kept
            fb.start()
            assert until(lambda: logged("alice") == 0)  # both have: gone
        finally:
            fa.stop(), fb.stop()
            for store in (writer, a, b):
                store.close()

    def test_a_replica_silent_past_the_pruning_reconciles_when_it_returns(self, url: str) -> None:
        writer, live, away = (PostgresGalleryStore(url, "v1") for _ in range(3))
        resynced: list[int] = []
        returning = ChangeFollower(away, lambda _: None, resync=lambda: resynced.append(1))  # registered, then silent
        active = ChangeFollower(live, lambda _: None, poll_s=0.2, stale_after_s=0.5)
        try:
            time.sleep(1.0)
            active.start()
            writer.enrol(Enrolment("bob", None, None, [record("f1", "bob", 1)]))
            with psycopg.connect(url) as conn:
                assert until(lambda: conn.execute("SELECT COUNT(*) FROM oaml_changes").fetchone()[0] == 0)
            returning.catch_up()  # the log no longer reaches back to it
            assert resynced == [1] and returning.resyncs == 1 and returning.seq == writer.last_seq()
        finally:
            active.stop()
            for store in (writer, live, away):
                store.close()

    def test_an_enrolment_that_fails_half_way_writes_nothing(self, url: str) -> None:
        store = PostgresGalleryStore(url, "v1")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION fail_half() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$ "
                "LANGUAGE plpgsql; CREATE TRIGGER fail_half BEFORE INSERT ON oaml_faces FOR EACH ROW "
                "WHEN (NEW.subject = 'half') EXECUTE FUNCTION fail_half()"
            )
        with pytest.raises(GalleryStoreError) as failed:
            store.enrol(Enrolment("half", "Half", None, [record("f1", "half", 1)]))
        assert "injected failure" not in failed.value.message and "injected failure" in (failed.value.internal or "")
        with pytest.raises(SubjectNotFound):
            store.subject("half")
        assert store.changes_since(0) == []  # nothing logged either
        store.close()


def test_the_password_is_redacted_from_urls_and_messages() -> None:
    from service.store_pg import redacted

    assert redacted("postgresql://oaml:s3cret@db:5432/oaml") == "postgresql://oaml:***@db:5432/oaml"
    assert redacted("postgres://u:p%40ss@h/db?sslmode=require") == "postgres://u:***@h/db?sslmode=require"
    assert redacted("postgresql://oaml@db/oaml?password=s3cret&sslmode=require") == (
        "postgresql://oaml@db/oaml?password=***&sslmode=require"
    )
    assert redacted("host=db user=oaml password='a b\\'c' dbname=oaml") == "host=db user=oaml password=*** dbname=oaml"
    assert redacted("host=db PASSWORD = s3cret port=5432") == "host=db PASSWORD = *** port=5432"
    assert redacted("postgresql://db/oaml") == "postgresql://db/oaml"
    assert redacted("postgresql://oaml:a?b#c@db/oaml") == "postgresql://oaml:***@db/oaml"  # libpq takes these as is


# -- in process: a stuck writer, a delete racing the follower ------------------------------------


@pytest.fixture()
def app_on(weights: Path, tmp_path: Path, url: str) -> Iterator[TestClient]:
    settings = Settings(
        weights=weights, data_dir=tmp_path, gallery_url=url, torch_threads=1, store_timeout_s=1.0, gallery_poll_s=30
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_a_held_write_lock_bounds_enrolment_and_never_blocks_matching(
    app_on: TestClient, url: str, photo: bytes
) -> None:
    """Another connection holds the gallery's write lock (a stuck writer on any replica)."""
    from service.store_pg import _WRITE_LOCK

    holder = psycopg.connect(url, autocommit=True)
    match_while_writes_wait(
        app_on,
        photo,
        lambda: holder.execute("SELECT pg_advisory_lock(%s)", (_WRITE_LOCK,)),
        lambda: holder.close(),
    )


def test_a_local_delete_racing_the_follower_is_not_undone(
    app_on: TestClient, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = app_on.app.state.oaml  # type: ignore[attr-defined]
    gallery, store = state.gallery, state.gallery.store
    read, go, applied = threading.Event(), threading.Event(), threading.Event()
    fetch, apply = store.faces_by_id, gallery.apply_changes
    after: list[tuple[bool, bool]] = []  # (the delete had been answered, the face is indexed), after each apply
    answered = threading.Event()

    def paused(ids: list[str], versions: dict[str, str] | None = None) -> list[FaceRecord]:
        rows = fetch(ids, versions)
        if rows:
            read.set()  # the follower read the face ... and is slow to index it
            go.wait(30)
        return rows

    def recorded(shared: Any, changes: list[Change]) -> None:
        apply(shared, changes)
        after.append((answered.is_set(), "f-race" in gallery.index))
        applied.set()

    monkeypatch.setattr(store, "faces_by_id", paused)
    monkeypatch.setattr(gallery, "apply_changes", recorded)
    other = PostgresGalleryStore(url, state.engine.model_version)  # another replica enrols
    try:
        other.enrol(Enrolment("racer", None, None, [record("f-race", "racer", 7)]))
        assert read.wait(30)
        with ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(app_on.delete, "/gallery/racer/faces/f-race")  # the local delete meanwhile
            deleting.add_done_callback(lambda _: answered.set())
            time.sleep(1.0)
            go.set()
            assert deleting.result(timeout=60).status_code == 200
        assert applied.wait(30)
        time.sleep(0.5)
    finally:
        go.set()
        other.close()
    assert (True, True) not in after, after  # never indexed again once the delete was answered
    assert "f-race" not in gallery.index


# -- replicas: real service processes on one database -------------------------------------------


class Replica:
    def __init__(self, weights: Path, data_dir: Path, url: str) -> None:
        self.port = free_port()
        self.proc: Server = start_server(weights, data_dir, self.port, OAML_GALLERY_URL=url, OAML_GALLERY_POLL_S="1")
        self.base = f"http://127.0.0.1:{self.port}"

    def ready(self) -> Replica:
        wait_ready(self.proc, self.port)
        return self

    def enrol(self, subject: str, photo: bytes, key: str | None = None) -> httpx.Response:
        return httpx.post(
            f"{self.base}/gallery",
            data={"subject": subject},
            files=[("images", ("a.png", photo, "image/png"))],
            headers={"Idempotency-Key": key} if key else {},
            timeout=60,
        )

    def identify(self, photo: bytes) -> dict[str, Any]:
        r = httpx.post(f"{self.base}/identify", files={"image": ("a.png", photo, "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def face_ids(self, subject: str) -> set[str]:
        r = httpx.get(f"{self.base}/gallery/{subject}", timeout=10)
        return {f["face_id"] for f in r.json()["face_list"]} if r.status_code == 200 else set()

    def indexed(self) -> int:
        return int(httpx.get(f"{self.base}/info", timeout=10).json()["gallery_faces"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_replicas_share_one_gallery(weights: Path, tmp_path: Path, url: str, photo: bytes) -> None:
    a = Replica(weights, tmp_path / "a", url)
    b = Replica(weights, tmp_path / "b", url)
    replicas = [a, b]
    try:
        a.ready(), b.ready()
        info = httpx.get(f"{a.base}/info", timeout=10).json()
        assert info["gallery_store"] == "postgresql" and info["gallery_sync"]["connected"] is True
        # enrol on A, identify on B
        r = a.enrol("eileen", photo)
        assert r.status_code == 201, r.text
        face_id = r.json()["faces"][0]["face_id"]
        assert until(lambda: b.indexed() == 1, timeout=5)
        assert b.identify(photo)["candidates"][0]["face_id"] == face_id
        # delete on B, gone on A
        assert httpx.delete(f"{b.base}/gallery/eileen", timeout=10).status_code == 200
        assert until(lambda: a.indexed() == 0, timeout=5)
        assert a.identify(photo)["candidates"] == [] and a.face_ids("eileen") == set()
        with psycopg.connect(url) as conn:  # once both replicas applied the deletion, the log forgets the subject
            query = "SELECT COUNT(*) FROM oaml_changes WHERE subject = 'eileen'"
            assert until(lambda: conn.execute(query).fetchone()[0] == 0, timeout=10)
        # kill -9 A during a burst of enrolments: nothing it acknowledged is lost, B agrees with the database
        acknowledged: list[str] = []
        stop = threading.Event()

        def burst(worker: int) -> None:
            for i in range(1000):
                if stop.is_set():
                    return
                try:
                    r = a.enrol(f"s{worker}_{i}", photo)
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acknowledged.append(r.json()["faces"][0]["face_id"])

        threads = [threading.Thread(target=burst, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        assert until(lambda: len(acknowledged) >= 6, timeout=120)
        a.kill()
        stop.set()
        for t in threads:
            t.join()
        with psycopg.connect(url) as conn:
            stored = {row[0] for row in conn.execute("SELECT face_id FROM oaml_faces")}
        assert set(acknowledged) <= stored
        assert until(lambda: b.indexed() == len(stored), timeout=10)
        # a replica started late loads the gallery and follows from there
        c = Replica(weights, tmp_path / "c", url)
        replicas.append(c)
        c.ready()
        assert c.indexed() == len(stored)
        r = b.enrol("late", photo)
        assert r.status_code == 201
        assert until(lambda: c.face_ids("late") == {r.json()["faces"][0]["face_id"]} and c.indexed() == len(stored) + 1)
    finally:
        for replica in replicas:
            replica.kill()


def test_replicas_survive_the_database_killed_during_an_enrolment_burst(
    weights: Path, tmp_path: Path, photo: bytes
) -> None:
    """kill -9 of the postmaster during a 3-thread burst on two replicas, back 5 s later: no 500, nothing
    acknowledged lost, a retried enrolment (same Idempotency-Key) enrolled once, both replicas converge."""
    try:
        server_cm = running_postgres()
        server = server_cm.__enter__()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        url = server.new_database()
        a, b = Replica(weights, tmp_path / "a", url), Replica(weights, tmp_path / "b", url)
        try:
            a.ready(), b.ready()
            acknowledged: dict[str, str] = {}
            statuses: list[int] = []
            lock = threading.Lock()

            def burst(worker: int) -> None:
                for i in range(6):
                    subject, key = f"w{worker}_{i}", f"key-{worker}-{i}"
                    replica = (a, b)[(worker + i) % 2]
                    deadline = time.time() + 90
                    while time.time() < deadline:  # a client that retries with the same key
                        try:
                            r = replica.enrol(subject, photo, key)
                        except httpx.HTTPError:
                            time.sleep(0.5)
                            continue
                        with lock:
                            statuses.append(r.status_code)
                        if r.status_code == 201:
                            with lock:
                                acknowledged[subject] = r.json()["faces"][0]["face_id"]
                            break
                        assert r.status_code == 503, r.text
                        time.sleep(0.5)

            threads = [threading.Thread(target=burst, args=(w,)) for w in range(3)]
            for t in threads:
                t.start()
            assert until(lambda: len(acknowledged) >= 3, timeout=120)
            server.kill()
            time.sleep(5)
            server.start()
            for t in threads:
                t.join()
            assert 500 not in statuses and 503 in statuses, statuses
            assert len(acknowledged) == 18
            with psycopg.connect(url) as conn:
                rows = conn.execute("SELECT subject, face_id FROM oaml_faces").fetchall()
            stored = dict(rows)
            assert len(rows) == len(stored) == 18  # each subject once: retries were recognised
            assert stored == acknowledged  # and the answers are the faces written
            assert until(lambda: a.indexed() == 18 and b.indexed() == 18, timeout=60)
        finally:
            a.kill(), b.kill()
    finally:
        server_cm.__exit__(None, None, None)
