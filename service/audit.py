"""The audit log of biometric operations: who (a key's id, never the key), when, what, in which collection,
about which subject, how many faces, and the outcome. Never an image, an embedding, a map or a name.

Entries are written by the store in the transaction of the operation they record (:func:`pending` hands the
entry to the store through a context variable that :class:`service.gallery.Gallery` carries into its write
thread), so an operation and its entry are committed together or not at all. A refused operation is recorded
on its own, with its error code as the outcome. The log is append-only: the service never edits an entry,
except that deleting a subject (or its collection) replaces that subject's id in every entry about it with a
pseudonym (a keyed hash: the same person keeps one pseudonym, which nobody can turn back into the id without
the gallery's own secret), so the log keeps what happened and loses who it happened to; entries older than
``OAML_AUDIT_RETENTION_DAYS`` are deleted.

Both stores keep it (``audit`` / ``oaml_audit``); admins read it through ``GET /audit`` and export it as JSON
lines (``GET /audit/export``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from model.errors import OAMLError
from service.problems import ApiError

__all__ = [
    "write",
    "ACTIONS",
    "AuditEntry",
    "pending",
    "current",
    "note",
    "key_id_var",
    "pseudonym",
    "pseudonymise",
    "AUDIT_COLUMNS",
    "AUDIT_COLUMN_COUNT",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What is recorded.
ACTIONS = (
    "enrol",
    "update_subject",
    "delete_subject",
    "delete_face",
    "merge_subjects",
    "move_faces",
    "collection_create",
    "collection_update",
    "collection_delete",
    "migration_start",
    "migration_switch",
    "migration_cancel",
    "rollback",
    "drop_previous",
    "export",
    "import",
)

#: The stored columns after ``seq`` (both stores).
AUDIT_COLUMNS = "at, key_id, action, collection, subject, other_subject, faces, outcome, detail"
AUDIT_COLUMN_COUNT = AUDIT_COLUMNS.count(",") + 1

#: The key of the request being served (set by the request guard); ``anonymous`` without keys.
key_id_var: ContextVar[str] = ContextVar("oaml_key_id", default="anonymous")
_PENDING: ContextVar[AuditEntry | None] = ContextVar("oaml_audit_entry", default=None)


@dataclass
class AuditEntry:
    """One operation. ``detail`` holds counts and ids of the operation (never biometric data or names)."""

    action: str
    collection: str | None = None
    subject: str | None = None
    other_subject: str | None = None  # a merge's source, a move's destination (pseudonymised as ``subject`` is)
    faces: int = 0
    outcome: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)
    key_id: str = field(default_factory=key_id_var.get)
    at: float = field(default_factory=time.time)
    recorded: bool = field(default=False, repr=False)  # written by a committed transaction (never twice)

    def row(self) -> tuple[Any, ...]:
        """The values of :data:`AUDIT_COLUMNS`."""
        return (
            self.at,
            self.key_id,
            self.action,
            self.collection,
            self.subject,
            self.other_subject,
            self.faces,
            self.outcome,
            json.dumps(self.detail, sort_keys=True),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "recorded"}


def entry_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A stored row (``seq``, then :data:`AUDIT_COLUMNS`) as the API answers it."""
    seq, at, key, action, collection, subject, other, faces, outcome, detail = row
    return {
        "seq": int(seq),
        "at": float(at),
        "key_id": key,
        "action": action,
        "collection": collection,
        "subject": subject,
        "other_subject": other,
        "faces": int(faces),
        "outcome": outcome,
        "detail": json.loads(detail) if detail else {},
    }


@contextmanager
def pending(entry: AuditEntry) -> Iterator[AuditEntry]:
    """Within this block, the store's next write transaction records ``entry`` (and the block may still change
    it, e.g. its face count, before that transaction commits)."""
    token = _PENDING.set(entry)
    try:
        yield entry
    finally:
        _PENDING.reset(token)


def current() -> AuditEntry | None:
    """The entry a write transaction in progress should record, if any."""
    return _PENDING.get()


def note(**changes: Any) -> None:
    """Fill in what only the store knows (e.g. ``faces=`` deleted) on the entry being recorded."""
    entry = _PENDING.get()
    if entry is not None:
        for name, value in changes.items():
            setattr(entry, name, value)


def pseudonym(secret: bytes, collection: str, subject: str) -> str:
    """What replaces a deleted subject's id in the log: the same for every entry about that person."""
    digest = hmac.new(secret, f"{collection}\x00{subject}".encode(), hashlib.sha256).hexdigest()
    return f"deleted-{digest[:16]}"


#: Pseudonymise a subject in the log (placeholders ``{p}`` table prefix, ``{q}`` parameter mark): the pseudonym,
#: the collection, the id; once for ``subject``, once for ``other_subject``.
_PSEUDONYMISE = tuple(
    f"UPDATE {{p}}audit SET {column} = {{q}} WHERE collection = {{q}} AND {column} = {{q}}"
    for column in ("subject", "other_subject")
)


def pseudonymise(
    execute: Callable[[str, tuple[Any, ...]], Any],
    secret: bytes,
    prefix: str,
    mark: str,
    collection: str,
    subjects: Any,
) -> None:
    """Replace ``subjects``' ids in every entry of ``collection`` (both columns) by their pseudonyms, and in the
    entry being recorded: run by a store in the transaction that deletes them (a deletion, a merge's source)."""
    statements = [sql.format(p=prefix, q=mark) for sql in _PSEUDONYMISE]
    gone = set(subjects)
    for subject in gone:
        alias = pseudonym(secret, collection, subject)
        for sql in statements:
            execute(sql, (alias, collection, subject))
    entry = _PENDING.get()
    if entry is not None:
        if entry.subject in gone:
            entry.subject = pseudonym(secret, collection, entry.subject)  # type: ignore[arg-type]
        if entry.other_subject in gone:
            entry.other_subject = pseudonym(secret, collection, entry.other_subject)  # type: ignore[arg-type]


class _Gallery(Protocol):
    store: Any

    def write(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


async def write(gallery: _Gallery, entry: AuditEntry, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` as a gallery write (:meth:`service.gallery.Gallery.write`) whose transaction records ``entry``;
    a refused write is recorded on its own, its error code as the outcome (best effort: a store that cannot be
    written is named in the log, and the refusal's answer stands)."""
    with pending(entry):
        try:
            return await gallery.write(fn, *args)
        except (OAMLError, ApiError) as exc:
            if not entry.recorded:
                entry.outcome = exc.code
                try:
                    await gallery.write(gallery.store.append_audit, entry)
                except OAMLError as failed:
                    logger.warning("could not record the refused %s in the audit log: %s", entry.action, failed.message)
            raise
