"""Preemptible training: crash-safe checkpoint generations, global RNG states, stop signals, run status.

A run that may be killed at any moment (a background job on a shared CPU, a preemptible host) keeps
its progress in *generations* of one checkpoint: ``last.pt`` (newest), ``last.pt.1``, ``last.pt.2``.
A checkpoint is written to a temporary file, flushed and ``fsync``-ed, the older generations move
down one place (``os.replace``), the new file takes ``last.pt``'s name, and the folder is
``fsync``-ed: a crash at any point leaves every generation either whole or absent. Each checkpoint
carries a SHA-256 of its own content (every tensor's dtype, shape and bytes, and every value), checked
after a full ``torch.load`` on resume, so a truncated or corrupted file is found, logged and skipped for
the next generation (:func:`load_newest`).

:class:`StopSignals` turns SIGTERM and SIGINT into a request the training loop honours after the step
it is in (checkpoint, log line, clean exit); a second signal exits at once, which loses only what the
newest generation does not hold. :func:`run_status` and :func:`control` are what ``oaml train-status``
and ``oaml train-control`` (``make train-status``, ``train-pause``, ``train-resume``, ``train-stop``)
run against a run folder and the pid file the background run writes (``train.pid``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, BinaryIO

import numpy as np
import torch

from model.training.ledger import describe_compute
from model.training.release import release_gate

__all__ = [
    "CorruptCheckpoint",
    "StopSignals",
    "content_digest",
    "control",
    "fsync_dir",
    "generations",
    "load_newest",
    "restore_rng_states",
    "rng_states",
    "read_json_object",
    "rotate_in",
    "run_status",
    "save_generation",
    "write_synced",
]

logger = logging.getLogger(__name__)

#: the key of a checkpoint's own digest
DIGEST_KEY = "content_sha256"
#: the background run's pid file, in its run folder
PID_FILE = "train.pid"
#: a small JSON beside the checkpoints: what the newest one holds (read by ``oaml train-status``)
STATUS_FILE = "status.json"
#: beside it, what the run's offsite copy holds (model/training/offsite.py), written after each copy or failure
OFFSITE_FILE = "offsite.json"


class CorruptCheckpoint(Exception):
    """A checkpoint that does not load whole, or whose content does not match its digest."""


# -- checkpoint generations ----------------------------------------------------------------------


def generations(path: Path, keep: int) -> list[Path]:
    """``path`` and its older generations, newest first: ``last.pt``, ``last.pt.1``, ..."""
    return [path] + [path.with_name(f"{path.name}.{i}") for i in range(1, keep)]


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key, item in value.items():  # insertion order: torch.save and torch.load keep it
            digest.update(f"K{key!r}|".encode())
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}|{value!r}|".encode())


def content_digest(payload: dict[str, Any]) -> str:
    """SHA-256 over everything a checkpoint holds (its digest key left out)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories have no handles)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write`` into ``path``'s temporary twin (``NAME.tmp``), flushed and ``fsync``-ed; the twin, for the caller
    to rename into place (``os.replace``, :func:`rotate_in`): what lands under ``path`` is whole."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def rotate_in(tmp: Path, path: Path, keep: int) -> None:
    """The whole, synced file ``tmp`` becomes the newest generation of ``path``; ``keep`` generations in all.

    The generations on disk move down to consecutive places after the new one (oldest first, so nothing is
    overwritten before it has moved); those past ``keep`` are deleted. At every instant each one is whole."""
    names = generations(path, keep)
    present = [p for p in names if p.exists()]
    for i in reversed(range(len(present))):
        if i + 1 >= keep:
            present[i].unlink()
        elif present[i] != names[i + 1]:
            os.replace(present[i], names[i + 1])
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_generation(payload: dict[str, Any], path: Path, keep: int = 3) -> None:
    """Write ``payload`` (with its digest) as the newest generation of ``path``, keeping ``keep`` in all.

    Temp file, flush, fsync, rotate the older generations down, ``os.replace`` into place, fsync the folder:
    at every instant each generation on disk is whole."""
    payload = {**payload, DIGEST_KEY: content_digest(payload)}
    rotate_in(write_synced(path, lambda f: torch.save(payload, f)), path, keep)


