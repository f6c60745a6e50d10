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

Collections (named, isolated galleries) each have an index and names of their own: a search in one
never sees another's faces, and the open-set thresholds follow each one's size.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from model.errors import OAMLError
from service.deadline import write_deadline
from service.engine import Engine
from service.errors import (
    CollectionNotFound,
    CollectionProtected,
    GalleryReadOnly,
    GalleryStoreError,
    SubjectNotFound,
)
from service.index import GalleryIndex
from service.memory import release_free_memory
from service.store import (
    BUSY,
    DEFAULT_COLLECTION,
    CollectionRecord,
    EnrolCommit,
    Enrolment,
    FaceEmbedding,
    FaceRecord,
    GalleryStore,
    Render,
)
from service.store_pg import Change, PostgresGalleryStore

__all__ = ["Gallery", "Collection", "READ_ONLY_PROBE_S", "READ_ONLY_MESSAGE"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between probes of a read-only gallery's store (each made by a write that was asked for).
READ_ONLY_PROBE_S = 2.0
READ_ONLY_MESSAGE = (
    "the gallery database could not be written when the service started (for example a full disk or a read-only "
    "mount): matching and reads are served, enrolments and deletions are refused until a write succeeds; retry later"
)


@dataclass
class Collection:
    """One collection as the service searches it: its index (of its model version's faces), its subjects'
    display names, and its record (versions, migration, crops policy) as last read from the store."""

    name: str
    index: GalleryIndex
    names: dict[str, str | None] = field(default_factory=dict)  # subject -> display name
    record: CollectionRecord | None = None

    @property
    def version(self) -> str | None:
        """The model version its faces are matched with (None: none yet, the default weights')."""
        return self.record.model_version if self.record is not None else None

    def versions_to_write(self, default: str) -> list[str]:
        """The versions an enrolment writes: the active one first, then a running migration's target and the
        previous one kept for rollback (so that switching, or switching back, finds every face)."""
        active = self.version or default
        record = self.record
        others = []
        if record is not None:
            target = (record.migration or {}).get("to")
            others = [v for v in (target, record.previous_version) if v and v != active]
        return [active, *dict.fromkeys(others)]


def _by_collection(records: Iterable[FaceRecord]) -> dict[str, list[FaceRecord]]:
    grouped: dict[str, list[FaceRecord]] = defaultdict(list)
    for record in records:
        grouped[record.collection].append(record)
    return grouped


class Gallery:
    """Store, indexes and names, changed together (see the module docstring).

    Args:
        store: the store of record.
        new_index: makes an empty index (in-memory search structures, changed through the engine's worker)
            for a collection matched with a model version (None: the default weights).
        engine: the inference engine, whose worker owns the indexes.
        timeout_s: the longest a write may wait before it is refused (503).
        read_threads / write_threads: threads for store reads and writes.
    """

    def __init__(
        self,
        store: GalleryStore,
        new_index: Callable[[str | None], GalleryIndex],
        engine: Engine,
        timeout_s: float = 5.0,
        read_threads: int = 4,
        write_threads: int = 2,
    ) -> None:
        self.store = store
        self.new_index = new_index
        self.engine = engine
        self.timeout_s = timeout_s
        #: name -> collection; a dict replaced or changed only under the writer's lock, read without it
        self.collections: dict[str, Collection] = {DEFAULT_COLLECTION: Collection(DEFAULT_COLLECTION, new_index(None))}
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
        context = contextvars.copy_context()  # the caller's audit entry and key go along to the write thread
        return await asyncio.get_running_loop().run_in_executor(
            self.writes, context.run, self._exclusive, asked, fn, args
        )

    def _exclusive(self, asked: float, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        deadline = asked + self.timeout_s
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._lock.acquire(timeout=remaining):
            raise GalleryStoreError(BUSY, internal=f"no write slot within {self.timeout_s}s (OAML_STORE_TIMEOUT_S)")
        try:
            with write_deadline(deadline):  # the store's own waits get what is left, not a fresh timeout
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

    # -- what the routes read ----------------------------------------------------------------

    def collection(self, name: str) -> Collection:
        """The collection called ``name`` (404 ``COLLECTION_NOT_FOUND`` when there is none)."""
        found = self.collections.get(name)
        if found is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return found

    async def find(self, name: str) -> Collection:
        """:meth:`collection`, and with a shared store, one another replica made a moment ago
        (:meth:`refresh_collection`), so a client creating a collection on one replica and enrolling through
        another is not told it does not exist."""
        found = self.collections.get(name)
        if found is not None:
            return found
        if not isinstance(self.store, PostgresGalleryStore):
            return self.collection(name)
        return await self.read(self.refresh_collection, name)

    def refresh_collection(self, name: str) -> Collection:
        """The collection called ``name``, looking in the store when this replica does not hold it yet (made by
        another replica a moment ago, before this one's follower caught up): it is taken in now, empty, and its
        faces come with the follower's next catch-up. 404 ``COLLECTION_NOT_FOUND`` when the store has none.
        Waits for the writer's lock at most ``timeout_s`` (then 503)."""
        found = self.collections.get(name)
        if found is not None:
            return found
        self.store.collection(name)  # CollectionNotFound when no replica made it
        if not self._lock.acquire(timeout=self.timeout_s):
            raise GalleryStoreError(BUSY, internal=f"no write slot within {self.timeout_s}s to take in collection")
        try:
            self._sync_collections()
        finally:
            self._lock.release()
        return self.collection(name)

    @property
    def index(self) -> GalleryIndex:
        """The default collection's index (what a client that names no collection searches)."""
        return self.collections[DEFAULT_COLLECTION].index

    @property
    def faces(self) -> int:
        """Faces in every collection."""
        return sum(len(c.index) for c in list(self.collections.values()))

    @property
    def subjects(self) -> int:
        """Subjects in every collection."""
        return sum(len(c.names) for c in list(self.collections.values()))

    # -- writes (call through write(); they run holding the lock) -----------------------------

    def commit(
        self, enrolment: Enrolment, key: str | None = None, request_hash: str = "", render: Render | None = None
    ) -> EnrolCommit:
        """Store the enrolment (one transaction), then index its faces and note the subject's name."""
        target = self.collection(enrolment.collection)
        done = self.store.enrol(enrolment, key, request_hash, render)
        if done.replayed is None:
            self._after_commit(target.index.add_records, enrolment.faces)
            if enrolment.name is not None or enrolment.subject not in target.names:
                target.names[enrolment.subject] = (
                    enrolment.name if enrolment.name is not None else target.names.get(enrolment.subject)
                )
        return done

    def delete_subject(self, subject: str, collection: str = DEFAULT_COLLECTION) -> list[str]:
        target = self.collection(collection)
        ids = self.store.delete_subject(subject, collection)
        self._after_commit(target.index.remove, ids)
        target.names.pop(subject, None)
        return ids

    def delete_face(self, subject: str, face_id: str, collection: str = DEFAULT_COLLECTION) -> None:
        target = self.collection(collection)
        self.store.delete_face(subject, face_id, collection)
        self._after_commit(target.index.remove, [face_id])

    def merge_subjects(self, collection: str, into: str, source: str) -> list[str]:
        """Every face of ``source`` becomes ``into``'s and ``source`` is gone (store, then index, then names)."""
        target = self.collection(collection)
        ids = self.store.merge_subjects(collection, into, source)
        self._reindex(target, ids)
        target.names.pop(source, None)
        target.names[into] = self.store.subject(into, collection).name
        return ids

    def move_faces(self, collection: str, face_ids: list[str], source: str, to: str) -> list[str]:
        """Faces of ``source`` become ``to``'s (a subject made if new)."""
        target = self.collection(collection)
        ids = self.store.move_faces(collection, face_ids, source, to)
        self._reindex(target, ids)
        target.names.setdefault(to, None)
        return ids

    def _reindex(self, target: Collection, face_ids: list[str]) -> None:
        """Index ``face_ids`` again as the store has them now (their subject changed): read here, in the write
        thread, then swapped in the index by the engine's worker."""
        records = self.store.faces_by_id(face_ids, {target.name: target.version or self.default_version})

        def swap() -> None:
            target.index.remove(face_ids)
            target.index.add_records(records)

        self._after_commit(swap)

    def update_subject(self, subject: str, changes: dict[str, Any], collection: str = DEFAULT_COLLECTION) -> None:
        target = self.collection(collection)
        self.store.update_subject(subject, changes, collection)
        if "name" in changes:
            target.names[subject] = changes["name"]

    def create_collection(self, name: str, version: str | None = None) -> CollectionRecord:
        """A new collection, matched with model ``version`` (the default weights')."""
        record = self.store.create_collection(name, version)
        self.collections = {**self.collections, name: Collection(name, self.new_index(version), record=record)}
        return record

    def update_collection(self, name: str, changes: dict[str, Any]) -> CollectionRecord:
        """Change a collection's settings (its crops policy, a migration's state) in the store, then here."""
        held = self.collection(name)
        record = self.store.update_collection(name, changes)
        held.record = record
        return record

    def put_embeddings(self, name: str, items: list[tuple[str, FaceEmbedding]], migration: dict[str, Any]) -> int:
        """A migration's batch: faces' data at its target version, stored with its progress (which this replica's
        record of the collection takes too: status reads it)."""
        held = self.collection(name)
        written = self.store.put_embeddings(name, items, migration)
        if held.record is not None:
            held.record = dataclasses.replace(held.record, migration=dict(migration))
        return written

    def switch_version(self, name: str, to: str, drop_missing: bool = False) -> tuple[CollectionRecord, list[str]]:
        """Match collection ``name`` with model ``to`` from now on: switched in the store in one transaction, then
        its index rebuilt here from the store's data at ``to`` and swapped in whole, so no search ever sees faces
        of two versions. Returns the record and the faces dropped (``drop_missing``: those without ``to``)."""
        self.collection(name)
        record, dropped = self.store.switch_version(name, to, drop_missing)
        self._reload(record)
        return record, dropped

    def drop_version(self, name: str, version: str) -> CollectionRecord:
        held = self.collection(name)
        record = self.store.drop_version(name, version)
        held.record = record
        return record

    def _reload(self, record: CollectionRecord) -> None:
        """Hold collection ``record.name`` at ``record.model_version``: a new index filled from the store, swapped in
        whole (the old one's memory goes back when the last search on it ends)."""
        index = self.new_index(record.model_version)
        self.engine.call_device(index.begin_loading)
        batch: list[FaceRecord] = []
        for face in self.store.faces_for(record.name, record.model_version or self.default_version):
            batch.append(face)
            if len(batch) >= 512:
                self.engine.call_device(index.add_records, batch)
                batch = []
        self.engine.call_device(index.add_records, batch)
        self.engine.call_device(index.finish_loading)
        old = self.collections.get(record.name)
        names = old.names if old is not None else {}
        self.collections = {**self.collections, record.name: Collection(record.name, index, names, record)}
        if old is not None:
            self.engine.call_device(old.index.remove, list(old.index.face_ids))
        release_free_memory()

    @property
    def default_version(self) -> str:
        """The default weights' version: what a collection without one is matched with."""
        return str(self.engine.model_version)

    def delete_collection(self, name: str) -> list[str]:
        """Delete a collection, its subjects and faces; the default collection is refused (409)."""
        if name == DEFAULT_COLLECTION:
            raise CollectionProtected(
                f"the {DEFAULT_COLLECTION!r} collection is where clients that name no collection enrol and search: "
                "delete its subjects instead"
            )
        target = self.collection(name)
        ids = self.store.delete_collection(name)
        self.collections = {k: v for k, v in self.collections.items() if k != name}
        self._after_commit(target.index.remove, ids)  # frees its memory now, not when the last search ends
        return ids

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
        """Fill the indexes from the store, ``chunk`` faces at a time so memory stays bounded (the inverted file
        of a large gallery is trained once, on all of it, at the end), and the subject names. Memory the
        reading borrows goes back to the system after each batch (the peak is measured in bench/bench_gallery.py).
        Returns the faces loaded, in every collection."""
        with self._lock:
            self.collections = {
                r.name: Collection(r.name, self.new_index(r.model_version), record=r) for r in self.store.collections()
            }
            for target in self.collections.values():
                self.engine.call_device(target.index.begin_loading)
                batch: list[FaceRecord] = []
                for face in self.store.faces_for(target.name, target.version or self.default_version):
                    batch.append(face)
                    if len(batch) >= chunk:
                        self.engine.call_device(target.index.add_records, batch)
                        batch = []
                        release_free_memory()  # else the heap keeps every batch's freed blocks, fragmented
                self.engine.call_device(target.index.add_records, batch)
                self.engine.call_device(target.index.finish_loading)
            self._load_names()
            release_free_memory()
            return self.faces

    def versions(self) -> dict[str, str]:
        """Collection -> the model version it is matched with (the default weights' for one without)."""
        return {name: c.version or self.default_version for name, c in self.collections.items()}

    def _index_records(self, records: Iterable[FaceRecord]) -> None:
        """Add faces to their collections' indexes (faces of a collection not held here are skipped: it was
        deleted, and its deletion is applied too)."""
        for name, faces in _by_collection(records).items():
            target = self.collections.get(name)
            if target is not None:
                self.engine.call_device(target.index.add_records, faces)

    def _load_names(self) -> None:
        subjects, _ = self.store.subjects(0, 2**31 - 1, None)
        names: dict[str, dict[str, str | None]] = defaultdict(dict)
        for s in subjects:
            names[s.collection][s.subject] = s.name
        for target in self.collections.values():
            target.names = names.get(target.name, {})

    def _sync_collections(self) -> None:
        """Hold exactly the store's collections at their versions: new ones get an empty index, deleted ones are
        dropped, one switched to another model version is reloaded at it (its model loaded first: a replica
        that cannot load it keeps the old version and says so in the log), the others take their new record."""
        stored = {r.name: r for r in self.store.collections()}
        kept = {k: v for k, v in self.collections.items() if k in stored}
        for name in stored.keys() - kept.keys():
            kept[name] = Collection(name, self.new_index(stored[name].model_version), record=stored[name])
        self.collections = kept
        for name, held in list(kept.items()):
            record = stored[name]
            target = (record.migration or {}).get("to")
            if target and target not in self.engine.models.loaded:  # another replica migrates it: get ready to follow
                threading.Thread(target=self._load_quietly, args=(target,), name="oaml-model-load", daemon=True).start()
            if (record.model_version or self.default_version) == (held.version or self.default_version):
                held.record = record
                continue
            try:
                self.prepare_version(record.model_version)
            except OAMLError as exc:
                logger.error(
                    "collection %r switched to model %s, which this replica cannot load: %s",
                    name,
                    record.model_version,
                    exc.full,
                )
                continue
            self._reload(record)

    def _load_quietly(self, version: str) -> None:
        try:
            self.prepare_version(version)
        except OAMLError as exc:
            logger.error("cannot load model %s, which a collection migrates to: %s", version, exc.full)

    def prepare_version(self, version: str | None) -> None:
        """Load model ``version`` if it is not loaded (the engine's shelf; a no-op for the default)."""
        if version is not None:
            self.engine.models.load(version)

    def _indexed(self, face_id: str) -> bool:
        return any(face_id in c.index for c in self.collections.values())

    def apply_changes(self, store: PostgresGalleryStore, changes: list[Change]) -> None:
        """Bring the indexes and names up to ``changes`` (other replicas' and this one's), holding the writer's
        lock, so a local deletion cannot slip between reading a face and indexing it.

        Idempotent: a face already indexed is not added twice, one already removed not removed twice.
        Faces are read from the store when their ``add`` is applied; one deleted since is no longer there,
        so catching up never resurrects a deletion. Collections created or deleted are read from the store
        too, so the replica holds the collections the store has now.
        """
        deleted = {c.face_id for c in changes if c.op == "delete" and c.face_id}
        moved = {c.face_id for c in changes if c.op == "move" and c.face_id} - deleted  # to another subject
        removed = deleted | moved
        wanted = [c.face_id for c in changes if c.op == "add" and c.face_id and c.face_id not in deleted]
        renamed = sorted({c.collection for c in changes if c.op == "collection"})
        with self._lock:
            if renamed:
                self._sync_collections()
            # moved faces are removed below and read again with their new subject, indexed or not
            wanted = [fid for fid in wanted if not self._indexed(fid) and fid not in moved] + sorted(moved)
            records = store.faces_by_id(wanted, self.versions())
            for target in self.collections.values():
                self.engine.call_device(target.index.remove, sorted(removed))
            self._index_records(records)
            for collection, subject in sorted({(c.collection, c.subject) for c in changes if c.op != "collection"}):
                held = self.collections.get(collection)
                if held is None or not subject:
                    continue
                try:
                    held.names[subject] = store.subject(subject, collection).name
                except SubjectNotFound:
                    held.names.pop(subject, None)
            for collection in renamed:  # deleted and made again since the last catch-up: its old names are gone
                held = self.collections.get(collection)
                if held is not None:
                    held.names = {s.subject: s.name for s in store.subjects(0, 2**31 - 1, collection)[0]}

    def resync(self) -> None:
        """After a gap in the change log (this replica was silent so long that the log was pruned past its
        position): :meth:`reconcile`, holding the writer's lock."""
        with self._lock:
            self.reconcile()

    def reconcile(self, chunk: int = 1024) -> None:
        """Make the indexes hold exactly the store's collections and faces, and reload the names (the caller
        holds the writer's lock)."""
        self._sync_collections()
        stored = self.store.face_ids()
        removed = 0
        for target in self.collections.values():
            extra = sorted(set(target.index.face_ids) - stored)
            removed += len(extra)
            self.engine.call_device(target.index.remove, extra)
        missing = sorted(fid for fid in stored if not self._indexed(fid))
        versions = self.versions()
        for start in range(0, len(missing), chunk):
            self._index_records(self.store.faces_by_id(missing[start : start + chunk], versions))
        self._load_names()
        logger.info("index reconciled with the store: %d removed, %d added", removed, len(missing))

    def close(self) -> None:
        self.reads.shutdown(wait=False, cancel_futures=True)
        self.writes.shutdown(wait=True, cancel_futures=True)
        self.store.close()
