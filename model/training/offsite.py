"""A training run's checkpoints kept off the machine: the run survives losing its disk, not just its process.

A preemptible run (:mod:`model.training.preempt`) survives being killed: its folder keeps whole checkpoint
generations. It does not survive losing the folder, and that is how machines are lost: a spot instance is
reclaimed with its local disk, a build machine is handed back bare (this project's background run lost 690
steps, five hours of CPU, so). Users of preemptible GPUs keep their checkpoints on storage that outlives the
host (a mounted bucket, NFS, another disk) and resume from it elsewhere; ``offsite`` is that for ``oaml train``.

After each checkpoint the run copies its newest generation, and then ``best.safetensors`` and ``steps.jsonl``,
into the offsite folder from a background thread, so a slow store never holds a training step back; while a
copy is in flight newer checkpoints coalesce into one next copy. Every file lands whole (written to a temporary
name, flushed, ``fsync``-ed, renamed) and the checkpoint keeps two generations there, so a copy cut off half-way
leaves the previous one usable. A store that fails (full, unmounted) is logged and retried at the next
checkpoint; the run goes on with its local generations. SIGTERM (the preemption notice) waits up to
``offsite_wait_s`` for the copy of the checkpoint it writes.

When a run starts (:meth:`Offsite.restore`), it takes the offsite copy's files if their newest whole checkpoint
is at a later step than the run folder's (a new machine's empty folder included), then resumes as from its own
folder: exactly, bit for bit with deterministic settings. ``offsite.json`` in the run folder says what the copy
holds (``oaml train-status`` prints it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from model.training.preempt import OFFSITE_FILE, CorruptCheckpoint, fsync_dir, load_newest, read_offsite, rotate_in

__all__ = ["Offsite"]

logger = logging.getLogger(__name__)

#: the run's checkpoint file (its generations: last.pt.1, ...)
CHECKPOINT = "last.pt"
#: the run's other files a resumed run wants: the best model so far, the step log (``train-status``'s speeds)
COMPANIONS = ("best.safetensors", "steps.jsonl")
#: checkpoint generations kept offsite: the newest and the one before, in case a copy is cut off
OFFSITE_GENERATIONS = 2


def _copy_whole(src: BinaryIO, dst: Path) -> Path:
    """``src`` into a temporary file beside ``dst``, flushed and synced; the caller renames it into place."""
    tmp = dst.with_name(dst.name + ".tmp")
    with tmp.open("wb") as out:
        shutil.copyfileobj(src, out, length=16 * 2**20)
        out.flush()
        os.fsync(out.fileno())
    return tmp


def _newest(folder: Path, keep: int) -> tuple[int, Path] | None:
    """The step and file of ``folder``'s newest whole checkpoint (None: none there, or none loads whole)."""
    try:
        found = load_newest(folder / CHECKPOINT, keep)
    except CorruptCheckpoint as exc:
        logger.warning("%s: %s", folder, exc)
        return None
    if found is None:
        return None
    return int(json.loads(found[0]["state"])["global_step"]), found[1]


class Offsite:
    """The offsite copy of the run in ``run``, kept in ``folder`` (see the module's docstring).

    :meth:`push` is called by the trainer under ``lock`` right after it wrote a checkpoint; the copying thread
    opens ``last.pt`` under the same lock, so the step it records is the one of the file it copies."""

    def __init__(self, run: Path, folder: Path, keep_local: int, lock: threading.Lock) -> None:
        self.run = Path(run)
        self.folder = Path(folder)
        self.keep_local = keep_local
        self.lock = lock
        self._wake = threading.Condition()
        self._latest: int | None = None  # the step of the newest checkpoint pushed
        self._dirty = False  # a checkpoint was pushed since the last copy started
        self._closing = False
        self._thread: threading.Thread | None = None
        self._companions: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) of the copy offsite
        self.copied_step: int | None = None

    # -- before the run resumes ------------------------------------------------------------------

    def restore(self) -> int | None:
        """Take the offsite copy into the run folder when it holds a later checkpoint; the step taken, or None.

        A new machine's folder holds nothing, so any whole offsite checkpoint is later. A run folder that is
        ahead (the copy lagged behind the last checkpoints) is kept as it is."""
        if not self.folder.is_dir():
            return None
        copy = _newest(self.folder, OFFSITE_GENERATIONS)
        if copy is None:
            return None
        theirs, source = copy
        own = _newest(self.run, self.keep_local)
        ours = own[0] if own is not None else None
        if ours is not None and ours >= theirs:
            logger.info(
                "offsite copy %s is at step %d, the run folder at %d: kept the folder's", self.folder, theirs, ours
            )
            self.copied_step = theirs
            return None
        started = time.monotonic()
        self.run.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as src:  # the newest whole generation (a corrupt newer one was set aside)
            rotate_in(_copy_whole(src, self.run / CHECKPOINT), self.run / CHECKPOINT, self.keep_local)
        for name in COMPANIONS:
            if (self.folder / name).is_file():
                with (self.folder / name).open("rb") as src:
                    os.replace(_copy_whole(src, self.run / name), self.run / name)
            else:  # the folder's would belong to another point of the run
                (self.run / name).unlink(missing_ok=True)
        fsync_dir(self.run)
        self.copied_step = theirs
        logger.warning(
            "restored step %d from the offsite copy %s in %.1f s (the run folder %s)",
            theirs,
            self.folder,
            time.monotonic() - started,
            "held nothing" if ours is None else f"was at step {ours}",
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

        The thread ends either way; a copy still in flight after ``timeout`` is left to the process's exit
        (its temporary file offsite is replaced by the next copy)."""
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
            self._copy()

    def _copy(self) -> None:
        started = time.monotonic()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.lock:  # no checkpoint half-rotated under us; ``step`` is the file's
                src = (self.run / CHECKPOINT).open("rb")
                step = self._latest if self._latest is not None else -1
            with src:
                size = os.fstat(src.fileno()).st_size
                tmp = _copy_whole(src, self.folder / CHECKPOINT)
            rotate_in(tmp, self.folder / CHECKPOINT, OFFSITE_GENERATIONS)
            for name in COMPANIONS:
                size += self._copy_companion(name)
            fsync_dir(self.folder)
        except OSError as exc:
            logger.warning("offsite copy to %s failed (retried at the next checkpoint): %s", self.folder, exc)
            self._record({"error": f"{type(exc).__name__}: {exc}", "failed_at": time.time()})
            return
        self.copied_step = step
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
        info = {**(read_offsite(self.run) or {}), "folder": str(self.folder), **event}
        if "step" in event:
            info.pop("error", None)
            info.pop("failed_at", None)
        tmp = self.run / (OFFSITE_FILE + ".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        os.replace(tmp, self.run / OFFSITE_FILE)
