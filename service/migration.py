"""Moving a collection to another model version without downtime, with a look before and a way back.

A collection is matched with one model version (:class:`service.gallery.Collection`). To move it to another:

1. **Start** (:meth:`Migrations.start`): the target's weights are loaded (``OAML_WEIGHTS_DIR``), and the faces
   that cannot be moved are counted first: a face is re-embedded from its stored crop, so faces enrolled without
   one (``OAML_STORE_CROPS`` off, the default) cannot, unless the target only changes the heads of a model that
   stored its trunk's own maps (:func:`model.checkpoint.derives_from`): then every face's new data is made from
   its stored data.
   Then the choice is explicit: refuse (409 ``FACES_WITHOUT_CROPS``, listing the subjects to re-enrol), or
   ``missing="drop"``: move the rest and delete those faces at the switch (named in the status).
2. **Re-embed** (:meth:`Migrations._run`): in the background, a batch at a time, each batch's data at the target
   version written with the migration's progress in one transaction (``face_embeddings``). The collection keeps
   being matched with its own version meanwhile; enrolments write both versions, deletions delete both. A
   restart resumes from what is stored: only faces still lacking the target are embedded.
3. **Report** (:func:`decision_report`): once every face has the target, how the change moves decisions on the
   collection's own faces: per subject its own faces' rank and best score under each version; per preset the
   pairs of different subjects that cross ``/identify``'s threshold under each (lookalikes that would start to
   match). A dry run (``switch=False``) stops here, ``ready``.
4. **Switch** (:meth:`Migrations.switch`): one transaction makes the target the collection's version and keeps
   the old one as ``previous_version``; the index is rebuilt from the store and swapped in whole, so no search
   sees two versions. On PostgreSQL every live replica must report the target loaded first; each reloads the
   collection when it reads the change.
5. **Rollback** (:meth:`Migrations.rollback`) is a switch back to the previous version, whose data enrolments
   kept writing; **drop** (:meth:`Migrations.drop_previous`, or ``OAML_KEEP_PREVIOUS_DAYS`` after the switch)
   erases it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.checkpoint import derives_from
from model.embedder import Features
from model.openset import IDENTIFY_PRESETS
from service import audit
from service.errors import MigrationConflict, Overloaded
from service.gallery import Collection
from service.index import GalleryIndex, matching_dtype
from service.models import ServedModel
from service.problems import ApiError
from service.store import FaceEmbedding, FaceRecord
from service.store_pg import PostgresGalleryStore

__all__ = ["Migrations", "decision_report", "derive_data", "REPORT_PROBES"]

logger = logging.getLogger(__name__)

#: Faces used as probes by the report (all of a smaller collection; a sample by subject of a larger one).
REPORT_PROBES = 2000
#: Lookalike pairs listed per preset in the report (the highest scoring).
LISTED_PAIRS = 20


@dataclass
class _Progress:
    """Faces per second of a running migration, over its last minute."""

    marks: deque[tuple[float, int]]

    def rate(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


class Migrations:
    """The service's migrations: started, resumed at start-up, switched, rolled back, dropped.

    Args:
        state: the application state (engine, gallery, settings).
    """

    def __init__(self, state: Any) -> None:
        self.state = state
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.progress: dict[str, _Progress] = {}
        self._retention: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def resume(self) -> None:
        """Start the background work a restart interrupted (migrations that were running) and the retention
        sweep of previous versions."""
        audit.key_id_var.set("service")  # what the log names for work the service resumes by itself
        for name, held in self.state.gallery.collections.items():
            migration = (held.record.migration if held.record is not None else None) or {}
            if migration.get("state") in ("running", "switching"):
                logger.info("resuming the migration of collection %r to %s", name, migration.get("to"))
                self._launch(name)
        settings = self.state.settings
        if settings.keep_previous_days > 0 or settings.audit_retention_days > 0:
            self._retention = asyncio.create_task(self._sweep(), name="oaml-retention")

    async def stop(self) -> None:
        """Cancel the background work (a stored migration resumes at the next start)."""
        tasks = [*self.tasks.values(), *([self._retention] if self._retention is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    def _launch(self, name: str) -> None:
        self.progress[name] = _Progress(deque(maxlen=64))
        task = asyncio.create_task(self._run(name), name=f"oaml-migrate-{name}")
        self.tasks[name] = task
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        """A finished task leaves :attr:`tasks` (unless a newer one of its collection took its place)."""
        for name, held in list(self.tasks.items()):
            if held is task:
                del self.tasks[name]

    # -- what the routes ask ----------------------------------------------------------------------

    async def start(self, name: str, to: str, switch: bool = True, missing: str = "refuse") -> dict[str, Any]:
        """Begin moving collection ``name`` to model ``to`` (see the module docstring). Returns its status.

        Raises:
            ModelNotAvailable: no weights of ``to`` where the service looks.
            MigrationConflict: another migration of it runs, or it is matched with ``to`` already.
            ApiError: ``FACES_WITHOUT_CROPS`` (409) with the subjects, when ``missing`` is ``refuse``.
        """
        if missing not in ("refuse", "drop"):
            raise ApiError("VALIDATION_ERROR", "missing must be 'refuse' or 'drop'", field="missing")
        gallery = self.state.gallery
        held: Collection = await gallery.find(name)
        current = held.version or gallery.default_version
        running = (held.record.migration if held.record is not None else None) or {}
        if running.get("state") in ("running", "switching") and name in self.tasks:
            raise MigrationConflict(f"collection {name!r} is already migrating to {running.get('to')}")
        if to == current:
            raise MigrationConflict(f"collection {name!r} is matched with {to} already")
        await asyncio.to_thread(gallery.prepare_version, to)  # ModelNotAvailable when its weights are not there
        engine = self.state.engine
        derive = await asyncio.to_thread(derives_from, engine.model_for(current).model, engine.model_for(to).model)
        without = {} if derive else await gallery.read(gallery.store.faces_without_crops, name, to)
        if without and missing == "refuse":
            faces = sum(without.values())
            raise ApiError(
                "FACES_WITHOUT_CROPS",
                f"{faces} faces of {len(without)} subjects of collection {name!r} were enrolled without a stored crop "
                f"and cannot be re-embedded by {to}. Choose: keep the collection on {current}; re-enrol those subjects "
                "(listed) with crops kept (PATCH the collection's store_crops to true) and migrate again; or migrate "
                "with missing='drop', which deletes those faces at the switch",
                faces_without_crops=faces,
                subjects=[{"subject": s, "faces": n} for s, n in sorted(without.items())],
            )
        have, total = await gallery.read(gallery.store.version_coverage, name, to)
        migration = {
            "to": to,
            "from": current,
            "state": "running",
            "switch": switch,
            "missing": missing,
            "started_at": time.time(),
            "faces": total,
            "done": have,
            "without_crops": sum(without.values()),
            "subjects_without_crops": sorted(without),
            # the target's data is made from the stored data at `from` (same trunk): every face moves, crop or not
            "derived_from": current if derive else None,
        }
        entry = audit.AuditEntry(
            "migration_start", name, faces=total, detail={"to": to, "from": current, "switch": switch}
        )
        await audit.write(gallery, entry, gallery.update_collection, name, {"migration": migration})
        self._launch(name)
        return self.status(name)

    def status(self, name: str) -> dict[str, Any]:
        """The collection's versions and its migration, with faces per second and time left while running."""
        held: Collection = self.state.gallery.collection(name)
        record = held.record
        migration = dict((record.migration if record is not None else None) or {})
        progress = self.progress.get(name)
        rate = progress.rate() if progress is not None and name in self.tasks else None
        if migration:
            migration["faces_per_second"] = round(rate, 2) if rate else None
            left = migration.get("faces", 0) - migration.get("without_crops", 0) - migration.get("done", 0)
            migration["seconds_left"] = round(left / rate, 1) if rate else None
            migration["active"] = name in self.tasks
        return {
            "collection": name,
            "model_version": held.version or self.state.gallery.default_version,
            "previous_version": record.previous_version if record is not None else None,
            "switched_at": record.switched_at if record is not None else None,
            "migration": migration or None,
        }

    async def switch(self, name: str) -> dict[str, Any]:
        """Switch a migration that is ``ready`` (a dry run's, or one waiting for replicas) now."""
        held: Collection = await self.state.gallery.find(name)
        migration = (held.record.migration if held.record is not None else None) or {}
        if migration.get("state") not in ("ready", "waiting"):
            raise MigrationConflict(f"collection {name!r} has no migration ready to switch")
        await self._switch(name, migration)
        return self.status(name)

    async def cancel(self, name: str) -> dict[str, Any]:
        """Stop a migration and erase what it wrote (the collection stays on its version)."""
        gallery = self.state.gallery
        held: Collection = await gallery.find(name)
        migration = (held.record.migration if held.record is not None else None) or {}
        if not migration:
            raise MigrationConflict(f"collection {name!r} has no migration")
        task = self.tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        entry = audit.AuditEntry("migration_cancel", name, detail={"to": migration["to"]})
        await audit.write(gallery, entry, gallery.drop_version, name, migration["to"])
        return self.status(name)

    async def rollback(self, name: str) -> dict[str, Any]:
        """Switch collection ``name`` back to its previous version (instant: its data was kept and enrolments
        since wrote it too)."""
        gallery = self.state.gallery
        held: Collection = await gallery.find(name)
        previous = held.record.previous_version if held.record is not None else None
        if previous is None:
            raise MigrationConflict(f"collection {name!r} has no previous version to go back to")
        if name in self.tasks:
            raise MigrationConflict(f"collection {name!r} is migrating: cancel that first")
        await asyncio.to_thread(gallery.prepare_version, previous)
        await self._wait_for_replicas(name, previous)
        entry = audit.AuditEntry("rollback", name, detail={"to": previous, "from": held.version})
        await audit.write(gallery, entry, gallery.switch_version, name, previous)
        logger.info("collection %r rolled back to model %s", name, previous)
        return self.status(name)

    async def drop_previous(self, name: str) -> dict[str, Any]:
        """Erase the previous version's data of collection ``name`` (no rollback after this)."""
        gallery = self.state.gallery
        held: Collection = await gallery.find(name)
        previous = held.record.previous_version if held.record is not None else None
        if previous is None:
            raise MigrationConflict(f"collection {name!r} keeps no previous version")
        entry = audit.AuditEntry("drop_previous", name, detail={"version": previous})
        await audit.write(gallery, entry, gallery.drop_version, name, previous)
        return self.status(name)

    # -- the background work --------------------------------------------------------------------

    async def _run(self, name: str) -> None:
        """Re-embed the collection's faces a batch at a time, then report, then switch (unless a dry run)."""
        gallery, engine = self.state.gallery, self.state.engine
        try:
            held: Collection = gallery.collection(name)
            migration = dict((held.record.migration if held.record is not None else None) or {})
            to = migration["to"]
            await asyncio.to_thread(gallery.prepare_version, to)
            model: ServedModel = engine.model_for(to)
            after = ""
            size, source = self.state.settings.migration_batch, migration.get("derived_from")
            while True:
                if source:
                    faces = await gallery.read(gallery.store.faces_to_derive, name, source, to, after, size)
                    made = await engine.run_device(derive_data, model, faces)
                    items = list(zip([f.face_id for f in faces], made, strict=True))
                else:
                    batch = await gallery.read(gallery.store.faces_to_embed, name, to, after, size)
                    items = await _reembed(engine, model, batch) if batch else []
                if not items:
                    break
                have, _ = await gallery.read(gallery.store.version_coverage, name, to)
                migration["done"] = have + len(items)
                await gallery.write(gallery.put_embeddings, name, items, dict(migration))
                after = items[-1][0]
                self.progress[name].marks.append((time.monotonic(), migration["done"]))
            have, total = await gallery.read(gallery.store.version_coverage, name, to)
            migration.update(done=have, faces=total)
            migration["report"] = await self._report(name, held.version or gallery.default_version, to)
            if migration.get("switch"):
                await self._switch(name, migration)
            else:
                migration["state"] = "ready"
                await gallery.write(gallery.update_collection, name, {"migration": migration})
                logger.info("collection %r: migration to %s ready (a dry run): not switched", name, to)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # kept in the status; a restart or a new start resumes from what is stored
            logger.exception("the migration of collection %r failed", name)
            try:
                migration["state"] = "failed"
                migration["error"] = exc.message if hasattr(exc, "message") else type(exc).__name__
                await gallery.write(gallery.update_collection, name, {"migration": migration})
            except Exception:
                logger.exception("could not record the failed migration of collection %r", name)

    async def _switch(self, name: str, migration: dict[str, Any]) -> None:
        gallery = self.state.gallery
        to = migration["to"]
        migration["state"] = "switching"
        await gallery.write(gallery.update_collection, name, {"migration": migration})
        await self._wait_for_replicas(name, to)
        entry = audit.AuditEntry("migration_switch", name, detail={"to": to, "from": migration.get("from")})
        record, dropped = await audit.write(
            gallery, entry, gallery.switch_version, name, to, migration.get("missing") == "drop"
        )
        logger.info(
            "collection %r switched to model %s (%d faces%s); %s kept for rollback",
            name,
            to,
            record.faces,
            f", {len(dropped)} without crops deleted" if dropped else "",
            record.previous_version,
        )

    async def _wait_for_replicas(self, name: str, version: str, timeout_s: float = 600.0) -> None:
        """On PostgreSQL: until every live replica reports ``version`` loaded (each loads it when it sees the
        migration); else at once."""
        store = self.state.gallery.store
        if not isinstance(store, PostgresGalleryStore):
            return
        deadline = time.monotonic() + timeout_s
        while True:
            lacking = [
                r
                for r, versions in (await self.state.gallery.read(store.replica_versions)).items()
                if version not in versions
            ]
            if not lacking:
                return
            if time.monotonic() > deadline:
                raise MigrationConflict(f"replicas {', '.join(lacking)} have not loaded model {version}")
            logger.info("collection %r waits for replicas %s to load model %s", name, ", ".join(lacking), version)
            await asyncio.sleep(2.0)

    async def _report(self, name: str, old: str, new: str) -> dict[str, Any]:
        """:func:`decision_report` on the collection's own faces, each version's faces read from the store."""
        gallery, engine = self.state.gallery, self.state.engine
        faces = {v: await gallery.read(lambda v=v: list(gallery.store.faces_for(name, v))) for v in (old, new)}
        models = {v: engine.model_for(v) for v in (old, new)}
        # in a thread of its own (its own indexes), not the inference worker: requests go on meanwhile
        return await asyncio.to_thread(
            decision_report, faces[old], faces[new], models[old], models[new], self.state.settings.shortlist
        )

    async def _sweep(self) -> None:
        """Hourly: drop each collection's previous version ``OAML_KEEP_PREVIOUS_DAYS`` after its switch, and the
        audit log's entries older than ``OAML_AUDIT_RETENTION_DAYS``."""
        settings, gallery = self.state.settings, self.state.gallery
        keep = settings.keep_previous_days * 86400
        while True:
            if settings.audit_retention_days > 0:
                try:
                    gone = await gallery.write(
                        gallery.store.prune_audit, time.time() - settings.audit_retention_days * 86400
                    )
                    if gone:
                        logger.info(
                            "audit log: %d entries older than %g days deleted", gone, settings.audit_retention_days
                        )
                except Exception:
                    logger.exception("could not prune the audit log")
            for name, held in list(self.state.gallery.collections.items()) if keep > 0 else []:
                record = held.record
                if record is None or record.previous_version is None or record.switched_at is None:
                    continue
                if time.time() - record.switched_at > keep and name not in self.tasks:
                    logger.info(
                        "collection %r: dropping model %s, kept %.0f days after the switch",
                        name,
                        record.previous_version,
                        keep / 86400,
                    )
                    try:
                        await self.drop_previous(name)
                    except Exception:
                        logger.exception("could not drop the previous version of collection %r", name)
            await asyncio.sleep(3600)


