"""Authenticate and limit a request before its body is read (pure ASGI, outside FastAPI's routing).

FastAPI parses multipart bodies (spooling uploads to temporary files) before any dependency
runs, so a key check or a size check in a route comes too late: a client without a key could
make the server write gigabytes. :class:`RequestGuard` sits in front of the app:

- **API keys** (``OAML_API_KEYS``): the key is taken from the headers (``X-API-Key`` or
  ``Authorization: Bearer``); an unknown or missing key gets 401 without one byte of the body
  being read. The key's grant (its role, ``admin`` or ``match``, and the collections it is
  limited to, if any) is left in the request state for the routes' checks (403).
- **Body size**: each route has a limit from the settings (a ``/verify`` carries two images, an
  enrolment up to ``OAML_MAX_IMAGES_PER_REQUEST``). A declared ``Content-Length`` over it gets 413
  at once; a chunked body is counted as it arrives and refused with 413 just past the limit.
- **Body deadline**: a body must keep arriving: no gap longer than ``OAML_BODY_TIMEOUT`` seconds, and after
  that grace at least ``OAML_BODY_MIN_RATE`` bytes a second on average, else 408 and the connection is closed
  (a client sending a byte every few seconds would otherwise hold a connection, and a place among
  ``OAML_LIMIT_CONCURRENCY``, for as long as it likes; uvicorn has no such timer of its own).
- **Rate limits** (``OAML_RATE_LIMITS``): each key may make so many requests a second (a token bucket per key,
  sustained rate and burst by its role); beyond it 429 ``RATE_LIMITED`` before the body is read, with
  ``Retry-After``. Every answer to a limited key carries the IETF ``RateLimit-Limit``, ``-Remaining``, ``-Reset``
  and ``-Policy`` fields. Counted per replica.
- **Response hygiene**: every response carries ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from service import audit
from service.config import Settings, grant_for, parse_rate_limits
from service.problems import problem

__all__ = ["RequestGuard", "PUBLIC_PATHS", "ROLES", "body_limit", "BodyTooLarge", "BodyTooSlow", "BodyPace"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Answer without a key: probes, the API documentation (its assets served from the package) and the demo page
#: (whose calls send the key). Metrics need a key: they count every collection's faces.
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/docs", "/openapi.json"})
PUBLIC_PREFIXES = ("/demo", "/docs/assets/")
#: ``match`` may verify, identify and look at uploaded photos; ``admin`` may also enrol, list,
#: delete and read enrolled faces (whose crops may be stored).
ROLES = ("match", "admin")
#: Room for multipart boundaries and form fields beside the images.
FORM_OVERHEAD = 1024 * 1024


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its route's limit (answered as 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class BodyTooSlow(HTTPException):
    """Raised from ``receive`` when a body stops arriving or arrives too slowly (answered as 408, then closed)."""

    def __init__(self, received: int, seconds: float) -> None:
        super().__init__(
            408,
            f"the request body arrived too slowly ({received} bytes in {seconds:.0f} s); send it at once",
            headers={"Connection": "close"},
        )


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens a second up to ``burst``; a request takes one (thread-safe)."""

    def __init__(self, limits: dict[str, tuple[float, float]]) -> None:
        self.limits = limits
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str, role: str) -> tuple[bool, float, float, float] | None:
        """(allowed, seconds until the next token, burst, tokens left) for one request of ``key_id``; None when
        its role has no limit."""
        rate, burst = self.limits.get(role, (0.0, 0.0))
        if rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, then = self._state.get(key_id, (burst, now))
            tokens = min(burst, tokens + (now - then) * rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._state[key_id] = (tokens, now)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate
        return allowed, wait, burst, tokens


class BodyPace:
    """When the next body chunk must have arrived: within ``grace`` seconds of the last, and with at least
    ``min_rate`` bytes a second on average once ``grace`` has passed since the body started."""

    def __init__(self, grace: float, min_rate: float) -> None:
        self.grace, self.min_rate = grace, min_rate
        self.started = time.monotonic()
        self.received = 0

    def wait_left(self) -> float:
        """Seconds the next chunk may take (0 or less: too late already)."""
        now = time.monotonic()
        behind = self.started + self.grace + self.received / self.min_rate - now
        return min(self.grace, behind)

    def too_slow(self) -> BodyTooSlow:
        return BodyTooSlow(self.received, time.monotonic() - self.started)


def body_limit(settings: Settings, method: str, path: str) -> int:
    """Most bytes a request to ``method path`` may carry."""
    images = {"/verify": 2, "/explain": 2, "/identify": 1, "/occlusion": 1, "/gallery": settings.max_images_per_request}
    count = images.get(path, 0) if method == "POST" else 0
    if method == "POST" and path.startswith("/gallery/") and path.endswith("/verify"):  # /gallery/{subject}/verify
        count = 1
    if method == "POST" and path.startswith("/collections/") and path.endswith("/import"):
        return settings.max_import_mb * 1024 * 1024
    return count * settings.max_image_bytes + FORM_OVERHEAD


def supplied_key(headers: Headers) -> str | None:
    key = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


class RequestGuard:
    """ASGI middleware: key check, per-route body limit, ``nosniff``. See the module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings, on_body: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.grants = settings.key_grants()
        self.buckets = TokenBuckets(parse_rate_limits(settings.rate_limits))
        self.on_body = on_body  # told how many body bytes each request had read (metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_nosniff(send)
        headers = Headers(scope=scope)
        path, method = scope["path"], scope["method"]
        if self.grants and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            grant = grant_for(self.grants, supplied_key(headers))
            if grant is None:
                await problem("UNAUTHORIZED", "missing or invalid API key (send X-API-Key)")(scope, receive, send)
                return
            scope.setdefault("state", {})["oaml_grant"] = grant
            audit.key_id_var.set(grant.key_id)  # who the audit log names (an id, never the key)
            taken = self.buckets.take(grant.key_id, grant.role)
            if taken is not None:
                allowed, wait, burst, left = taken
                rate = self.buckets.limits[grant.role][0]
                policy = f"{burst:g};w={burst / rate:g}"
                if not allowed:
                    await problem(
                        "RATE_LIMITED",
                        f"this API key may make {rate:g} requests a second (bursts of {burst:g}); retry later",
                        retry_after=math.ceil(wait),
                        limit=f"{burst:g}",
                        remaining=0,
                        policy=policy,
                    )(scope, receive, send)
                    return
                send = _with_headers(
                    send,
                    {
                        "RateLimit-Limit": f"{burst:g}",
                        "RateLimit-Remaining": str(int(left)),
                        "RateLimit-Reset": str(math.ceil(wait)),
                        "RateLimit-Policy": policy,
                    },
                )
        limit = body_limit(self.settings, method, path)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await problem("PAYLOAD_TOO_LARGE", f"request body over {limit} bytes", max_bytes=limit)(
                scope, receive, send
            )
            return
        pace = BodyPace(self.settings.body_timeout, self.settings.body_min_rate)
        done = False

        async def counted() -> Message:
            nonlocal done
            if done:  # the body is complete: what is left to receive is the disconnect, whenever it comes
                return await receive()
            left = pace.wait_left()
            if left <= 0:
                raise pace.too_slow()
            try:
                message = await asyncio.wait_for(receive(), timeout=left)
            except TimeoutError:
                raise pace.too_slow() from None
            if message["type"] == "http.request":
                pace.received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if pace.received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            if self.on_body is not None:
                self.on_body(pace.received)


def _with_headers(send: Send, headers: dict[str, str]) -> Send:
    extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            names = {k for k, _ in extra}
            message["headers"] = [*(h for h in message.get("headers", []) if h[0].lower() not in names), *extra]
        await send(message)

    return wrapped


def _with_nosniff(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            raw = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
            message["headers"] = [*raw, (b"x-content-type-options", b"nosniff")]
        await send(message)

    return wrapped