def _load_checked(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unreadable file
        raise CorruptCheckpoint(f"{path.name} does not load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict):
        raise CorruptCheckpoint(f"{path.name} holds a {type(payload).__name__}, not a checkpoint")
    expected = payload.pop(DIGEST_KEY, None)
    if expected is not None and content_digest(payload) != expected:
        raise CorruptCheckpoint(f"{path.name}: content does not match its SHA-256")
    return payload


def load_newest(path: Path, keep: int, map_location: torch.device | str = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest whole generation of ``path`` and its file; ``None`` when there is none on disk.

    A generation that does not load or whose digest does not match is logged, skipped and, once a whole one
    is found, set aside as ``NAME.corrupt`` (so the next checkpoint does not keep it as a generation). When
    files exist but none is whole, :class:`CorruptCheckpoint` is raised and nothing is moved: starting again
    from nothing would silently throw away a run."""
    present = [p for p in generations(path, keep) if p.exists()]
    problems: list[str] = []
    skipped: list[Path] = []
    for candidate in present:
        try:
            payload = _load_checked(candidate, map_location)
        except CorruptCheckpoint as exc:
            logger.warning("skipping checkpoint %s: %s", candidate, exc)
            problems.append(str(exc))
            skipped.append(candidate)
            continue
        for bad in skipped:
            os.replace(bad, bad.with_name(bad.name + ".corrupt"))
        if skipped:
            logger.warning(
                "resuming from the older generation %s (set aside: %s)",
                candidate,
                ", ".join(b.name + ".corrupt" for b in skipped),
            )
        return payload, candidate
    if present:
        raise CorruptCheckpoint(f"no checkpoint of {path} loads whole: {'; '.join(problems)}")
    return None


# -- global random number generators ------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """The global generators' states (torch, CUDA, NumPy, Python), as tensors ``torch.load`` reads back
    with ``weights_only``. The trainer seeds what it draws per step; these guard any other draw."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    n = states["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# -- stop signals --------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM and SIGINT set :attr:`received` (the loop stops after its step, checkpointed); a second signal
    takes its default action at once. Handlers are installed only in the main thread, and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            logger.warning("%s again: exiting now (the newest checkpoint generation is kept)", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name
        logger.warning("%s: stopping after this step with a checkpoint (send it again to exit at once)", name)


# -- memory ---------------------------------------------------------------------------------------


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim() -> None:
    """Give the memory the allocator holds free back to the system (glibc's ``malloc_trim``)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryGuard:
    """A background run's manners on a shared machine (``memory_guard = true``).

    Before each step it gives what the last step freed back to the system (so between steps it holds its data
    and model, not the step's activations) and, while the machine's available memory is below what a step adds
    (measured: the process's peak less what it holds after the trim, plus ``margin``), waits instead of
    pushing the machine into reclaiming page cache and killing processes. Waiting changes nothing the run
    computes. While it waits, ``memory_wait.json`` in the run folder says since when and how much it needs."""

    def __init__(self, folder: Path, margin: int = 2**30, poll_s: float = 10.0) -> None:
        self.folder, self.margin, self.poll_s = Path(folder), margin, poll_s
        self.waited_s = 0.0

    def need(self) -> int:
        """Bytes a step adds to what the process holds between steps."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        return max(0, peak - (_rss_bytes() or peak))

    def before_step(self) -> None:
        _trim()
        need = self.need() + self.margin
        available = _meminfo_bytes("MemAvailable")
        if available is None or available >= need:
            return
        started, marker = time.monotonic(), self.folder / "memory_wait.json"
        logger.warning(
            "waiting for memory: %.1f GB available, a step needs about %.1f GB", available / 2**30, need / 2**30
        )
        marker.write_text(json.dumps({"since": time.time(), "need_bytes": need, "available_bytes": available}))
        try:
            while (available := _meminfo_bytes("MemAvailable") or need) < need:
                time.sleep(self.poll_s)
        finally:
            marker.unlink(missing_ok=True)
        waited = time.monotonic() - started
        self.waited_s += waited
        logger.warning("memory available again after %.0f s waiting (%.1f GB)", waited, available / 2**30)


# -- status and control of a run folder ----------------------------------------------------------


def _read_pid(run: Path) -> int | None:
    try:
        return int((run / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _group(pgid: int) -> list[tuple[int, str, bytes]]:
    """(pid, state, command line) of each live process of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append((int(entry.name), fields[0], cmdline))
    return members


def _process_state(pgid: int) -> str | None:
    """The background run whose process group is ``pgid`` (the pid file's: the session leader ``make
    train-background`` starts): 'running', 'paused' (stopped by SIGSTOP), or None when no process of the group is
    left or none of them is a trainer (the number was reused)."""
    members = _group(pgid)
    if not any(b"train" in cmdline for _, _, cmdline in members):
        return None
    return "paused" if any(state in ("T", "t") for _, state, _ in members) else "running"


def _tail_rows(path: Path, limit: int = 2000) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines()[-limit:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, half-written or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_status(run: Path) -> dict[str, Any]:
    """A run's ``status.json`` ({} when it is missing, half-written or not an object)."""
    return read_json_object(Path(run) / STATUS_FILE) or {}


def read_offsite(run: Path) -> dict[str, Any] | None:
    """A run's ``offsite.json`` (None when the run keeps no offsite copy, or the file is unreadable)."""
    return read_json_object(Path(run) / OFFSITE_FILE)


def run_status(run: Path) -> dict[str, Any]:
    """What ``oaml train-status`` prints, as a dict: process, progress, recent speed, checkpoints, validations."""
    run = Path(run)
    info: dict[str, Any] = {"run": str(run)}
    pid = _read_pid(run)
    info["pid"] = pid
    info["process"] = (_process_state(pid) if pid else None) or "not running"
    status = read_status(run)
    info["checkpoint"] = status
    now = time.time()
    newest = run / "last.pt"
    info["checkpoint_age_s"] = now - newest.stat().st_mtime if newest.exists() else None
    info["generations"] = [
        {"file": p.name, "mib": round(p.stat().st_size / 2**20, 1), "age_s": round(now - p.stat().st_mtime)}
        for p in generations(newest, 10)
        if p.exists()
    ]
    rows = [r for r in _tail_rows(run / "steps.jsonl") if "time" in r and "samples" in r]
    info["step"] = rows[-1]["step"] if rows else status.get("global_step", 0)
    info["samples"] = rows[-1]["samples"] if rows else status.get("samples", 0)
    info["total_samples"] = status.get("total_samples")
    info["total_steps"] = status.get("total_steps")
    info["last_log_age_s"] = now - rows[-1]["time"] if rows else None
    recent = rows[-21:]
    rates = [
        (b["samples"] - a["samples"]) / (b["time"] - a["time"])
        for a, b in zip(recent[:-1], recent[1:], strict=True)
        if b["samples"] > a["samples"] and b["time"] > a["time"]
    ]
    # the median interval: one pause or restart among them does not move it
    info["samples_per_s"] = statistics.median(rates) if rates else None
    info["step_faces_per_s"] = statistics.median([r["img_per_s"] for r in recent]) if recent else None
    info["validations"] = _validations(run / "epochs.csv", status.get("samples_per_step"))
    info["offsite"] = read_offsite(run)
    info["memory_wait"] = None
    if (run / "memory_wait.json").exists():
        try:
            info["memory_wait"] = json.loads((run / "memory_wait.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return info


def _validations(path: Path, samples_per_step: int | None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        try:
            step = int(row["global_step"])
            out.append(
                {
                    "step": step,
                    "samples": step * samples_per_step if samples_per_step else None,
                    **{k: float(row[k]) for k in _VAL_COLUMNS if row.get(k) not in (None, "")},
                }
            )
        except (KeyError, ValueError):
            continue
    return out


_VAL_COLUMNS = ("val_score", "val_acc_cos_clean", "val_acc_cos_occluded", "val_acc_qaconv_occluded", "val_faces")


def format_status(info: dict[str, Any]) -> str:
    lines = [f"run: {info['run']}"]
    pid = info["pid"]
    lines.append(
        f"process: {info['process']}" + (f" (process group {pid})" if pid and info["process"] != "not running" else "")
    )
    wait = info.get("memory_wait")
    if wait and info["process"] != "not running":
        lines.append(
            f"waiting for memory for {_ago(time.time() - wait['since'])}: a step needs about "
            f"{wait['need_bytes'] / 2**30:.1f} GB, {wait['available_bytes'] / 2**30:.1f} GB were available"
        )
    total = info.get("total_samples")
    done = info.get("samples") or 0
    share = f" of {total:,} ({100 * done / total:.1f}%)" if total else ""
    lines.append(
        f"samples done: {done:,}{share}, step {info.get('step', 0):,}"
        + (f" of {info['total_steps']:,}" if info.get("total_steps") else "")
    )
    rate = info.get("samples_per_s")
    if rate:
        left = (total - done) / rate if total and total > done else 0.0
        eta = f" ({_ago(left) if left < 172800 else f'{left / 86400:.1f} days'} to go at that rate)" if left else ""
        lines.append(f"samples/s (recent, wall clock): {rate:.2f}{eta}")
        lines.append(
            f"faces/s within steps (mixed views counted; validations, checkpoints not): {info['step_faces_per_s']:.2f}"
        )
    else:
        lines.append("samples/s (recent): not measured yet")
    if info.get("last_log_age_s") is not None:
        lines.append(f"last logged step: {_ago(info['last_log_age_s'])} ago")
    ck = info.get("checkpoint") or {}
    if info.get("checkpoint_age_s") is not None:
        at = f" at step {ck['global_step']:,}" if "global_step" in ck else ""
        lines.append(f"last checkpoint: {_ago(info['checkpoint_age_s'])} ago{at}")
        kept = [f"{g['file']} ({g['mib']} MiB, {_ago(g['age_s'])} old)" for g in info["generations"]]
        lines.append("generations: " + ", ".join(kept))
    else:
        lines.append("last checkpoint: none yet")
    if ck.get("compute"):
        lines.append(f"trained (as of the last checkpoint): {describe_compute(ck['compute'])}")
    offsite = info.get("offsite")
    if offsite:
        lines.append(_offsite_line(offsite))
    lines += _validation_lines(info.get("validations") or [], ck)
    return "\n".join(lines)


def _offsite_line(offsite: dict[str, Any]) -> str:
    """Where the offsite copy stands: the step it holds, or the failure that keeps it behind."""
    now = time.time()
    if "copied_at" in offsite:
        held = f"step {offsite['step']:,}, copied {_ago(now - offsite['copied_at'])} ago in {offsite['seconds']:.0f} s"
    elif "restored_at" in offsite:
        held = f"step {offsite['step']:,}, restored from it {_ago(now - offsite['restored_at'])} ago"
    else:
        held = "nothing copied yet"
    caution = " (on this machine's own filesystem: it does not outlive this disk)" if offsite.get("same_disk") else ""
    if "error" in offsite:
        return (
            f"offsite copy ({offsite['folder']}){caution}: failing since {_ago(now - offsite['failed_at'])} ago "
            f"({offsite['error']}); it holds {held}"
        )
    return f"offsite copy ({offsite['folder']}){caution}: {held}"


def _score_cells(v: dict[str, Any]) -> str:
    def cell(key: str) -> str:
        x = v.get(key)
        return f"{x:.4f}" if isinstance(x, float) and not math.isnan(x) else "-"

    return f"{cell('val_score'):>7} {cell('val_acc_cos_clean'):>7} {cell('val_acc_cos_occluded'):>7} " + (
        f"{cell('val_acc_qaconv_occluded'):>7}"
    )


def _validation_lines(vals: list[dict[str, Any]], status: dict[str, Any]) -> list[str]:
    """The validation curve, the initial weights' score on the same people, and where the release rule stands."""
    base = status.get("baseline") or {}
    if not vals and not base:
        return ["validation: none yet"]
    lines = ["validation (epochs.csv; score = mean of the three accuracies):"]
    lines.append(f"  {'step':>7} {'samples':>10} {'score':>7} {'cos':>7} {'cos occ':>7} {'qa occ':>7} {'faces':>6}")
    if base:
        faces = f"{int(base['faces']):,}" if base.get("faces") is not None else "-"
        lines.append(
            f"  {'start':>7} {'-':>10} "
            + _score_cells({f"val_{k}": v for k, v in base.items()})
            + f" {faces:>6}  the initial weights ({base.get('weights')})"
        )
    older = False
    for v in vals[-15:]:
        samples = f"{v['samples']:,}" if v.get("samples") is not None else "-"
        faces = f"{int(v['val_faces']):,}" if v.get("val_faces") is not None else "-"
        older |= v.get("val_faces") is None
        lines.append(f"  {v['step']:>7,} {samples:>10} " + _score_cells(v) + f" {faces:>6}")
    if len(vals) > 15:
        lines.append(f"  ({len(vals) - 15} earlier validations in epochs.csv)")
    if older:
        lines.append(
            "  (rows without faces were measured before validation left out the initial weights' training people)"
        )
    gate = release_gate(status)
    if gate is not None:
        lines.append(f"release rule: {gate.reason}")
    return lines


def control(run: Path, action: str, wait_s: float = 900.0) -> tuple[str, bool]:
    """``check``; ``pause`` (SIGSTOP to the run's process group); ``resume`` (SIGCONT); ``stop`` (SIGTERM to the
    group, SIGCONT so that a paused run can act on it, then wait until its processes have checkpointed and
    exited). Returns a line to print and whether the run is (still) there."""
    pgid = _read_pid(Path(run))
    state = _process_state(pgid) if pgid else None
    if pgid is None or state is None:
        return f"not running ({Path(run) / PID_FILE}: {pgid or 'absent'})", False
    if action == "check":
        return f"{state} (process group {pgid})", True
    if action == "pause":
        os.killpg(pgid, signal.SIGSTOP)
        return f"paused process group {pgid}; `make train-resume` continues it", True
    if action == "resume":
        os.killpg(pgid, signal.SIGCONT)
        return f"resumed process group {pgid}", True
    if action != "stop":
        raise ValueError(f"unknown action {action!r}")
    os.killpg(pgid, signal.SIGTERM)
    os.killpg(pgid, signal.SIGCONT)  # a paused run must run to act on it
    deadline = time.monotonic() + wait_s
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(1.0)
    if _group(pgid):
        return f"sent SIGTERM to process group {pgid}; still there after {wait_s:.0f} s (it stops after its step)", True
    return f"process group {pgid}: checkpointed and exited", False