async def _reembed(engine: Any, model: ServedModel, batch: list[tuple[str, bytes]]) -> list[tuple[str, FaceEmbedding]]:
    """``model``'s data for faces ``(id, stored crop)``, re-embedded from their crops."""
    crops = await engine.run_cpu(decode_crops, [crop for _, crop in batch])
    feats = await _embed_patiently(engine, crops, model.version)
    return [(fid, _data(model, f)) for (fid, _), f in zip(batch, feats, strict=True)]


async def _embed_patiently(engine: Any, crops: np.ndarray, version: str) -> list[Any]:
    """Embed a migration's batch, waiting while the queue is full: requests come first."""
    while True:
        try:
            return list(await engine.embed(crops, version))
        except Overloaded:
            await asyncio.sleep(0.5)


def derive_data(model: ServedModel, faces: list[FaceRecord]) -> list[FaceEmbedding]:
    """``model``'s data for faces from their stored trunk maps (see :func:`model.checkpoint.derives_from`): the
    embedding and norm as stored, the visibility and the maps from ``model``'s heads (:meth:`Features.through`;
    maps fp16, as enrolment stores them), the quality by ``model``'s calibration."""
    if not faces:
        return []
    stored = Features(
        torch.from_numpy(np.stack([f.embedding for f in faces])),
        torch.tensor([f.norm for f in faces]),
        torch.zeros(len(faces), 0),  # the source's visibility: not used
        torch.from_numpy(np.stack([f.feature_map for f in faces]).astype(np.float32)),
    )
    derived = stored.through(model.model)
    occlusion, local = derived.occlusion.numpy(), derived.feature_map.numpy().astype(np.float16)
    return [
        FaceEmbedding(
            model_version=model.version,
            embedding=f.embedding,
            feature_map=local[i],
            occlusion=occlusion[i],
            norm=f.norm,
            quality=model.quality(f.norm),
        )
        for i, f in enumerate(faces)
    ]


