"""HTTP routers, one per resource. Each route parses its request and calls one use case.

``public`` routers answer without an API key (health, readiness, metrics); ``protected`` ones
need one when ``OAML_API_KEYS`` is set.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.routes import audit, collections, demo, explain, gallery, health, identify, occlusion, verify

__all__ = ["public", "protected"]

public: list[APIRouter] = [health.public, demo.router]
protected: list[APIRouter] = [
    health.protected,
    verify.router,
    explain.router,
    gallery.router,
    collections.router,
    audit.router,
    identify.router,
    occlusion.router,
]
