"""A training run's checkpoints kept off the machine: the run survives losing its disk, not just its process.

A preemptible run (:mod:`model.training.preempt`) survives being killed: its folder keeps whole checkpoint
generations. It does not survive losing the folder, and that is how machines are lost: a spot instance is
reclaimed with its local disk, a build machine is handed back bare (this project's background run lost 690
steps, five hours of CPU, so). Users of preemptible GPUs keep their checkpoints on storage that outlives the
host (a mounted bucket, NFS, another disk) and resume from it elsewhere; ``offsite`` is that for ``oaml train``.

After each checkpoint the run copies ``best.safetensors`` (when it changed) and ``steps.jsonl``, then the
checkpoint's newest generation, into the offsite folder from a background thread, so a slow store never holds a
training step back; while a copy is in flight newer checkpoints coalesce into one next copy. Every file lands
whole (written to a temporary name, flushed, ``fsync``-ed, renamed) and the checkpoint keeps two generations
there, so a copy cut off half-way leaves the previous one usable. A store that fails (full, unmounted) is logged
and retried at the next checkpoint; the run goes on with its local generations. SIGTERM (the preemption notice)
waits up to ``offsite_wait_s`` for the copy of the checkpoint it writes.

The folder belongs to one run: ``run.json`` there names it (the settings a resume must keep, with the caches by
name, since data paths differ from machine to machine) and the step its checkpoint holds, written after each copy.
A run refuses a folder of another run, and a copy never replaces a later step by an earlier one (a run that
started over from nothing on a new machine would otherwise rotate days of work out within two checkpoints). A copy
whose checkpoints exist but none loads whole stops the start of a run whose own folder has no whole checkpoint
either. The run warns when the folder is on the run folder's own filesystem (an unmounted bucket's empty mount
point is just a local folder), and does not create the folder's parents.

When a run starts (:meth:`Offsite.restore`), it takes the offsite copy's files if their newest whole checkpoint
is at a later step than the run folder's (a new machine's empty folder included), then resumes as from its own
folder: exactly, bit for bit with deterministic settings and the same kind of machine. In both directions the
companions are copied before the checkpoint, which comes last: a copy cut off half-way leaves the older
checkpoint in place, and the next start or checkpoint copies again. ``offsite.json`` in the run folder says
what the copy holds (``oaml train-status`` prints it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from model.training.preempt import (
    OFFSITE_FILE,
    CorruptCheckpoint,
    fsync_dir,
    load_newest,
    read_json_object,
    read_offsite,
    rotate_in,
    write_synced,
)

__all__ = ["OffsiteRefused", "Offsite", "run_identity"]

logger = logging.getLogger(__name__)

#: the run's checkpoint file (its generations: last.pt.1, ...)
CHECKPOINT = "last.pt"
#: the run's other files a resumed run wants: the best model so far, the step log (``train-status``'s speeds)
COMPANIONS = ("best.safetensors", "steps.jsonl")
#: checkpoint generations kept offsite: the newest and the one before, in case a copy is cut off
OFFSITE_GENERATIONS = 2
#: in the offsite folder: which run it holds and the step of its checkpoint
OWNER_FILE = "run.json"
#: the settings a resumed run must keep (as ``Trainer._maybe_resume`` checks them; caches by name), and the name of
#: its initial weights (a new run of the same recipe from other weights is another run)
IDENTITY_KEYS = ("arch", "seed", "p", "k", "sampler", "train", "init_from")


class OffsiteRefused(Exception):
    """The offsite folder holds another run, or a later step than the checkpoint about to replace it."""


def run_identity(config: Mapping[str, Any]) -> str:
    """The run an offsite folder belongs to: a digest of the settings a resume must keep, caches by name."""

    def named(key: str) -> Any:
        value = config.get(key)
        if key == "train":
            return [Path(p).name for p in value or []]
        return Path(value).name if key == "init_from" and value else value

    return hashlib.sha256(json.dumps({k: named(k) for k in IDENTITY_KEYS}, sort_keys=True).encode()).hexdigest()[:16]


def _copy_whole(src: BinaryIO, dst: Path) -> Path:
    """``src`` into ``dst``'s temporary twin, flushed and synced; the caller renames it into place."""
    return write_synced(dst, lambda out: shutil.copyfileobj(src, out, length=16 * 2**20))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """``value`` as ``path``, whole: temporary file, fsync, rename."""
    os.replace(write_synced(path, lambda out: out.write((json.dumps(value) + "\n").encode())), path)


