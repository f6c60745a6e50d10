"""``/audit``: the audit log of biometric operations (:mod:`service.audit`), for admins of every collection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from service import audit
from service.routes.deps import CollectionAdmin, StateDep
from service.schemas import AuditPage

__all__ = ["router"]

router = APIRouter(tags=["audit"], dependencies=[CollectionAdmin])

Since = Annotated[float | None, Query(description="entries at or after this time (seconds since the epoch)")]
Until = Annotated[float | None, Query(description="entries before this time")]
Action = Annotated[str | None, Query(description=f"one action: {', '.join(audit.ACTIONS)}")]
InCollection = Annotated[str | None, Query(description="entries about one collection")]


@router.get("/audit", response_model=AuditPage, operation_id="audit_log")
async def audit_log(
    state: StateDep,
    since: Since = None,
    until: Until = None,
    action: Action = None,
    collection: InCollection = None,
    after: Annotated[
        int, Query(ge=0, le=2**63 - 1, description="entries after this position (`next` of the previous page)")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Who (a key's id, never the key) did what (enrol, delete, merge, migrate, create or delete a collection,
    export...) to which subject of which collection, when, and the outcome; oldest first, a page at a time.
    Entries hold no image, embedding or name; a deleted subject appears under a pseudonym."""
    gallery = state.gallery
    entries = await gallery.read(gallery.store.audit_entries, after, limit, since, until, action, collection)
    return AuditPage(entries=entries, next=entries[-1]["seq"] if len(entries) == limit else None)


@router.get("/audit/export", operation_id="export_audit_log", response_class=StreamingResponse)
async def export_audit_log(
    state: StateDep, since: Since = None, until: Until = None, action: Action = None, collection: InCollection = None
) -> StreamingResponse:
    """The whole log (filtered) as JSON lines (`application/x-ndjson`), one entry a line; the export is logged."""
    gallery = state.gallery
    await gallery.write(
        gallery.store.append_audit, audit.AuditEntry("export", collection, detail={"what": "audit log"})
    )

    async def lines() -> AsyncIterator[bytes]:
        after = 0
        while True:
            page = await gallery.read(gallery.store.audit_entries, after, 1000, since, until, action, collection)
            for entry in page:
                yield (json.dumps(entry, sort_keys=True) + "\n").encode()
            if len(page) < 1000:
                return
            after = page[-1]["seq"]

    return StreamingResponse(lines(), media_type="application/x-ndjson")
