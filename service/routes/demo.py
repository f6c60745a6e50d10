"""The demo page: plain HTML, CSS and a small script served from the package; a client of the public API only."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.problems import ApiError

__all__ = ["router", "STATIC"]

STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/demo/")


@router.get("/demo")
@router.get("/demo/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=_TYPES["index.html"])


@router.get("/demo/{name}")
async def asset(name: str) -> FileResponse:
    if name not in _TYPES:
        raise ApiError("NOT_FOUND", f"no demo file {name!r}")
    return FileResponse(STATIC / name, media_type=_TYPES[name])
