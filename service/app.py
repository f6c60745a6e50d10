"""The FastAPI application: lifespan (load, warm up, open the gallery), middleware, routers.

``create_app()`` builds an app from :class:`service.config.Settings`; ``oaml serve`` runs it with
uvicorn. Tests pass settings (and optionally a ready :class:`service.engine.Engine`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from service.config import Settings, get_settings
from service.engine import Engine
from service.errors import GalleryStoreError, GalleryVersionError, ModelNotAvailable
from service.gallery import Gallery
from service.guard import RequestGuard
from service.index import GalleryIndex
from service.migration import Migrations
from service.problems import Problem, install_handlers, problem_responses
from service.routes import protected, public
from service.state import AppState, Metrics, open_store
from service.store import GalleryStore
from service.store_pg import ChangeFollower, PostgresGalleryStore

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

DESCRIPTION = """Occlusion-aware face verification and identification.

Photos in (JPEG, PNG, WebP or BMP, any size; faces are detected and aligned), answers out: a fused score of the AdaFace
cosine and the occlusion-weighted QAConv local matcher, a calibrated probability, the threshold
applied, and for each face its box, landmarks, quality and 7x7 visibility map (1 = visible).
Errors are `application/problem+json` with a stable `code`.
"""


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()
    given = engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.perf_counter()
        eng: Engine = given if given is not None else await asyncio.to_thread(Engine, settings)
        eng.start()
        gallery: Gallery | None = None
        follower: ChangeFollower | None = None
        try:
            await asyncio.to_thread(eng.warm_up)
            store = await asyncio.to_thread(open_store, settings, eng.model_version)

            def new_index(version: str | None, engine: Engine = eng) -> GalleryIndex:
                return GalleryIndex(
                    engine.model_for(version).model.qaconv,
                    engine.device,
                    engine.gallery_dtype,
                    engine.model.embedding_size,
                    ann_min_faces=settings.ann_min_faces,
                    ann_probe=settings.ann_probe,
                    map_storage=settings.map_storage,
                )

            # every model version a collection is matched with, or migrates to, is loaded before the gallery
            await asyncio.to_thread(load_versions, eng, store)
            gallery = Gallery(store, new_index, eng, timeout_s=settings.store_timeout_s)
            try:
                await asyncio.to_thread(store.check_writable)
            except GalleryStoreError as exc:  # full disk, read-only mount: serve matching, refuse writes
                gallery.mark_read_only(exc.full)
            if isinstance(store, PostgresGalleryStore):
                # registered (at the change log's end) before loading: nothing after is pruned until it is applied
                shared, loaded = store, gallery
                follower = await asyncio.to_thread(
                    ChangeFollower,
                    shared,
                    lambda changes: loaded.apply_changes(shared, changes),
                    loaded.resync,
                    settings.gallery_poll_s,
                    settings.replica_stale_s,
                    None,
                    lambda: sorted(eng.models.loaded),
                )
            faces = await asyncio.to_thread(gallery.load)
        except BaseException:  # a failed start-up leaves no worker running and no replica registered
            if follower is not None:
                follower.stop()
            if gallery is not None:
                gallery.close()
            eng.stop()
            raise
        metrics = Metrics(settings.max_batch)
        eng.stats.hooks.append(metrics.on_batch)
        state = AppState(settings, eng, gallery, metrics, follower=follower)
        state.migrations = Migrations(state)
        if follower is not None:
            follower.start()
        state.migrations.resume()
        state.ready = True
        app.state.oaml = state
        if not settings.authenticated:
            logger.warning(
                "authentication is off (OAML_API_KEYS is empty): whoever reaches %s:%d may enrol, delete and read "
                "faces%s",
                settings.host,
                settings.port,
                " (allowed by OAML_ALLOW_UNAUTHENTICATED)" if settings.allow_unauthenticated else "",
            )
        logger.info(
            "OAML ready in %.1fs: model %s on %s, %d faces of %d subjects in %d collection(s)%s",
            time.perf_counter() - started,
            eng.model_version,
            eng.device,
            faces,
            gallery.subjects,
            len(gallery.collections),
            "" if gallery.writable else " (read-only)",
        )
        try:
            yield
        finally:
            state.ready = False
            await state.migrations.stop()
            if follower is not None:
                follower.stop()
            gallery.close()  # the writes in flight finish first: they still need the engine's worker
            eng.stop()

    # /docs is the demo router's (Swagger UI served from the package, not from a CDN); no ReDoc (CDN-only)
    app = FastAPI(
        title="OAML", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    install_handlers(app)

    def count_body(size: int) -> None:
        state: AppState | None = getattr(app.state, "oaml", None)
        if state is not None:
            state.metrics.body_bytes.inc(size)

    # Starlette runs the middleware added last outermost. The guard goes first, so it runs inside `observe`
    # (whose metrics then count its 401 and 413 answers) and inside CORS (preflight requests carry no key).
    app.add_middleware(RequestGuard, settings=settings, on_body=count_body)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        state: AppState | None = getattr(request.app.state, "oaml", None)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        if state is not None:
            state.metrics.requests.labels(path, request.method, str(response.status_code)).inc()
            state.metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
        )
    for router in public:
        app.include_router(router)
    for router in protected:
        app.include_router(router, responses=problem_responses(401, 403, 422, 503))
    app.openapi = lambda: problem_openapi(app)  # type: ignore[method-assign]
    return app


def load_versions(engine: Engine, store: GalleryStore) -> None:
    """Load the weights of every model version the gallery's collections are matched with or migrate to; a
    version that is nowhere to be found stops start-up naming the collections that need it and where it was
    looked for (OAML_WEIGHTS_DIR)."""
    needed: dict[str, list[str]] = {}
    for record in store.collections():
        for version in (record.model_version, (record.migration or {}).get("to")):
            if version:
                needed.setdefault(version, []).append(record.name)
    missing = []
    for version, names in sorted(needed.items()):
        try:
            engine.models.load(version)
        except ModelNotAvailable as exc:
            missing.append(f"{', '.join(repr(n) for n in names)} need model {version} ({exc.message})")
    if missing:
        raise GalleryVersionError(
            "collections are matched with weights the service cannot load: "
            + "; ".join(missing)
            + ". Put those weights in OAML_WEIGHTS_DIR, or serve a gallery without them",
            internal=f"looked in {engine.models.folder()}",
        )


def problem_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with every error response declared as ``application/problem+json``."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        ref = {"$ref": "#/components/schemas/Problem"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    if status.isdigit() and int(status) >= 400:
                        response["content"] = {"application/problem+json": {"schema": ref}}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault("Problem", Problem.model_json_schema())
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
