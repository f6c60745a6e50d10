"""The demo page and the API documentation: plain HTML, CSS and scripts served from the package (nothing from
elsewhere), each with a Content-Security-Policy that allows only this origin and no framing."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from service.problems import ApiError

__all__ = ["router", "STATIC", "DEMO_POLICY", "DOCS_POLICY", "SWAGGER_UI"]

#: The demo page's policy: its own script and style only; pictures also from the photos the user picked (blob:)
#: and the answers' embedded pictures (data:); it may not be framed (clickjacking) nor post elsewhere.
DEMO_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: Swagger UI's page starts it with an inline script and inline styles; everything else from this origin.
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
#: Swagger UI, pinned by the swagger-ui-bundle package (pyproject.toml): served from here, never from a CDN.
SWAGGER_UI = Path(str(swagger_ui_bundle.swagger_ui_path))
_DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
_FRAMING = {"X-Frame-Options": "DENY"}

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
    headers = {"Content-Security-Policy": DEMO_POLICY, **_FRAMING}
    return FileResponse(STATIC / "index.html", media_type=_TYPES["index.html"], headers=headers)


@router.get("/demo/{name}")
async def asset(name: str) -> FileResponse:
    if name not in _TYPES:
        raise ApiError("NOT_FOUND", f"no demo file {name!r}")
    return FileResponse(STATIC / name, media_type=_TYPES[name])


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI over /openapi.json, its script and style served from the package."""
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon-32x32.png",
    )
    page.headers.update({"Content-Security-Policy": DOCS_POLICY, **_FRAMING})
    return page


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> FileResponse:
    if name not in _DOCS_ASSETS:
        raise ApiError("NOT_FOUND", f"no documentation file {name!r}")
    return FileResponse(SWAGGER_UI / name, media_type=_DOCS_ASSETS[name])
