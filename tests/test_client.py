"""The Python client (oaml/client.py) and ``oaml enrol`` (oaml/bulk.py) against one live service.

Every route through the sync client, the main ones through the async one; retries behind a transport that
answers 503 or loses answers (a retried enrolment is written once); error answers as typed exceptions; the
client's methods and answer types held to the service's OpenAPI document; the client imported without
anything of the server; bulk enrolment of a folder and a CSV, its report and a re-run that enrols nothing new.
"""

from __future__ import annotations

import asyncio
import csv
import inspect
import io
import json
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from skimage import data as skdata

from oaml import bulk, client
from oaml.cli import main as cli_main
from oaml.client import (
    OPERATIONS,
    AsyncOAMLClient,
    CollectionNotFound,
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
    InvalidImage,
    NoFace,
    NotFound,
    NoUsableFace,
    OAMLAPIError,
    OAMLClient,
    OAMLConnectionError,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    SubjectNotFound,
    Unauthorized,
    Unavailable,
    UnsupportedMedia,
    ValidationFailed,
)
from tests.conftest import encode
from tests.servers import Server, free_port, start_server, wait_ready

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "client-admin-key-0123456789"
MATCH = "client-match-key-0123456789"
MAX_IMAGE_BYTES = 3_000_000


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return encode(np.ascontiguousarray(image), "JPEG", quality=quality)


@pytest.fixture(scope="module")
def shots(astronaut: np.ndarray) -> dict[str, bytes]:
    camera = rgb(skdata.camera())
    return {
        "eileen": jpeg(astronaut),
        "eileen_mirrored": jpeg(astronaut[:, ::-1]),
        "eileen_crop": jpeg(astronaut[:320, 60:420]),
        "camera": jpeg(camera),
        "camera_mirrored": jpeg(camera[:, ::-1]),
        "camera_crop": jpeg(camera[:360, 100:460], quality=80),
        "coffee": jpeg(skdata.coffee()),
    }


