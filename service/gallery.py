"""The gallery as the service keeps it: the store of record, the in-memory index and the subject names.

They change together and in one order: the store first (durable), then the index (searchable),
then the names, one writer at a time (enrolments, deletions, and a replica's follower applying
other replicas' changes), so a deletion can never be undone by a follower that read the face a
moment earlier.

What may wait, and for how long:

- Store work runs in threads of its own (:attr:`Gallery.reads`, :attr:`Gallery.writes`), never in
  the detection pool: a stuck database cannot take the threads that matching needs.
- A write waits at most ``timeout_s`` from the moment it was asked for (in the queue, for the
  writer's lock and, inside the store, for the database's lock): then it fails with 503
  ``STORE_UNAVAILABLE`` and ``Retry-After``.
- Matching (``/verify``, ``/identify``) never touches the store or its locks.

A gallery that cannot be written at start-up (full disk, read-only mount) is served read-only:
matching and reads go on, writes answer 503 ``STORE_READ_ONLY`` with the reason, and each write
asked for at least :data:`READ_ONLY_PROBE_S` after the last try probes the store again, so the
service leaves that mode by itself once space returns.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.engine import Engine
from service.errors import GalleryReadOnly, GalleryStoreError, SubjectNotFound
from service.index import GalleryIndex
from service.store import BUSY, EnrolCommit, Enrolment, FaceRecord, GalleryStore, Render
from service.store_pg import Change, PostgresGalleryStore

__all__ = ["Gallery", "READ_ONLY_PROBE_S", "READ_ONLY_MESSAGE"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between probes of a read-only gallery's store (each made by a write that was asked for).
READ_ONLY_PROBE_S = 2.0
READ_ONLY_MESSAGE = (
    "the gallery database could not be written when the service started (for example a full disk or a read-only "
    "mount): matching and reads are served, enrolments and deletions are refused until a write succeeds; retry later"
)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc keeps the many ~50 KB blocks a load reads
    through and frees; elsewhere a no-op)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Gallery:
    """Store, index and names, changed together (see the module docstring).

    Args:
        store: the store of record.
        index: the in-memory search structures (changed through the engine's worker).
        engine: the inference engine, whose worker owns the index.
        timeout_s: the longest a write may wait before it is refused (503).
        read_threads / write_threads: threads for store reads and writes.
    """

    def __init__(
        self,
        store: GalleryStore,
        index: GalleryIndex,
        engine: Engine,
        timeout_s: float = 5.0,
        read_threads: int = 4,
        write_threads: int = 2,
    ) -> None:
        self.store = store
        self.index = index
        self.engine = engine
        self.timeout_s = timeout_s
        self.names: dict[str, str | None] = {}  # subject -> display name
        self.reads = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="oaml-gallery-read")
        self.writes = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="oaml-gallery-write")
        self._lock = threading.Lock()
        #: why the gallery is read-only (the store's failure at start-up), or None when it is writable
        self.read_only: str | None = None
        self._probed_at = 0.0

    # -- running store work ------------------------------------------------------------------

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a store-read thread."""
        return await asyncio.get_running_loop().run_in_executor(self.reads, fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a store-write thread, holding the writer's lock, refused once ``timeout_s`` has
        passed since this call (503 ``STORE_UNAVAILABLE``) or while the gallery is read-only (503)."""
        asked = time.monotonic()
        return await asyncio.get_running_loop().run_in_executor(self.writes, self._exclusive, asked, fn, args)

    def _exclusive(self, asked: float, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        remaining = self.timeout_s - (time.monotonic() - asked)
        if remaining <= 0 or not self._lock.acquire(timeout=remaining):
            raise GalleryStoreError(BUSY, internal=f"no write slot within {self.timeout_s}s (OAML_STORE_TIMEOUT_S)")
        try:
            self._check_writable()
            return fn(*args)
        finally:
            self._lock.release()

    def mark_read_only(self, reason: str) -> None:
        """Serve read-only: the store could not be written (``reason``, for the log and /info)."""
        self.read_only = reason
        self._probed_at = time.monotonic()
        logger.warning("the gallery is read-only until a write succeeds: %s", reason)

    def _check_writable(self) -> None:
        """Refuse a write while read-only, probing the store again at most every :data:`READ_ONLY_PROBE_S`."""
        if self.read_only is None:
            return
        if time.monotonic() - self._probed_at >= READ_ONLY_PROBE_S:
            self._probed_at = time.monotonic()
            try:
                self.store.check_writable()
            except GalleryStoreError as exc:
                self.read_only = exc.full
            else:
                logger.info("the gallery can be written again: leaving read-only mode")
                self.read_only = None
                return
        raise GalleryReadOnly(READ_ONLY_MESSAGE, internal=self.read_only)

    @property
    def writable(self) -> bool:
        return self.read_only is None

    # -- writes (call through write(); they run holding the lock) -----------------------------

    def commit(
        self, enrolment: Enrolment, key: str | None = None, request_hash: str = "", render: Render | None = None
    ) -> EnrolCommit:
        """Store the enrolment (one transaction), then index its faces and note the subject's name."""
        done = self.store.enrol(enrolment, key, request_hash, render)
        if done.replayed is None:
            self._after_commit(self.index.add_records, enrolment.faces)
            if enrolment.name is not None or enrolment.subject not in self.names:
                self.names[enrolment.subject] = (
                    enrolment.name if enrolment.name is not None else self.names.get(enrolment.subject)
                )
        return done

    def delete_subject(self, subject: str) -> list[str]:
        ids = self.store.delete_subject(subject)
        self._after_commit(self.index.remove, ids)
        self.names.pop(subject, None)
        return ids

    def delete_face(self, subject: str, face_id: str) -> None:
        self.store.delete_face(subject, face_id)
        self._after_commit(self.index.remove, [face_id])

    def update_subject(self, subject: str, changes: dict[str, Any]) -> None:
        self.store.update_subject(subject, changes)
        if "name" in changes:
            self.names[subject] = changes["name"]

    def _after_commit(self, change: Callable[..., None], *args: Any) -> None:
        """Bring the index up to a committed change; if that fails (a device out of memory, a bug), rebuild
        its difference from the store, so it never stays out of step with what was acknowledged. Should that
        fail too, the answer is 503 (a retry with the same Idempotency-Key gets the stored answer)."""
        try:
            self.engine.call_device(change, *args)
        except Exception as first:
            logger.exception("a committed change did not reach the index: reconciling it with the store")
            try:
                self.reconcile()
            except Exception as exc:
                raise GalleryStoreError(
                    "the change is stored, but the in-memory index could not take it yet; retry later",
                    internal=f"index update failed ({first!r}), then reconciling failed ({exc!r})",
                ) from exc

    # -- loading and following ---------------------------------------------------------------

    def load(self, chunk: int = 512) -> int:
        """Fill the index from the store, ``chunk`` faces at a time so memory stays bounded (the inverted file
        of a large gallery is trained once, on all of it, at the end), and the subject names. Memory the
        reading borrows goes back to the system after each batch (the peak is measured in bench/bench_gallery.py)."""
        with self._lock:
            batch: list[FaceRecord] = []
            self.engine.call_device(self.index.begin_loading)
            for face in self.store.iter_faces():
                batch.append(face)
                if len(batch) >= chunk:
                    self.engine.call_device(self.index.add_records, batch)
                    batch = []
                    release_free_memory()  # else the heap keeps every batch's freed blocks, fragmented
            self.engine.call_device(self.index.add_records, batch)
            self.engine.call_device(self.index.finish_loading)
            subjects, _ = self.store.subjects(0, 2**31 - 1)
            self.names = {s.subject: s.name for s in subjects}
            release_free_memory()
            return len(self.index)

    def apply_changes(self, store: PostgresGalleryStore, changes: list[Change]) -> None:
        """Bring the index and names up to ``changes`` (other replicas' and this one's), holding the writer's
        lock, so a local deletion cannot slip between reading a face and indexing it.

        Idempotent: a face already indexed is not added twice, one already removed not removed twice.
        Faces are read from the store when their ``add`` is applied; one deleted since is no longer there,
        so catching up never resurrects a deletion.
        """
        removed = {c.face_id for c in changes if c.op == "delete" and c.face_id}
        wanted = [c.face_id for c in changes if c.op == "add" and c.face_id and c.face_id not in removed]
        with self._lock:
            records = store.faces_by_id([fid for fid in wanted if fid not in self.index])
            self.engine.call_device(self.index.remove, sorted(removed))
            self.engine.call_device(self.index.add_records, records)
            for subject in sorted({c.subject for c in changes}):
                try:
                    self.names[subject] = store.subject(subject).name
                except SubjectNotFound:
                    self.names.pop(subject, None)

    def resync(self) -> None:
        """After a gap in the change log (this replica was silent so long that the log was pruned past its
        position): :meth:`reconcile`, holding the writer's lock."""
        with self._lock:
            self.reconcile()

    def reconcile(self, chunk: int = 1024) -> None:
        """Make the index hold exactly the faces in the store, and reload the names (the caller holds the
        writer's lock)."""
        stored = self.store.face_ids()
        indexed = set(self.index.face_ids)
        self.engine.call_device(self.index.remove, sorted(indexed - stored))
        missing = sorted(stored - indexed)
        for start in range(0, len(missing), chunk):
            self.engine.call_device(self.index.add_records, self.store.faces_by_id(missing[start : start + chunk]))
        subjects, _ = self.store.subjects(0, 2**31 - 1)
        self.names = {s.subject: s.name for s in subjects}
        logger.info("index reconciled with the store: %d removed, %d added", len(indexed - stored), len(missing))

    def close(self) -> None:
        self.reads.shutdown(wait=False, cancel_futures=True)
        self.writes.shutdown(wait=True, cancel_futures=True)
        self.store.close()
