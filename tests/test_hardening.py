"""Hostile and careless clients: what is refused, how early, and with which answer.

Uploads are refused before their bytes are read (keys from the headers, sizes counted as bytes
arrive), silent connections are closed, every input gets a 4xx problem, never a 500, and each
key can do only what its role allows.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.config import Settings
from tests.conftest import encode
from tests.servers import free_port, start_server, wait_ready

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def face_png(astronaut: np.ndarray) -> bytes:
    return encode(astronaut)


def problem_of(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code
    return body


# -- a real server: sockets, streaming, timeouts ---------------------------------------------


@pytest.fixture(scope="module")
def server(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    proc = start_server(
        weights,
        tmp_path_factory.mktemp("served"),
        port,
        OAML_API_KEYS="root-key:admin,app-key:match",
        OAML_MAX_IMAGE_BYTES=str(MiB),
        OAML_HEADER_TIMEOUT="1",
    )
    try:
        wait_ready(proc, port)
        yield port
    finally:
        proc.kill()
        proc.wait()


def body_bytes_read(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"X-API-Key": "root-key"}, timeout=10).text
    match = re.search(r"^oaml_request_body_bytes_total ([0-9.e+]+)$", text, re.M)
    assert match, "metric oaml_request_body_bytes_total missing"
    return float(match.group(1))


def stream_upload(port: int, path: str, total: int, key: str | None) -> tuple[int, int]:
    """POST ``total`` bytes as a chunked body, reading the answer as soon as one comes.

    Returns (HTTP status, bytes the client managed to send).
    """
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    head += "Transfer-Encoding: chunked\r\n"
    if key:
        head += f"X-API-Key: {key}\r\n"
    # a well-formed multipart start, then one endless file part: only the size can stop it
    preamble = (
        b'--b\r\nContent-Disposition: form-data; name="image_a"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    )
    chunk = b"x" * (64 * 1024)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall((head + "\r\n").encode() + f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")
        deadline = time.time() + 60
        while time.time() < deadline and b"\r\n" not in answer:
            readable, writable, _ = select.select([s], [s] if sent < total else [], [], 1.0)
            if readable:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
            elif writable:
                try:
                    s.sendall(framed)
                except OSError:  # the server closed: read what it answered
                    s.settimeout(5)
                    answer += s.recv(65536)
                    break
                sent += len(chunk)
    return int(answer.split(b" ", 2)[1]), sent


class TestBodiesAreRefusedEarly:
    def test_without_a_key_no_body_byte_is_read(self, server: int) -> None:
        before = body_bytes_read(server)
        status, _ = stream_upload(server, "/verify", 200 * MiB, key=None)
        assert status == 401
        assert body_bytes_read(server) - before <= 1 * MiB

    def test_with_a_key_a_chunked_body_stops_just_past_its_limit(self, server: int) -> None:
        limit = 2 * MiB + 1 * MiB  # /verify: two images of OAML_MAX_IMAGE_BYTES plus form overhead
        before = body_bytes_read(server)
        status, sent = stream_upload(server, "/verify", 200 * MiB, key="root-key")
        assert status == 413
        read = body_bytes_read(server) - before
        assert limit < read <= limit + 1 * MiB
        assert sent < 50 * MiB

    def test_a_declared_length_over_the_limit_is_refused_before_reading(self, server: int) -> None:
        with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
            s.sendall(
                b"POST /identify HTTP/1.1\r\nHost: x\r\nX-API-Key: app-key\r\n"
                + f"Content-Length: {100 * MiB}\r\n\r\n".encode()
            )
            answer = b""  # no body byte is ever sent: an answer means nothing was waited for
            while b"PAYLOAD_TOO_LARGE" not in answer and (data := s.recv(65536)):
                answer += data
        assert answer.split(b" ", 2)[1] == b"413" and b"PAYLOAD_TOO_LARGE" in answer


class TestConnections:
    def test_silent_and_dripping_connections_are_closed_after_the_header_timeout(self, server: int) -> None:
        silent = [socket.create_connection(("127.0.0.1", server), timeout=10) for _ in range(30)]
        drip = socket.create_connection(("127.0.0.1", server), timeout=10)
        try:
            started = time.time()
            for part in (b"GET /hea", b"lth HTTP/1.1\r\n", b"Host: x\r\n"):  # never finishes its headers
                drip.sendall(part)
                time.sleep(0.4)
            time.sleep(max(0.0, 2.5 - (time.time() - started)))
            for s in [*silent, drip]:
                s.settimeout(5)
                try:
                    assert s.recv(1024) == b""  # closed by the server
                except ConnectionResetError:
                    pass
            r = httpx.get(f"http://127.0.0.1:{server}/health", timeout=5)
            assert r.status_code == 200
        finally:
            for s in [*silent, drip]:
                s.close()

    def test_no_server_banner_and_nosniff(self, server: int) -> None:
        r = httpx.get(f"http://127.0.0.1:{server}/health", timeout=5)
        assert "server" not in r.headers
        assert r.headers["x-content-type-options"] == "nosniff"
        refused = httpx.get(f"http://127.0.0.1:{server}/info", timeout=5)
        assert refused.status_code == 401 and refused.headers["x-content-type-options"] == "nosniff"


def test_a_gallery_in_an_unwritable_place_stops_start_up_with_one_line(weights: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = start_server(weights, blocker / "gallery", free_port())
    out = proc.finish()
    assert proc.returncode == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out, out
    assert "cannot start" in lines[0] and str(blocker / "gallery") in lines[0]


def test_listening_beyond_loopback_without_keys_is_an_explicit_choice(weights: Path, tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.20", "oaml.example.com"):
        with pytest.raises(ValidationError, match="OAML_API_KEYS.*OAML_ALLOW_UNAUTHENTICATED"):
            Settings(weights=weights, data_dir=tmp_path, host=host)
        Settings(weights=weights, data_dir=tmp_path, host=host, api_keys="k" * 16 + ":admin")  # type: ignore[arg-type]
        Settings(weights=weights, data_dir=tmp_path, host=host, allow_unauthenticated=True)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        Settings(weights=weights, data_dir=tmp_path, host=host)
    proc = start_server(weights, tmp_path, free_port(), OAML_HOST="0.0.0.0")
    out = proc.finish()
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in out, out
    assert "cannot start" in lines[0] and "OAML_API_KEYS" in lines[0] and "OAML_ALLOW_UNAUTHENTICATED" in lines[0]


def test_the_log_warns_whenever_authentication_is_off(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level("WARNING", logger="service.app"),
        TestClient(create_app(Settings(weights=weights, data_dir=tmp_path))),
    ):
        pass
    assert any("authentication is off" in r.getMessage() for r in caplog.records)
    caplog.clear()
    keyed = Settings(weights=weights, data_dir=tmp_path, api_keys="k:admin")  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="service.app"), TestClient(create_app(keyed)):
        pass
    assert not any("authentication is off" in r.getMessage() for r in caplog.records)


def test_settings_that_contradict_each_other_stop_start_up(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="queue_size"):
        Settings(weights=weights, data_dir=tmp_path, queue_size=1)
    proc = start_server(weights, tmp_path, free_port(), OAML_QUEUE_SIZE="1")
    out = proc.finish()
    assert proc.returncode == 2 and "OAML_QUEUE_SIZE" in out and "Traceback" not in out


# -- in process: inputs and roles --------------------------------------------------------------


@pytest.fixture(scope="module")
def client(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        weights=weights,
        data_dir=tmp_path_factory.mktemp("hard"),
        torch_threads=2,
        api_keys="root-key:admin,app-key:match,old-key",
    )  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as c:
        yield c


ADMIN, MATCH = {"X-API-Key": "root-key"}, {"X-API-Key": "app-key"}


class TestInputs:
    def test_huge_offsets_and_limits_are_422(self, client: TestClient) -> None:
        for params in ({"offset": "9223372036854775808"}, {"offset": "-1"}, {"limit": "0"}, {"limit": "1001"}):
            problem_of(client.get("/gallery", params=params, headers=ADMIN), 422, "VALIDATION_ERROR")
        assert client.get("/gallery", params={"offset": str(2**31 - 1)}, headers=ADMIN).json()["subjects"] == []

    def test_deep_or_large_metadata_is_422(self, client: TestClient, face_png: bytes) -> None:
        image = [("images", ("a.png", face_png, "image/png"))]
        for metadata in ("[" * 100_000 + "]" * 100_000, '{"a":' * 17 + "1" + "}" * 17, json.dumps({"x": "y" * 20_000})):
            body = problem_of(
                client.post("/gallery", data={"subject": "m", "metadata": metadata}, files=image, headers=ADMIN),
                422,
                "VALIDATION_ERROR",
            )
            assert body["field"] == "metadata"
        ok = client.post(
            "/gallery", data={"subject": "m", "metadata": '{"a":' * 15 + "1" + "}" * 15}, files=image, headers=ADMIN
        )
        assert ok.status_code == 201, ok.text

    def test_undecodable_images_are_described_without_object_reprs(self, client: TestClient, face_png: bytes) -> None:
        for junk in (b"\x89PNG\r\n\x1a\nbroken", b"plain text, not an image", face_png[: len(face_png) // 3]):
            r = client.post(
                "/verify",
                files={"image_a": ("a.png", junk, "image/png"), "image_b": ("b.png", face_png, "image/png")},
                headers=MATCH,
            )
            body = problem_of(r, 400, "INVALID_IMAGE")
            assert body["field"] == "image_a" and "0x" not in body["detail"] and "<" not in body["detail"]

    def test_formats_outside_the_allow_list_are_415_before_their_parser_runs(
        self, client: TestClient, face_png: bytes, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from PIL import EpsImagePlugin, Image

        parsed: list[str] = []
        monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: parsed.append("EPS"))
        eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 112 112\n"
        gif = encode(Image.new("RGB", (64, 64)), "GIF")
        for data, fmt in ((eps, "EPS"), (gif, "GIF")):
            r = client.post(
                "/verify",
                files={"image_a": ("a.png", face_png, "image/png"), "image_b": ("b", data, "image/png")},
                headers=MATCH,
            )
            body = problem_of(r, 415, "UNSUPPORTED_MEDIA")
            assert body["field"] == "image_b" and fmt in body["detail"] and "PNG" in body["detail"]
        enrol = client.post(
            "/gallery", data={"subject": "eps"}, files=[("images", ("e.jpg", eps, "image/jpeg"))], headers=ADMIN
        )
        assert problem_of(enrol, 422, "NO_USABLE_FACE")["rejected"][0]["code"] == "UNSUPPORTED_MEDIA"
        assert parsed == []
        assert client.get("/info", headers=MATCH).json()["image_formats"] == ["JPEG", "PNG", "WEBP", "BMP"]

    def test_405_names_the_allowed_methods(self, client: TestClient) -> None:
        r = client.put("/verify", headers=MATCH)
        problem_of(r, 405, "METHOD_NOT_ALLOWED")
        assert r.headers["allow"] == "POST"

    def test_503_says_when_to_retry(self, weights: Path, tmp_path: Path) -> None:
        app = create_app(Settings(weights=weights, data_dir=tmp_path))
        r = TestClient(app).get("/ready")  # no lifespan: still loading
        problem_of(r, 503, "NOT_READY")
        assert r.headers["retry-after"] == "1"

    def test_a_read_only_gallery_answers_writes_with_a_stable_code(
        self, weights: Path, tmp_path: Path, face_png: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A database that turns read-only while serving (remount, full disk): 503 STORE_UNAVAILABLE, reads go on;
        the answer names neither the file nor SQLite's words, the log does."""
        with TestClient(create_app(Settings(weights=weights, data_dir=tmp_path))) as c:
            store = c.app.state.oaml.gallery.store  # type: ignore[attr-defined]
            with store._lock:  # the writer connection, swapped while no write (e.g. the start-up audit prune) uses it
                store._db.close()
                store._db = sqlite3.connect(
                    f"file:{store.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
                )
            with caplog.at_level("WARNING", logger="service.problems"):
                r = c.post("/gallery", data={"subject": "ro"}, files=[("images", ("a.png", face_png, "image/png"))])
            body = problem_of(r, 503, "STORE_UNAVAILABLE")
            assert r.headers["retry-after"] == "1"
            assert str(tmp_path) not in r.text and "sqlite" not in r.text.lower() and "readonly" not in r.text
            logged = " ".join(rec.getMessage() for rec in caplog.records)
            assert str(store.path) in logged and "readonly" in logged
            assert body["detail"].startswith("the gallery database cannot be written")
            assert c.get("/gallery").status_code == 200
            assert len(c.app.state.oaml.gallery.index) == 0  # type: ignore[attr-defined]  # nothing half-enrolled
            assert c.get("/gallery").json()["total"] == 0  # no subject left behind either

    def test_openapi_declares_problem_responses_and_at_least_one_image(self, client: TestClient) -> None:
        spec = client.get("/openapi.json").json()
        verify = spec["paths"]["/verify"]["post"]["responses"]
        for status in ("400", "401", "403", "413", "415", "422", "503"):
            assert list(verify[status]["content"]) == ["application/problem+json"], status
        assert "404" in spec["paths"]["/gallery/{subject}"]["get"]["responses"]
        form = spec["paths"]["/gallery"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        ref = form["$ref"].split("/")[-1]
        assert spec["components"]["schemas"][ref]["properties"]["images"]["minItems"] == 1


class TestScopedKeys:
    def test_match_keys_match_and_admin_keys_administer(self, client: TestClient, face_png: bytes) -> None:
        photo = {"image": ("a.png", face_png, "image/png")}
        enrol = {"data": {"subject": "k"}, "files": [("images", ("a.png", face_png, "image/png"))]}
        assert client.post("/gallery", headers=ADMIN, **enrol).status_code == 201  # type: ignore[arg-type]
        face_id = client.get("/gallery/k", headers=ADMIN).json()["face_list"][0]["face_id"]
        allowed_to_match = [
            lambda h: client.get("/info", headers=h),
            lambda h: client.post("/identify", files=photo, headers=h),
            lambda h: client.post("/occlusion", files=photo, headers=h),
            lambda h: client.post("/verify", files={"image_a": photo["image"], "image_b": photo["image"]}, headers=h),
        ]
        admin_only = [
            lambda h: client.get("/gallery", headers=h),
            lambda h: client.get("/gallery/k", headers=h),
            lambda h: client.get("/occlusion", params={"face_id": face_id}, headers=h),
            lambda h: client.post("/gallery", headers=h, **enrol),  # type: ignore[arg-type]
            lambda h: client.delete(f"/gallery/k/faces/{face_id}", headers=h),
        ]
        for call in allowed_to_match:
            assert call(MATCH).status_code == 200 and call(ADMIN).status_code == 200
            problem_of(call({}), 401, "UNAUTHORIZED")
        for call in admin_only:
            problem_of(call(MATCH), 403, "FORBIDDEN")
            problem_of(call({"X-API-Key": "wrong"}), 401, "UNAUTHORIZED")
        assert [call(ADMIN).status_code for call in admin_only] == [200, 200, 200, 201, 200]
        assert client.get("/gallery", headers={"Authorization": "Bearer old-key"}).status_code == 200  # no role: admin
        assert client.get("/health").status_code == 200 and client.get("/openapi.json").status_code == 200

    def test_unknown_roles_are_refused_at_start_up(self, weights: Path, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="role"):
            Settings(weights=weights, data_dir=tmp_path, api_keys="k:superuser")  # type: ignore[arg-type]


class TestSizing:
    @pytest.mark.parametrize(
        ("cores", "device", "expected"),
        [(2, "cpu", (2, 2)), (16, "cpu", (8, 8)), (16, "cuda", (2, 14)), (1, "cpu", (1, 2))],
    )
    def test_threads_and_workers_follow_the_usable_cores(
        self,
        weights: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        cores: int,
        device: str,
        expected: tuple[int, int],
    ) -> None:
        monkeypatch.setattr("service.config.usable_cores", lambda: cores)
        s = Settings(weights=weights, data_dir=tmp_path, device=device)
        assert (s.torch_threads, s.detection_workers) == expected
        pinned = Settings(weights=weights, data_dir=tmp_path, device=device, torch_threads=3, detection_workers=5)
        assert (pinned.torch_threads, pinned.detection_workers) == (3, 5)  # what is set is kept

    def test_usable_cores_is_the_affinity(self) -> None:
        import os

        from service.config import usable_cores

        assert usable_cores() == len(os.sched_getaffinity(0))
