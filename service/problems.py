"""One place that maps errors to HTTP: ``application/problem+json`` with a stable ``code``.

Core and service code raise :class:`model.errors.OAMLError` subclasses (:mod:`model.errors`,
:mod:`service.errors`); nothing below HTTP knows status codes. Unexpected exceptions become a 500
``INTERNAL_ERROR`` whose body never contains the traceback (that goes to the log).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import OAMLError

__all__ = ["ApiError", "STATUS", "RETRY_AFTER_S", "Problem", "problem", "install_handlers", "problem_responses"]

logger = logging.getLogger(__name__)

STATUS: dict[str, int] = {
    "INVALID_IMAGE": 400,
    "INVALID_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "SUBJECT_NOT_FOUND": 404,
    "FACE_NOT_FOUND": 404,
    "SUBJECT_HAS_NO_FACES": 409,
    "COLLECTION_NOT_FOUND": 404,
    "COLLECTION_EXISTS": 409,
    "COLLECTION_PROTECTED": 409,
    "COLLECTION_NOT_EMPTY": 409,
    "FACES_WITHOUT_CROPS": 409,
    "MIGRATION_INCOMPLETE": 409,
    "MIGRATION_CONFLICT": 409,
    "MODEL_NOT_AVAILABLE": 409,
    "MODEL_VERSION_MISMATCH": 409,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "REQUEST_TIMEOUT": 408,
    "IMAGE_TOO_LARGE": 413,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA": 415,
    "NO_FACE": 422,
    "MULTIPLE_FACES": 422,
    "FACE_INDEX_OUT_OF_RANGE": 422,
    "NO_USABLE_FACE": 422,
    "LOW_QUALITY": 422,
    "FACE_TOO_SMALL": 422,
    "IDEMPOTENCY_KEY_REUSED": 422,
    "VALIDATION_ERROR": 422,
    "RATE_LIMITED": 429,
    "QUOTA_EXCEEDED": 429,
    "GALLERY_EMPTY": 409,
    "OVERLOADED": 503,
    "NOT_READY": 503,
    "GALLERY_VERSION_MISMATCH": 503,
    "STORE_UNAVAILABLE": 503,
    "STORE_READ_ONLY": 503,
    "INTERNAL_ERROR": 500,
}

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(BaseModel):
    """An error response (RFC 9457 ``application/problem+json``); more fields may follow ``detail``."""

    type: str
    title: str
    status: int
    code: str = Field(description="stable machine-readable error code (see README, Errors)")
    detail: str
    field: str | None = Field(None, description="the request field at fault, when there is one")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries declaring problem+json bodies for these statuses."""
    return {
        status: {
            "model": Problem,
            "description": _TITLES.get(status, "Error"),
            "content": {"application/problem+json": {}},
        }
        for status in statuses
    }


class ApiError(Exception):
    """An error raised by the HTTP layer itself (validation of form fields, auth, limits)."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code, self.detail, self.extra = code, detail, extra


#: Seconds a client should wait before retrying a 503 (``Retry-After``).
RETRY_AFTER_S = 1


def problem(
    code: str, detail: str, status: int | None = None, headers: dict[str, str] | None = None, /, **extra: Any
) -> JSONResponse:
    """A problem+json response; 401 carries ``WWW-Authenticate``, 503 ``Retry-After``."""
    status = status or STATUS.get(code, 400)
    body = {
        "type": f"https://oaml.dev/errors/{code.lower().replace('_', '-')}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'ApiKey header="X-API-Key"'
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status == 429:  # when to come back, and the limit that was hit (IETF RateLimit header fields)
        headers["Retry-After"] = str(max(1, int(extra.get("retry_after", 1))))
        if "limit" in extra:
            headers["RateLimit-Limit"] = str(extra["limit"])
            headers["RateLimit-Remaining"] = str(extra.get("remaining", 0))
            headers["RateLimit-Reset"] = headers["Retry-After"]
            headers["RateLimit-Policy"] = str(extra.get("policy", extra["limit"]))
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.code, exc.detail, **exc.extra)

    @app.exception_handler(OAMLError)
    async def _domain(request: Request, exc: OAMLError) -> JSONResponse:
        if exc.internal:  # the operator's detail (paths, addresses, driver text) stays in the log
            logger.warning("%s on %s %s: %s", exc.code, request.method, request.url.path, exc.internal)
        extra = {k: v for k, v in exc.details.items() if isinstance(v, (int, float, str)) and k != "status"}
        return problem(exc.code, exc.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return problem("VALIDATION_ERROR", "the request does not match the API schema", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT", 413: "PAYLOAD_TOO_LARGE"}.get(
            exc.status_code, "INVALID_REQUEST"
        )
        # keeps Starlette's own headers, e.g. `Allow` on a 405
        return problem(code, str(exc.detail), exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem("INTERNAL_ERROR", "internal error; see the service log")
