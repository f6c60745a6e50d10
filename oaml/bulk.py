"""``oaml enrol``: enrol a folder or a CSV of photos into a running service, resumably, a few requests at a time.

    oaml enrol http://127.0.0.1:8000 photos/ --collection site-a --report failures.csv
    oaml enrol http://127.0.0.1:8000 people.csv --concurrency 8

- A **folder** holds one sub-folder per subject: its name is the subject id, the photos in it are the subject's
  (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``; also ``.gif`` and ``.tif``, which the service refuses
  with 415 and the report lists). Hidden files, files of other kinds and deeper folders are left out, and
  counted. ``--name-from-folder`` sends the folder's name, ``_`` read as a space, as the subject's name.
- A **CSV** has a header with ``subject`` and ``image`` and, optionally, ``name`` and ``metadata``: ``image`` is
  a path relative to the CSV's folder (or absolute); ``metadata`` is a JSON object or empty.

Each photo is one request (``POST /gallery``) with its own ``Idempotency-Key``, derived from the collection, the
subject, the photo's path (relative to the folder or CSV) and the SHA-256 of its bytes: a re-run, after a crash
or a ^C, gets the stored answers of what was enrolled already (counted as skipped) and enrols the rest. The
service keeps the keys 24 hours: a re-run later than that enrols every photo again. A photo whose key answered a
different request (its name or metadata changed, or its subject was deleted since) is reported with
``IDEMPOTENCY_KEY_REUSED`` rather than enrolled twice.

``--concurrency`` requests are in flight at once (default 4), through :class:`oaml.client.AsyncOAMLClient` (its
retries: 503 and 429 waited out as ``Retry-After`` says, lost connections retried with the same key). A progress
bar on stderr shows photos per second and the time left; the summary goes to stdout.

The report (``--report``, default ``enrol-failures.csv`` when something failed) is a CSV of every photo not
enrolled: ``subject,image,code,reason,status`` (``image`` as the folder or CSV gave it; ``code`` the service's,
e.g. ``NO_FACE``, ``MULTIPLE_FACES``, ``FACE_TOO_SMALL``, ``LOW_QUALITY``, ``INVALID_IMAGE``,
``UNSUPPORTED_MEDIA``, ``VALIDATION_ERROR``, or the client's: ``FILE_UNREADABLE``, ``INVALID_METADATA``,
``CONNECTION_ERROR``, ``NOT_ATTEMPTED``; ``status`` the HTTP status, empty for the client's).

Exit status: 0 when every photo is enrolled (now or before), 1 when some failed (the report says which), 2 on
a usage error or when the service could not be reached (before or during the run).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oaml.client import AsyncOAMLClient

__all__ = ["add_parser", "run", "Photo", "Failure", "Outcome", "photos_in_folder", "photos_in_csv", "key_for"]

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
REPORT_COLUMNS = ("subject", "image", "code", "reason", "status")
DEFAULT_REPORT = Path("enrol-failures.csv")
#: After this many connection failures in a row (each after its retries), the rest is not attempted.
GIVE_UP_AFTER = 3


class UsageError(Exception):
    """The command cannot start: what to fix, in one line."""


@dataclass(frozen=True)
class Photo:
    """One photo to enrol: its subject, the name and metadata sent with it, its file and how the input named it."""

    subject: str
    path: Path
    shown: str  # as the folder (relative to it) or the CSV named it: the report's `image` and part of the key
    name: str | None = None
    metadata: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None  # (code, reason) found before sending: reported, never sent


@dataclass(frozen=True)
class Failure:
    subject: str
    image: str
    code: str
    reason: str
    status: int | None = None


@dataclass
class Outcome:
    enrolled: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    connection_lost: bool = False
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.enrolled + self.skipped + len(self.failures)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "enrol",
        help="enrol a folder (a sub-folder per subject) or a CSV of photos into a running service: "
        "resumable, a few requests at a time, a report of what failed",
        description="Enrol a folder (a sub-folder per subject) or a CSV (subject,name,image,metadata) of photos "
        "into a running service: one request per photo, a few at a time, resumable (each photo's Idempotency-Key "
        "comes from its collection, subject, path and bytes), with a CSV report of the photos not enrolled. "
        "Exit status: 0 all enrolled, 1 some failed, 2 usage or connection errors. See docs/client.md.",
    )
    p.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "source", type=Path, help="a folder with a sub-folder per subject, or a CSV (subject,name,image,metadata)"
    )
    p.add_argument("--collection", default=None, help="the collection to enrol into (default: the default one)")
    p.add_argument("--key", default=os.environ.get("OAML_API_KEY"), help="an admin key (default: $OAML_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help=f"CSV of the photos not enrolled, with their reasons (default: {DEFAULT_REPORT} when some failed)",
    )
    p.add_argument("--aligned", action="store_true", help="the photos are aligned 112x112 crops: no detection")
    p.add_argument(
        "--name-from-folder", action="store_true", help="name each subject after its folder ('_' read as a space)"
    )
    p.add_argument(
        "--face",
        default="single",
        help="which face of each photo: single (photos with several faces are rejected; default), largest, or an index",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt (default 120)")
    p.add_argument("--retries", type=int, default=3, help="retries per photo on 503, 429 and lost connections")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ the input


def photos_in_folder(root: Path, name_from_folder: bool = False) -> tuple[list[Photo], list[str]]:
    """The photos of a folder with one sub-folder per subject, and what was left out (why, one line each)."""
    photos: list[Photo] = []
    left_out: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            left_out.append(f"{entry.name}: not in a subject's folder")
            continue
        name = entry.name.replace("_", " ") if name_from_folder else None
        for item in sorted(entry.iterdir()):
            shown = f"{entry.name}/{item.name}"
            if item.name.startswith("."):
                continue
            if item.is_dir():
                left_out.append(f"{shown}/: a folder inside a subject's folder")
            elif item.suffix.lower() not in PHOTO_SUFFIXES:
                left_out.append(f"{shown}: not a photo by its name")
            else:
                photos.append(Photo(entry.name, item, shown, name))
    return photos, left_out


def photos_in_csv(path: Path) -> list[Photo]:
    """The rows of a CSV ``subject,name,image,metadata`` (``image`` relative to the CSV's folder)."""
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip() for c in reader.fieldnames or []}
        missing = {"subject", "image"} - columns
        if missing:
            raise UsageError(f"{path}: the header must name subject and image (missing: {', '.join(sorted(missing))})")
        photos: list[Photo] = []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            subject, image = row.get("subject", ""), row.get("image", "")
            if not subject and not image:
                continue  # a blank line
            problem: tuple[str, str] | None = None
            metadata: dict[str, Any] | None = None
            if row.get("metadata"):
                try:
                    parsed = json.loads(row["metadata"])
                except json.JSONDecodeError as exc:
                    parsed, problem = None, ("INVALID_METADATA", f"metadata is not JSON: {exc}")
                if parsed is not None and not isinstance(parsed, dict):
                    problem = ("INVALID_METADATA", "metadata must be a JSON object")
                elif isinstance(parsed, dict):
                    metadata = parsed
            if not image:
                problem = ("FILE_UNREADABLE", "no image given")
            photos.append(Photo(subject, base / image, image, row.get("name") or None, metadata, problem))
    return photos