def decode_crops(crops: list[bytes]) -> np.ndarray:
    """Stored crops (JPEG) as ``[n, 112, 112, 3]`` RGB."""
    return np.stack([np.asarray(Image.open(io.BytesIO(c), formats=["JPEG"]).convert("RGB")) for c in crops])


def _data(model: ServedModel, f: Any) -> FaceEmbedding:
    return FaceEmbedding(
        model_version=model.version,
        embedding=f.embedding.numpy(),
        feature_map=f.feature_map.numpy().astype(np.float16),
        occlusion=f.occlusion.numpy(),
        norm=f.norm,
        quality=model.quality(f.norm),
    )


def _scores(faces: list[FaceRecord], model: ServedModel, shortlist: int, probes: list[int]) -> dict[str, Any]:
    """Each probe face searched among the others (itself left out) as /identify searches with the default
    ``OAML_MAP_STORAGE`` (int8 maps, matched in fp32; ``native`` differs by a rounding), fused by ``model``: per
    probe the best score of its own subject and of every other subject on the shortlist."""
    cpu = torch.device("cpu")
    index = GalleryIndex(
        model.model.qaconv, cpu, matching_dtype(cpu, "int8"), model.model.embedding_size, map_storage="int8"
    )
    index.add_records(faces)
    out = []
    for i in probes:
        face = faces[i]
        found = index.search(
            torch.from_numpy(face.embedding),
            torch.from_numpy(face.feature_map.astype(np.float32)),
            torch.from_numpy(face.occlusion),
            shortlist + 1,
        )
        fused = model.calibration.score_found(found, float(face.occlusion.mean()), face.norm)
        best: dict[str, float] = {}
        for fid, subject, score in zip(found["face_ids"], found["subjects"], fused, strict=True):
            if fid != face.face_id and score > best.get(subject, -np.inf):
                best[subject] = float(score)
        out.append(best)
    return {"best": out}