def _newest(folder: Path, keep: int) -> tuple[int, Path] | None:
    """The step and file of ``folder``'s newest whole checkpoint; None when it holds none. Raises
    :class:`~model.training.preempt.CorruptCheckpoint` when checkpoints exist but none loads whole."""
    found = load_newest(folder / CHECKPOINT, keep)
    if found is None:
        return None
    return int(json.loads(found[0]["state"])["global_step"]), found[1]


class Offsite:
    """The offsite copy of the run in ``run``, kept in ``folder`` (see the module's docstring); ``identity``:
    :func:`run_identity` of the run's config.

    :meth:`push` is called by the trainer under ``lock`` right after it wrote a checkpoint; the copying thread
    opens ``last.pt`` under the same lock, so the step it records is the one of the file it copies."""

    def __init__(self, run: Path, folder: Path, keep_local: int, lock: threading.Lock, identity: str) -> None:
        self.run = Path(run)
        self.folder = Path(folder)
        self.keep_local = keep_local
        self.lock = lock
        self.identity = identity
        self._wake = threading.Condition()
        self._latest: int | None = None  # the step of the newest checkpoint pushed
        self._dirty = False  # a checkpoint was pushed since the last copy started
        self._closing = False
        self._thread: threading.Thread | None = None
        self._companions: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) of the copy offsite
        self._copied: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of the last checkpoint copied
        self.same_disk = False  # the folder is on the run folder's filesystem: it does not outlive the machine

    def _owner(self) -> dict[str, Any] | None:
        """The folder's ``run.json``, refused when it names another run."""
        path = self.folder / OWNER_FILE
        owner = read_json_object(path)
        if owner is None and path.exists():  # the checkpoints' own digests, not this file, say if they are whole
            logger.warning("%s is not readable: taken as missing", path)
        if owner is not None and owner.get("run") != self.identity:
            raise OffsiteRefused(
                f"{self.folder} holds the offsite copy of another run ({owner.get('run')}, this one is "
                f"{self.identity}): give each run its own folder"
            )
        return owner

    def _check_disk(self) -> None:
        try:
            self.same_disk = self.folder.stat().st_dev == self.run.stat().st_dev
        except OSError:
            return
        if self.same_disk:
            logger.warning(
                "the offsite folder %s is on the run folder's own filesystem: it does not outlive this machine's "
                "disk (an unmounted store's mount point?)",
                self.folder,
            )

    # -- before the run resumes ------------------------------------------------------------------

    def restore(self) -> int | None:
        """Take the offsite copy into the run folder when it holds a later checkpoint; the step taken, or None.

        A new machine's folder holds nothing, so any whole offsite checkpoint is later. A run folder that is
        ahead (the copy lagged behind the last checkpoints) is kept as it is, and so is one with a whole
        checkpoint when none of the copy's loads (logged). Raises :class:`OffsiteRefused` for a folder of another
        run, and :class:`~model.training.preempt.CorruptCheckpoint` when neither folder has a whole checkpoint
        but the copy has checkpoints (starting over would then replace them). ``run.json``'s step comes down to
        the newest one that loads, so that the copies go on."""
        if not self.folder.is_dir():
            return None
        self._check_disk()
        owner = self._owner()
        try:
            own = _newest(self.run, self.keep_local)
        except CorruptCheckpoint as exc:  # the folder's own are unreadable: the copy is what there is
            logger.warning("the run folder's checkpoints do not load (%s): taking the offsite copy's", exc)
            own = None
        ours = own[0] if own is not None else None
        try:
            copy = _newest(self.folder, OFFSITE_GENERATIONS)
        except CorruptCheckpoint as exc:
            if ours is None:  # nothing whole anywhere: starting over would replace what the copy may still hold
                raise
            logger.warning("the offsite copy's checkpoints do not load (%s): kept the run folder's", exc)
            copy = None
        theirs = copy[0] if copy is not None else -1
        if owner is not None and owner.get("step", -1) > theirs:  # what it claimed does not load: the next copy may
            _write_json(self.folder / OWNER_FILE, {**owner, "step": theirs, "updated": time.time()})
        if copy is None:
            return None
        source = copy[1]
        if ours is not None and ours >= theirs:
            logger.info(
                "offsite copy %s is at step %d, the run folder at %d: kept the folder's", self.folder, theirs, ours
            )
            return None
        started = time.monotonic()
        self.run.mkdir(parents=True, exist_ok=True)
        for name in COMPANIONS:  # first: the checkpoint, last, commits the restore
            if (self.folder / name).is_file():
                with (self.folder / name).open("rb") as src:
                    os.replace(_copy_whole(src, self.run / name), self.run / name)
            else:  # the folder's would belong to another point of the run
                (self.run / name).unlink(missing_ok=True)
        with source.open("rb") as src:  # the newest whole generation (a corrupt newer one was set aside)
            rotate_in(_copy_whole(src, self.run / CHECKPOINT), self.run / CHECKPOINT, self.keep_local)
        fsync_dir(self.run)
        self._record({"step": theirs, "restored_at": time.time()})
        logger.warning(
            "restored step %d from the offsite copy %s in %.1f s (the run folder %s)",
            theirs,
            self.folder,
            time.monotonic() - started,
            "held no whole checkpoint" if ours is None else f"was at step {ours}",
        )
        return theirs

    # -- while the run trains -----------------------------------------------------------------------

    def push(self, step: int) -> None:
        """A checkpoint of ``step`` was written: copy it (and the run's companions) offsite soon."""
        with self._wake:
            self._latest, self._dirty = step, True
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._work, name="offsite-copy", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the copies asked for; True when done.

        After ``timeout`` a copy still in flight goes on in its (daemon) thread until it ends or the process
        exits; a temporary file it leaves offsite is replaced by the next copy."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("offsite copy of step %s not finished after %s s: left behind", self._latest, timeout)
            return False
        self._thread = None
        return True

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._dirty and not self._closing:
                    self._wake.wait()
                if not self._dirty:
                    return
                self._dirty = False
            try:
                self._copy()
            except Exception:  # never a silent death of the thread: the next checkpoint tries again
                logger.exception("offsite copy to %s failed", self.folder)

    def _copy(self) -> None:
        started = time.monotonic()
        try:
            if not self.folder.is_dir():
                self.folder.mkdir()  # not its parents: a store that is not mounted is an error, not a local folder
                self._check_disk()
            owner = self._owner()
            with self.lock:  # no checkpoint half-rotated under us; ``step`` is the file's
                src = (self.run / CHECKPOINT).open("rb")
                step = self._latest if self._latest is not None else -1
            with src:
                held = owner.get("step", -1) if owner is not None else -1
                if step < held:
                    raise OffsiteRefused(
                        f"the offsite copy holds step {held}, later than this run's checkpoint ({step}): not "
                        "replaced (a run started over without it? resume from it, or give the run a new folder)"
                    )
                size = sum(self._copy_companion(name) for name in COMPANIONS)
                st = os.fstat(src.fileno())
                if (st.st_ino, st.st_size, st.st_mtime_ns) != self._copied:  # a step can be saved twice
                    size += st.st_size
                    tmp = _copy_whole(src, self.folder / CHECKPOINT)
                    rotate_in(tmp, self.folder / CHECKPOINT, OFFSITE_GENERATIONS)
                    self._copied = (st.st_ino, st.st_size, st.st_mtime_ns)
            _write_json(self.folder / OWNER_FILE, {"run": self.identity, "step": step, "updated": time.time()})
            fsync_dir(self.folder)
        except (OSError, OffsiteRefused) as exc:
            logger.warning("offsite copy to %s failed (tried again at the next checkpoint): %s", self.folder, exc)
            self._record({"error": f"{type(exc).__name__}: {exc}", "failed_at": time.time()})
            return
        seconds = time.monotonic() - started
        logger.info("offsite copy of step %d: %.0f MiB in %.1f s to %s", step, size / 2**20, seconds, self.folder)
        self._record({"step": step, "copied_at": time.time(), "seconds": round(seconds, 2), "bytes": size})

    def _copy_companion(self, name: str) -> int:
        """Copy ``name`` when it changed since its last copy (``best.safetensors`` changes at a new best only)."""
        path = self.run / name
        try:
            src = path.open("rb")
        except FileNotFoundError:
            return 0
        with src:
            st = os.fstat(src.fileno())
            if self._companions.get(name) == (st.st_size, st.st_mtime_ns):
                return 0
            os.replace(_copy_whole(src, self.folder / name), self.folder / name)
        self._companions[name] = (st.st_size, st.st_mtime_ns)
        return st.st_size

    def _record(self, event: dict[str, Any]) -> None:
        info = {**(read_offsite(self.run) or {}), "folder": str(self.folder), "same_disk": self.same_disk, **event}
        if "step" in event:
            info.pop("error", None)
            info.pop("failed_at", None)
        _write_json(self.run / OFFSITE_FILE, info)