@pytest.fixture(scope="module")
def weights_dir(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (the random weights of conftest) and B (other random weights): B is what a migration moves to."""
    from model.checkpoint import save_checkpoint
    from model.net import build_model

    folder = tmp_path_factory.mktemp("client-weights")
    (folder / "a.safetensors").symlink_to(weights)
    torch.manual_seed(7)
    save_checkpoint(build_model("ir_18").eval(), folder / "b.safetensors")
    return folder


@pytest.fixture(scope="module")
def versions(weights_dir: Path) -> tuple[str, str]:
    from model.checkpoint import read_metadata

    a, b = (str(read_metadata(weights_dir / f"{n}.safetensors")["model_version"]) for n in "ab")
    return a, b


@pytest.fixture(scope="module")
def server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc: Server = start_server(
        weights_dir / "a.safetensors",
        tmp_path_factory.mktemp("client-data"),
        port,
        OAML_WEIGHTS_DIR=str(weights_dir),
        OAML_API_KEYS=f"{ADMIN}:admin,{MATCH}:match",
        OAML_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        OAML_MIGRATION_BATCH="4",
        OAML_RATE_LIMITS="admin=0,match=0",  # the 429 path has its own test (test_operations.py)
    )
    try:
        wait_ready(proc, port, timeout=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def admin(server: str) -> Iterator[OAMLClient]:
    with OAMLClient(server, ADMIN, timeout=120) as c:
        yield c


# --------------------------------------------------------------------------------------------- no server needed


def test_the_client_imports_nothing_of_the_server() -> None:
    heavy = ("torch", "numpy", "fastapi", "service", "model", "cv2", "starlette", "pydantic", "PIL")
    code = (
        "import sys; import oaml.client; import oaml.bulk; "
        f"bad = sorted({{m for m in sys.modules if m.split('.')[0] in {heavy!r}}}); "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_client_install_pulls_httpx_alone_and_oaml_enrol_runs_on_it() -> None:
    """``pip install '.[client]'``: the package requires nothing by default and the client extra only httpx
    (read from pyproject.toml, what pip reads); and ``oaml enrol`` starts where the server's modules cannot be
    imported (an import hook refuses them), while a server command says what to install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []
    assert [r.split(">")[0].split("=")[0] for r in project["optional-dependencies"]["client"]] == ["httpx"]
    heavy = ("torch", "numpy", "fastapi", "cv2", "starlette", "pydantic", "PIL", "uvicorn", "safetensors")
    block = (
        "import sys, importlib.abc\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {heavy!r}: raise ModuleNotFoundError(name=name.split('.')[0])\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from oaml.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    enrol = subprocess.run(
        [sys.executable, "-c", block, "enrol", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert enrol.returncode == 0 and "FOLDER" in enrol.stdout.upper(), enrol.stderr
    info = subprocess.run(
        [sys.executable, "-c", block, "info", "weights/oaml_ir18.safetensors"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 2 and "pip install '.[server]'" in info.stderr, info.stderr


def _refs(schema: Any) -> set[str]:
    """The component names a schema refers to, anywhere inside it."""
    found: set[str] = set()
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            found.add(ref.rsplit("/", 1)[-1])
        for value in schema.values():
            found |= _refs(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= _refs(value)
    return found


def test_every_operation_has_a_method_and_every_answer_its_fields(weights: Path, tmp_path: Path) -> None:
    from service.app import create_app
    from service.config import Settings

    doc = create_app(Settings(weights=weights, data_dir=tmp_path, torch_threads=1)).openapi()
    components = doc["components"]["schemas"]
    seen_ops: set[str] = set()
    answers: set[str] = set()
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            op_id = op["operationId"]
            seen_ops.add(op_id)
            assert op_id in OPERATIONS, f"{method.upper()} {path} ({op_id}) has no client method"
            name = OPERATIONS[op_id]
            sync, asynchronous = getattr(OAMLClient, name), getattr(AsyncOAMLClient, name)
            assert inspect.iscoroutinefunction(asynchronous), name
            # every parameter the operation takes (path, query, header, form or JSON field) is one of the method's
            wanted = {p["name"].lower().replace("-", "_") for p in op.get("parameters", [])}
            for content in op.get("requestBody", {}).get("content", {}).values():
                body = content["schema"]
                body = components[_refs(body).pop()] if "$ref" in body else body
                wanted |= set(body.get("properties", {}))
            wanted -= {"format"}  # /explain's format=png is explain_png
            wanted = {"from_" if w == "from" else w for w in wanted}  # a merge's source (a Python keyword)
            for m in (sync, asynchronous):
                missing = wanted - set(inspect.signature(m).parameters)
                assert not missing, f"{name} lacks {sorted(missing)} of {op_id}"
            for code, response in op["responses"].items():
                if code.startswith("2"):
                    for content in response.get("content", {}).values():
                        answers |= _refs(content.get("schema", {}))
    assert seen_ops == set(OPERATIONS), (
        f"methods for operations the service no longer has: {set(OPERATIONS) - seen_ops}"
    )
    todo, checked = set(answers), set()
    while todo:  # the answers' models and every model inside them
        name = todo.pop()
        checked.add(name)
        schema = components[name]
        mirror = getattr(client, name, None)
        assert mirror is not None and is_dataclass(mirror), f"the client has no mirror type for {name}"
        have = {f.name for f in fields(mirror)}
        missing = set(schema.get("required", [])) - have
        assert not missing, f"client.{name} lacks the required fields {sorted(missing)}"
        todo |= _refs(schema.get("properties", {})) - checked
    assert {"VerifyResponse", "IdentifyAllResponse", "FaceInfo", "MigrationStatus", "InfoResponse"} <= checked


def test_answers_keep_fields_a_newer_service_adds() -> None:
    page = client.SubjectPage.from_json(
        {
            "subjects": [
                {
                    "subject": "a",
                    "name": None,
                    "metadata": {},
                    "face_count": 1,
                    "faces": 1,
                    "created_at": 1,
                    "future": [1, 2],
                }
            ],
            "total": 1,
            "offset": 0,
            "limit": 10,
            "cursor": "next",
        }
    )
    assert page.raw["cursor"] == "next" and page.subjects[0].raw["future"] == [1, 2]
    assert page.subjects[0].created_at == 1.0 and isinstance(page.subjects[0].created_at, float)
    assert page.collection == "default"  # not sent: the documented default


def test_error_bodies_that_are_not_problems_still_raise() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            return httpx.Response(502, text="<html>Bad gateway</html>", headers={"content-type": "text/html"})
        return httpx.Response(404, text="no such page")

    with OAMLClient("http://x", transport=httpx.MockTransport(answer), retries=0) as c:
        with pytest.raises(ServerError) as bad_gateway:
            c.info()
        with pytest.raises(NotFound) as not_found:
            c.health()
    assert bad_gateway.value.status == 502 and "Bad gateway" in bad_gateway.value.detail
    assert bad_gateway.value.code == "HTTP_502" and bad_gateway.value.body == "<html>Bad gateway</html>"
    assert not_found.value.code == "NOT_FOUND" and not_found.value.detail == "no such page"


# ------------------------------------------------------------------------------------- transports in front


class Flaky(httpx.BaseTransport):
    """In front of the live service: each request takes the next step of ``plan`` (then ``forward``):
    ``503``/``429`` answered here, ``refuse`` a connection refused, ``lose`` forwarded and its answer lost."""

    def __init__(self, *plan: str, retry_after: str = "0") -> None:
        self.plan, self.retry_after = list(plan), retry_after
        self.inner = httpx.HTTPTransport()
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.keys.append(request.headers.get("idempotency-key"))
        step = self.plan.pop(0) if self.plan else "forward"
        if step in ("503", "429"):
            code = "OVERLOADED" if step == "503" else "RATE_LIMITED"
            body = {"type": "about:blank", "title": "busy", "status": int(step), "code": code, "detail": "busy"}
            return httpx.Response(int(step), json=body, headers={"Retry-After": self.retry_after})
        if step == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        response = self.inner.handle_request(request)
        if step == "lose":  # the service did the work; the answer never arrives
            response.read()
            response.close()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


class AsyncFlaky(httpx.AsyncBaseTransport):
    def __init__(self, *plan: str) -> None:
        self.plan = list(plan)
        self.inner = httpx.AsyncHTTPTransport()
        self.keys: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.keys.append(request.headers.get("idempotency-key"))
        step = self.plan.pop(0) if self.plan else "forward"
        if step == "503":
            return httpx.Response(503, json={"code": "OVERLOADED", "detail": "busy"}, headers={"Retry-After": "0"})
        response = await self.inner.handle_async_request(request)
        if step == "lose":
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


def test_retried_enrolments_are_written_once(server: str, admin: OAMLClient, shots: dict[str, bytes]) -> None:
    admin.create_collection("retries")
    flaky = Flaky("503", "503")
    with OAMLClient(server, ADMIN, transport=flaky, backoff=0.01, timeout=120) as c:
        first = c.enrol("ann", shots["eileen"], collection="retries")
    assert len(flaky.keys) == 3 and len(set(flaky.keys)) == 1 and flaky.keys[0]
    assert first.face_count == 1 and not first.replayed and first.idempotency_key == flaky.keys[0]

    lost = Flaky("lose", "503")  # written, answer lost; then busy; then the stored answer
    with OAMLClient(server, ADMIN, transport=lost, backoff=0.01, timeout=120) as c:
        again = c.enrol("bob", shots["camera"], collection="retries", idempotency_key="bob-photo-1")
    assert lost.keys == ["bob-photo-1"] * 3
    assert again.replayed and again.face_count == 1
    assert admin.get_subject("bob", collection="retries").face_count == 1

    async def lost_async() -> None:
        transport = AsyncFlaky("lose", "503")
        async with AsyncOAMLClient(server, ADMIN, transport=transport, backoff=0.01, timeout=120) as c:
            answer = await c.enrol("cy", shots["eileen_mirrored"], collection="retries")
        assert answer.replayed and answer.face_count == 1
        assert len(transport.keys) == 3 and len(set(transport.keys)) == 1

    asyncio.run(lost_async())
    assert admin.get_subject("cy", collection="retries").face_count == 1
    assert admin.get_collection("retries").face_count == 3


def test_retries_wait_as_told_and_give_up(server: str) -> None:
    told = Flaky("503", retry_after="1")
    with OAMLClient(server, transport=told, backoff=0.01) as c:
        started = time.monotonic()
        assert c.health().status == "ok"
    assert time.monotonic() - started >= 1.0 and len(told.keys) == 2

    with OAMLClient(server, transport=Flaky("429"), backoff=0.01) as c:
        assert c.health().status == "ok"  # 429 is waited out too

    too_long = Flaky("503", retry_after="120")  # longer than max_backoff: raised at once
    with OAMLClient(server, transport=too_long, backoff=0.01, max_backoff=5) as c, pytest.raises(Overloaded) as busy:
        c.health()
    assert len(too_long.keys) == 1 and busy.value.retry_after == 120 and busy.value.code == "OVERLOADED"

    always = Flaky(*["503"] * 10)
    with OAMLClient(server, transport=always, retries=2, backoff=0.01) as c, pytest.raises(Unavailable):
        c.health()
    assert len(always.keys) == 3

    limited = Flaky("429", "429")
    with OAMLClient(server, transport=limited, retries=1, backoff=0.01) as c, pytest.raises(RateLimited):
        c.health()

    refused = Flaky("refuse", "refuse")  # never sent: retried for any request, creating a collection included
    with OAMLClient(server, ADMIN, transport=refused, backoff=0.01) as c:
        assert c.create_collection("after-refusals").name == "after-refusals"
    assert len(refused.keys) == 3

    lost = Flaky("lose")  # perhaps done: a request that is not idempotent is not sent again
    with OAMLClient(server, ADMIN, transport=lost, backoff=0.01) as c, pytest.raises(OAMLConnectionError):
        c.create_collection("lost-answer")
    assert len(lost.keys) == 1
    with OAMLClient(server, ADMIN) as c:
        assert c.get_collection("lost-answer").name == "lost-answer"  # it was created; the answer was lost

    with OAMLClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as c:
        with pytest.raises(OAMLConnectionError):
            c.health()


# ---------------------------------------------------------------------------------------------- every route


def test_every_route_through_the_sync_client(
    server: str, admin: OAMLClient, shots: dict[str, bytes], versions: tuple[str, str], tmp_path: Path
) -> None:
    a, b = versions
    assert admin.health().status == "ok"
    ready = admin.ready()
    assert ready.status == "ready" and ready.gallery_writable
    info = admin.info()
    assert info.model_version == a and "balanced" in info.presets and info.backbone_path.served
    assert "oaml_" in admin.metrics()

    made = admin.create_collection("site-a", store_crops=True)
    assert made.name == "site-a" and made.store_crops and made.model_version == a and made.face_count == 0
    assert "site-a" in {c.name for c in admin.list_collections().collections}
    assert admin.update_collection("site-a", store_crops=True).store_crops

    photo_path = tmp_path / "camera.jpg"
    photo_path.write_bytes(shots["camera"])
    eileen = admin.enrol(
        "eileen", [shots["eileen"], shots["eileen_mirrored"]], name="Eileen", metadata={"n": 1}, collection="site-a"
    )
    assert eileen.face_count == 2 and len(eileen.faces) == 2 and eileen.collection == "site-a"
    with photo_path.open("rb") as f:  # a file object; a subject id that needs quoting in the path
        cam = admin.enrol("cam@x.org", f, collection="site-a")
    assert cam.faces[0].filename == "camera.jpg"
    admin.enrol("z-third", photo_path, collection="site-a")

    page = admin.list_subjects(limit=2, collection="site-a")
    assert page.total == 3 and len(page.subjects) == 2 and page.subjects[0].subject == "cam@x.org"
    assert [s.subject for s in admin.iter_subjects(page_size=1, collection="site-a")] == [
        "cam@x.org",
        "eileen",
        "z-third",
    ]
    detail = admin.get_subject("eileen", collection="site-a")
    assert detail.name == "Eileen" and detail.metadata == {"n": 1} and len(detail.face_list) == 2
    changed = admin.update_subject("eileen", metadata={"n": 2}, collection="site-a")
    assert changed.name == "Eileen" and changed.metadata == {"n": 2}
    assert admin.update_subject("eileen", name=None, collection="site-a").name is None

    verdict = admin.verify(shots["eileen"], shots["eileen_mirrored"], threshold="balanced")
    assert verdict.threshold_preset == "balanced" and verdict.face_a.visibility_map and verdict.scores.weights
    why = admin.explain(shots["eileen"], shots["eileen_mirrored"], picture=True)
    assert len(why.evidence_a.correspondences) == 49 and why.picture and why.picture.startswith("data:image/png")
    assert admin.explain_png(shots["eileen"], shots["camera"]).startswith(b"\x89PNG")

    found = admin.identify(shots["eileen_crop"], top_k=3, threshold="-1000", collection="site-a")
    assert found.match is not None and found.gallery_subjects == 3 and found.collection == "site-a"
    assert len(found.candidates) == 3 and found.candidates[0].scores.adaface == found.candidates[0].adaface
    group = admin.identify_all(shots["eileen"], collection="site-a")
    assert group.faces_found >= 1 and group.faces[0].face.box is not None
    with pytest.raises(ValueError):
        admin.identify(shots["eileen"], face="all")
    is_she = admin.verify_subject("eileen", shots["eileen_crop"], collection="site-a")
    assert (
        is_she.subject == "eileen"
        and is_she.faces_compared == 2
        and is_she.face_id in {f.face_id for f in detail.face_list}
    )
    assert admin.heatmap(shots["camera"], scale=1).startswith(b"\x89PNG")
    assert admin.heatmap_of_face(eileen.faces[0].face_id, collection="site-a").startswith(b"\x89PNG")

    # a model change: a dry run, the switch, rollback, dropping the previous version; and a cancelled one
    status = admin.migration_status("site-a")
    assert status.model_version == a and status.migration is None
    started = admin.start_migration("site-a", b, switch=False)
    assert started.migration is not None and started.migration["to"] == b

    def dry_run_ready() -> dict[str, Any] | None:
        migration = admin.migration_status("site-a").migration or {}
        return migration if migration.get("state") == "ready" else None

    ready_to_switch = _until(dry_run_ready)
    assert ready_to_switch["report"]
    switched = admin.switch_migration("site-a")
    assert switched.model_version == b or _until(lambda: admin.migration_status("site-a").model_version == b)
    assert admin.migration_status("site-a").previous_version == a
    back = admin.rollback("site-a")
    assert back.model_version == a and back.previous_version == b
    dropped = admin.drop_previous("site-a")
    assert dropped.previous_version is None
    admin.start_migration("site-a", b, switch=False)
    cancelled = admin.cancel_migration("site-a")
    assert cancelled.migration is None and cancelled.model_version == a

    # identity hygiene: a face moved away looks like a duplicate of its first subject; merged back
    moved = admin.move_faces("eileen", [eileen.faces[1].face_id], "eileen-2", collection="site-a")
    assert moved.subject == "eileen-2" and moved.face_count == 1
    review = admin.review_identities("site-a", threshold="lenient")
    assert review.faces == 4 and {"eileen", "eileen-2"} in [set(d.subjects) for d in review.duplicates]
    merged = admin.merge_subjects("eileen", "eileen-2", collection="site-a")
    assert merged.face_count == 2 and {f.face_id for f in merged.face_list} == {f.face_id for f in eileen.faces}

    # an export streamed to a file, imported from a file object into a new collection
    export = tmp_path / "site-a.jsonl"
    written = admin.export_collection("site-a", export)
    assert written == export.stat().st_size and written > 0
    with export.open("rb") as f:
        copied = admin.import_collection("site-a-copy", f)
    assert (copied.subjects, copied.faces, copied.model_version, copied.embedded_again) == (3, 4, a, 0)
    assert admin.delete_collection("site-a-copy").deleted_faces == 4

    # the audit log: what was done to the collection, page by page and as one file
    entries = list(admin.iter_audit_log(collection="site-a", page_size=2))
    actions = [e.action for e in entries]
    assert {"collection_create", "enrol", "move_faces", "merge_subjects", "export"} <= set(actions)
    assert all(e.outcome == "ok" and e.key_id.startswith("key-") for e in entries)
    log = io.BytesIO()
    admin.export_audit_log(log, collection="site-a")
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [e["seq"] for e in lines[: len(entries)]] == [e.seq for e in entries]

    gone = admin.delete_face("eileen", eileen.faces[1].face_id, collection="site-a")
    assert gone.deleted_faces == [eileen.faces[1].face_id]
    assert admin.delete_subject("cam@x.org", collection="site-a").subject == "cam@x.org"
    removed = admin.delete_collection("site-a")
    assert removed.deleted_subjects == 2 and removed.deleted_faces == 2


def _until(check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_main_routes_through_the_async_client(server: str, shots: dict[str, bytes]) -> None:
    async def run() -> None:
        async with AsyncOAMLClient(server, ADMIN, timeout=120) as c:
            assert (await c.health()).status == "ok" and (await c.ready()).gallery_writable
            assert (await c.info()).model_version
            await c.create_collection("async-a")
            done = await asyncio.gather(
                c.enrol("eileen", shots["eileen"], collection="async-a"),
                c.enrol("camera", shots["camera"], collection="async-a"),
            )
            assert [d.face_count for d in done] == [1, 1]
            assert [s.subject async for s in c.iter_subjects(page_size=1, collection="async-a")] == [
                "camera",
                "eileen",
            ]
            found = await c.identify(shots["eileen_mirrored"], threshold="-1000", collection="async-a")
            assert found.match is not None and found.gallery_faces == 2
            assert (await c.verify(shots["eileen"], shots["camera"])).model_version
            assert (await c.verify_subject("camera", shots["camera_mirrored"], collection="async-a")).faces_compared
            assert (await c.get_subject("camera", collection="async-a")).face_count == 1
            assert len((await c.list_subjects(collection="async-a")).subjects) == 2
            with pytest.raises(SubjectNotFound):
                await c.get_subject("nobody", collection="async-a")
            export = io.BytesIO()
            assert await c.export_collection("async-a", export) == len(export.getvalue()) > 0
            copied = await c.import_collection("async-b", export.getvalue())
            assert (copied.subjects, copied.faces) == (2, 2)
            with pytest.raises(Conflict):  # into a collection that has faces
                await c.import_collection("async-b", export.getvalue())
            assert (await c.delete_collection("async-b")).deleted_faces == 2
            assert (await c.delete_subject("camera", collection="async-a")).subject == "camera"
            assert (await c.delete_collection("async-a")).deleted_faces == 1

    asyncio.run(run())


def test_error_answers_raise_typed_exceptions(server: str, admin: OAMLClient, shots: dict[str, bytes]) -> None:
    with pytest.raises(SubjectNotFound) as missing:
        admin.get_subject("nobody")
    assert isinstance(missing.value, NotFound) and missing.value.status == 404
    assert missing.value.code == "SUBJECT_NOT_FOUND" and missing.value.body["code"] == "SUBJECT_NOT_FOUND"
    with pytest.raises(CollectionNotFound):
        admin.list_subjects(collection="no-such-collection")
    with pytest.raises(Conflict) as taken:
        admin.create_collection("default")
    assert taken.value.code == "COLLECTION_EXISTS"
    with OAMLClient(server, "not-a-key-of-this-service") as stranger, pytest.raises(Unauthorized):
        stranger.info()
    with OAMLClient(server, MATCH) as matcher, pytest.raises(Forbidden) as forbidden:
        matcher.enrol("eve", shots["eileen"])
    assert forbidden.value.status == 403 and forbidden.value.code == "FORBIDDEN"

    with pytest.raises(NoUsableFace) as nothing:
        admin.enrol("coffee", shots["coffee"])
    assert [r.code for r in nothing.value.rejected] == ["NO_FACE"]
    with pytest.raises(NoFace) as no_face:
        admin.verify(shots["coffee"], shots["eileen"])
    assert isinstance(no_face.value, ValidationFailed) and no_face.value.field == "image_a"
    with pytest.raises(InvalidImage) as broken:
        admin.verify(shots["eileen"][:400], shots["eileen"])
    assert broken.value.status == 400
    with pytest.raises(UnsupportedMedia):
        admin.verify(b"GIF89a" + bytes(100), shots["eileen"])
    with pytest.raises(ValidationFailed) as invalid:
        admin.identify(shots["eileen"], top_k=0)
    assert invalid.value.code == "VALIDATION_ERROR"
    with pytest.raises(PayloadTooLarge) as too_large:
        admin.identify(bytes(MAX_IMAGE_BYTES + 10))
    assert too_large.value.code in ("IMAGE_TOO_LARGE", "PAYLOAD_TOO_LARGE")

    admin.enrol("kim", shots["camera"], idempotency_key="kim-1")
    with pytest.raises(IdempotencyKeyReused) as reused:
        admin.enrol("kim", shots["camera_mirrored"], idempotency_key="kim-1")
    assert isinstance(reused.value, OAMLAPIError) and reused.value.status == 422


# -------------------------------------------------------------------------------------------------- oaml enrol


def _enrol(capsys: pytest.CaptureFixture[str], *argv: str, progress: bool = False) -> tuple[int, str]:
    code = cli_main(["enrol", *argv, "--key", ADMIN, *([] if progress else ["--no-progress"])])
    return code, capsys.readouterr().out


def _report(path: Path) -> dict[str, tuple[str, str]]:
    with path.open(newline="") as f:
        return {row["image"]: (row["code"], row["subject"]) for row in csv.DictReader(f)}


def test_bulk_enrolment_of_a_folder_reports_and_resumes(
    server: str, admin: OAMLClient, shots: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "people"
    for subject, names in {
        "eileen": ["eileen", "eileen_mirrored", "eileen_crop"],
        "Camera_Man": ["camera", "camera_mirrored", "camera_crop"],
        "nobody": ["coffee"],
    }.items():
        (folder / subject).mkdir(parents=True)
        for name in names:
            (folder / subject / f"{name}.jpg").write_bytes(shots[name])
    (folder / "nobody" / "broken.jpg").write_bytes(shots["eileen"][:400])
    (folder / "nobody" / "notes.txt").write_text("not a photo")
    admin.create_collection("bulk")
    report = tmp_path / "failures.csv"
    argv = (server, str(folder), "--collection", "bulk", "--report", str(report), "--name-from-folder")

    code, out = _enrol(capsys, *argv)
    assert code == 1, out
    assert "enrolled 6," in out and "skipped 0" in out and "failed 2" in out
    assert _report(report) == {
        "nobody/coffee.jpg": ("NO_FACE", "nobody"),
        "nobody/broken.jpg": ("INVALID_IMAGE", "nobody"),
    }
    counts = {s.subject: s.face_count for s in admin.iter_subjects(collection="bulk")}
    assert counts == {"eileen": 3, "Camera_Man": 3}
    assert admin.get_subject("Camera_Man", collection="bulk").name == "Camera Man"

    code, out = _enrol(capsys, *argv)
    assert code == 1 and "enrolled 0," in out and "skipped 6" in out and "failed 2" in out, out
    assert {s.subject: s.face_count for s in admin.iter_subjects(collection="bulk")} == counts

    for broken in ("coffee.jpg", "broken.jpg", "notes.txt"):  # everything usable: exit 0, an empty report
        (folder / "nobody" / broken).unlink()
    (folder / "nobody").rmdir()
    code, out = _enrol(capsys, *argv)
    assert code == 0 and "skipped 6" in out and _report(report) == {}


def test_bulk_enrolment_of_a_csv(
    server: str, admin: OAMLClient, shots: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "img").mkdir()
    for name in ("eileen", "camera", "camera_mirrored"):
        (tmp_path / "img" / f"{name}.jpg").write_bytes(shots[name])
    table = tmp_path / "people.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "name", "image", "metadata"])
        w.writerow(["e-1", "Eileen", "img/eileen.jpg", json.dumps({"team": "blue"})])
        w.writerow(["c-1", "", "img/camera.jpg", ""])
        w.writerow(["c-1", "", "img/camera_mirrored.jpg", "[1, 2]"])
        w.writerow(["c-2", "", "img/missing.jpg", ""])
    report = tmp_path / "report.csv"
    code, out = _enrol(capsys, server, str(table), "--report", str(report), "--concurrency", "2", progress=True)
    assert code == 1, out
    assert _report(report) == {
        "img/camera_mirrored.jpg": ("INVALID_METADATA", "c-1"),
        "img/missing.jpg": ("FILE_UNREADABLE", "c-2"),
    }
    e1 = admin.get_subject("e-1")
    assert e1.name == "Eileen" and e1.metadata == {"team": "blue"} and e1.face_count == 1
    assert admin.get_subject("c-1").face_count == 1


def test_bulk_enrolment_refuses_to_start_without_a_service_or_an_input(
    server: str, tmp_path: Path, shots: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p" / "someone").mkdir(parents=True)
    (tmp_path / "p" / "someone" / "a.jpg").write_bytes(shots["eileen"])
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert _enrol(capsys, unreachable, str(tmp_path / "p"), "--report", str(tmp_path / "r.csv"))[0] == 2
    assert _enrol(capsys, server, str(tmp_path / "missing"))[0] == 2
    assert _enrol(capsys, server, str(tmp_path / "p"), "--collection", "no-such-collection")[0] == 2
    assert cli_main(["enrol", server, str(tmp_path / "p"), "--key", "wrong-key-0123456789", "--no-progress"]) == 2
    assert not (tmp_path / "r.csv").exists()


def test_idempotency_keys_name_the_photo() -> None:
    photo = bulk.Photo("ann", Path("/x/ann/1.jpg"), "ann/1.jpg")
    key = bulk.key_for("default", photo, b"abc")
    assert key == bulk.key_for("default", photo, b"abc") and len(key) <= 255
    assert key != bulk.key_for("other", photo, b"abc")
    assert key != bulk.key_for("default", photo, b"abd")
    assert key != bulk.key_for("default", bulk.Photo("bob", photo.path, photo.shown), b"abc")


def test_the_plain_progress_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: one line, every 10 s off a terminal
    progress = bulk.Progress(3, enabled=True)
    assert progress.bar is None
    for failed in (0, 0, 1):
        progress.update(failed)
    progress.close()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("3/3 photos, ")