def decision_report(
    old_faces: list[FaceRecord], new_faces: list[FaceRecord], old: ServedModel, new: ServedModel, shortlist: int = 100
) -> dict[str, Any]:
    """How moving from ``old`` to ``new`` changes decisions on a collection's own faces (the same faces at each
    version). Per subject with two faces or more: the share of its faces whose best match is its own subject
    (rank 1) and the mean of its own best scores, under each. Per ``/identify`` preset, at this collection's
    size: the pairs of different subjects whose best cross score passes the threshold under each version, the
    new ones listed (lookalikes that would start to match). Probes: every face, or :data:`REPORT_PROBES` of a
    larger collection."""
    by_id = {f.face_id: i for i, f in enumerate(new_faces)}
    pairs = [(i, by_id[f.face_id]) for i, f in enumerate(old_faces) if f.face_id in by_id]
    rng = np.random.default_rng(0)
    chosen = (
        sorted(rng.permutation(len(pairs))[:REPORT_PROBES].tolist())
        if len(pairs) > REPORT_PROBES
        else range(len(pairs))
    )
    probes_old = [pairs[k][0] for k in chosen]
    probes_new = [pairs[k][1] for k in chosen]
    best = {
        "old": _scores(old_faces, old, shortlist, probes_old)["best"],
        "new": _scores(new_faces, new, shortlist, probes_new)["best"],
    }
    subjects: dict[str, dict[str, list[float]]] = {}
    cross: dict[str, dict[tuple[str, str], float]] = {"old": {}, "new": {}}
    for k, i in enumerate(probes_old):
        own = old_faces[i].subject
        for which in ("old", "new"):
            scores = best[which][k]
            row = subjects.setdefault(own, {"old_rank1": [], "new_rank1": [], "old_own": [], "new_own": []})
            if own in scores:
                others = [s for subj, s in scores.items() if subj != own]
                row[f"{which}_rank1"].append(float(scores[own] > max(others, default=-np.inf)))
                row[f"{which}_own"].append(scores[own])
            for subj, s in scores.items():
                if subj != own:
                    key = (min(own, subj), max(own, subj))
                    cross[which][key] = max(cross[which].get(key, -np.inf), s)
    n = len(new_faces)
    presets = {}
    for preset, fpir in IDENTIFY_PRESETS.items():
        thr = {w: m.calibration.identify_model.threshold(fpir, max(n, 1)) for w, m in (("old", old), ("new", new))}
        passing = {w: {k: s for k, s in cross[w].items() if s > thr[w]} for w in ("old", "new")}
        started = sorted(((k, s) for k, s in passing["new"].items() if k not in passing["old"]), key=lambda x: -x[1])
        presets[preset] = {
            "fpir": fpir,
            "threshold": {w: round(float(thr[w]), 4) for w in thr},
            "pairs_passing": {w: len(passing[w]) for w in passing},
            "new_lookalikes": [{"subjects": list(k), "score": round(s, 4)} for k, s in started[:LISTED_PAIRS]],
            "no_longer_passing": len([k for k in passing["old"] if k not in passing["new"]]),
        }
    rows: list[dict[str, Any]] = []
    for subject, r in sorted(subjects.items()):
        if not r["old_own"] and not r["new_own"]:
            continue
        rows.append(
            {
                "subject": subject,
                "rank1": {
                    w: round(float(np.mean(r[f"{w}_rank1"])), 4) if r[f"{w}_rank1"] else None for w in ("old", "new")
                },
                "own_score": {
                    w: round(float(np.mean(r[f"{w}_own"])), 4) if r[f"{w}_own"] else None for w in ("old", "new")
                },
            }
        )
    measured = [r for r in rows if r["rank1"]["old"] is not None and r["rank1"]["new"] is not None]
    return {
        "old": old.version,
        "new": new.version,
        "faces": n,
        "probes": len(probes_old),
        "subjects_measured": len(measured),
        "rank1": {
            w: round(float(np.mean([r["rank1"][w] for r in measured])), 4) if measured else None for w in ("old", "new")
        },
        "subjects_worse": [r["subject"] for r in measured if r["rank1"]["new"] < r["rank1"]["old"]],
        "subjects": rows,
        "presets": presets,
    }