def key_for(collection: str, photo: Photo, content: bytes) -> str:
    """The photo's ``Idempotency-Key``: the same for the same collection, subject, path and bytes."""
    what = json.dumps([collection, photo.subject, photo.shown, hashlib.sha256(content).hexdigest()])
    return "oaml-enrol-" + hashlib.sha256(what.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- progress


class Progress:
    """A bar on stderr: tqdm's when it is installed, else one line rewritten (a line every 10 s off a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.count = total, enabled, 0
        self.started = self.shown_at = time.monotonic()
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="photo", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                self.bar = None
        self.tty = sys.stderr.isatty()

    def update(self, failed: int) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=failed, refresh=False)
            return
        now = time.monotonic()
        every = 0.5 if self.tty else 10.0
        if now - self.shown_at < every and self.count < self.total:
            return
        self.shown_at = now
        rate = self.count / max(now - self.started, 1e-9)
        left = (self.total - self.count) / rate if rate > 0 else 0.0
        line = f"{self.count}/{self.total} photos, {rate:.2f} photos/s, {_duration(left)} left, {failed} failed"
        sys.stderr.write(f"\r{line}   " if self.tty else f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---------------------------------------------------------------------------------------------------- running


def _api_failures(photo: Photo, exc: Any) -> list[Failure]:
    """The report's rows for an error answer: the rejected photo's own code and reason, else the request's."""
    rejected = exc.rejected
    if rejected:
        return [Failure(photo.subject, photo.shown, r.code, r.reason, exc.status) for r in rejected]
    reason = exc.detail
    errors = exc.body.get("errors") if isinstance(exc.body, dict) else None
    if isinstance(errors, list) and errors:  # the schema's complaints (a subject id it does not accept...)
        reason += ": " + "; ".join(f"{'.'.join(e.get('loc', [])[1:])}: {e.get('msg', '')}" for e in errors)
    if exc.code == "IDEMPOTENCY_KEY_REUSED":
        reason += " (enrolled before with another name or metadata, or its subject was deleted since)"
    return [Failure(photo.subject, photo.shown, exc.code, reason, exc.status)]


async def enrol_all(
    client: AsyncOAMLClient,
    photos: list[Photo],
    collection: str,
    *,
    concurrency: int = 4,
    aligned: bool = False,
    face: str = "single",
    on_done: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """Enrol ``photos`` one per request, ``concurrency`` at once; what happened to each, counted."""
    from oaml.client import OAMLAPIError, OAMLConnectionError

    outcome = Outcome()
    queue: asyncio.Queue[Photo] = asyncio.Queue()
    for photo in photos:
        queue.put_nowait(photo)
    lost_in_a_row = 0
    started = time.monotonic()

    def finish() -> None:
        if on_done is not None:
            on_done(outcome)

    async def one(photo: Photo) -> None:
        nonlocal lost_in_a_row
        if photo.problem is not None:
            outcome.failures.append(Failure(photo.subject, photo.shown, *photo.problem))
            return
        try:
            content = photo.path.read_bytes()
        except OSError as exc:
            outcome.failures.append(Failure(photo.subject, photo.shown, "FILE_UNREADABLE", exc.strerror or str(exc)))
            return
        key = key_for(collection, photo, content)
        upload = io.BytesIO(content)
        upload.name = photo.path.name  # the service names the photo by it in `rejected`
        try:
            answer = await client.enrol(
                photo.subject,
                upload,
                name=photo.name,
                metadata=photo.metadata,
                face=face,
                aligned=aligned,
                collection=collection,
                idempotency_key=key,
            )
        except OAMLConnectionError as exc:
            lost_in_a_row += 1
            reason = str(exc.__cause__ or exc)
            outcome.failures.append(Failure(photo.subject, photo.shown, "CONNECTION_ERROR", reason))
            outcome.connection_lost = True
            return
        except OAMLAPIError as exc:
            lost_in_a_row = 0
            outcome.failures.extend(_api_failures(photo, exc))
            return
        lost_in_a_row = 0
        if answer.replayed:
            outcome.skipped += 1
        else:
            outcome.enrolled += 1

    async def worker() -> None:
        while True:
            try:
                photo = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if lost_in_a_row >= GIVE_UP_AFTER:  # the service is gone: say so for the rest, do not wait on each
                outcome.failures.append(
                    Failure(photo.subject, photo.shown, "NOT_ATTEMPTED", "the service could not be reached")
                )
            else:
                await one(photo)
            finish()

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    outcome.seconds = time.monotonic() - started
    return outcome


def write_report(path: Path, failures: list[Failure]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(REPORT_COLUMNS)
        for x in failures:
            writer.writerow([x.subject, x.image, x.code, x.reason, "" if x.status is None else x.status])


def _gather(args: argparse.Namespace) -> tuple[list[Photo], list[str]]:
    source: Path = args.source
    if source.is_dir():
        return photos_in_folder(source, args.name_from_folder)
    if source.is_file():
        if args.name_from_folder:
            raise UsageError("--name-from-folder is for a folder; a CSV names subjects in its name column")
        return photos_in_csv(source), []
    raise UsageError(f"{source}: no such folder or CSV")


async def _run(args: argparse.Namespace, photos: list[Photo]) -> tuple[Outcome | None, str | None]:
    """The run's outcome, or why it could not start."""
    from oaml.client import AsyncOAMLClient, OAMLAPIError, OAMLConnectionError

    collection = args.collection or "default"
    async with AsyncOAMLClient(
        args.url, args.key, timeout=args.timeout, retries=args.retries, max_connections=max(1, args.concurrency)
    ) as client:
        try:  # before the first photo: the service answers, the key may write, the collection exists
            await client.get_collection(collection)
        except OAMLConnectionError as exc:
            return None, f"cannot reach {args.url}: {exc.__cause__ or exc}"
        except OAMLAPIError as exc:
            hint = " (create it first: POST /collections)" if exc.code == "COLLECTION_NOT_FOUND" else ""
            return None, f"{args.url}: {exc.status} {exc.code}: {exc.detail}{hint}"
        progress = Progress(len(photos), not args.no_progress)
        try:
            outcome = await enrol_all(
                client,
                photos,
                collection,
                concurrency=args.concurrency,
                aligned=args.aligned,
                face=args.face,
                on_done=lambda o: progress.update(len(o.failures)),
            )
        finally:
            progress.close()
    return outcome, None


def run(args: argparse.Namespace) -> int:
    try:
        if args.concurrency < 1:
            raise UsageError("--concurrency must be 1 or more")
        photos, left_out = _gather(args)
    except (UsageError, OSError) as exc:
        sys.stderr.write(f"oaml enrol: {exc}\n")
        return 2
    for line in left_out[:20]:
        sys.stderr.write(f"oaml enrol: left out {line}\n")
    if len(left_out) > 20:
        sys.stderr.write(f"oaml enrol: left out {len(left_out) - 20} more\n")
    if not photos:
        sys.stderr.write(f"oaml enrol: no photos in {args.source}\n")
        return 2
    outcome, refused = asyncio.run(_run(args, photos))
    if outcome is None:
        sys.stderr.write(f"oaml enrol: {refused}\n")
        return 2
    report: Path | None = args.report or (DEFAULT_REPORT if outcome.failures else None)
    if report is not None:
        write_report(report, outcome.failures)
    subjects = len({p.subject for p in photos})
    rate = outcome.done / outcome.seconds if outcome.seconds > 0 else 0.0
    line = (
        f"{len(photos)} photos of {subjects} subjects: enrolled {outcome.enrolled}, "
        f"skipped {outcome.skipped} (enrolled before), failed {len(outcome.failures)}"
        + (f" (report: {report})" if outcome.failures and report is not None else "")
        + f"; {outcome.seconds:.1f} s, {rate:.2f} photos/s"
    )
    sys.stdout.write(line + "\n")
    if outcome.connection_lost:
        sys.stderr.write(f"oaml enrol: the service at {args.url} could not be reached for some photos: run again\n")
        return 2
    return 1 if outcome.failures else 0
