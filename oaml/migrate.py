"""``oaml migrate``: move a collection of a running service to other weights, look before switching, go back.

The service does the work (``POST /collections/{name}/migration``, :mod:`service.migration`); this command asks
for it, shows its progress (faces done, faces a second, time left) and its report, and exits when it is done:

    oaml migrate --collection site-a --to weights/v4.safetensors --dry-run   # how decisions would move
    oaml migrate --collection site-a --to weights/v4.safetensors             # re-embed, then switch
    oaml migrate --collection site-a --rollback                              # back to the previous weights
    oaml migrate --collection site-a --drop-old                              # erase the previous weights' data

``--to`` takes a weights file (its ``model_version`` is read from it: the service must find the same weights in
its ``OAML_WEIGHTS_DIR``) or a model version. The service's address and key come from ``--url`` / ``--key`` or
``OAML_URL`` / ``OAML_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # httpx is not a dependency of the service: imported when the command runs
    import httpx

__all__ = ["add_parser", "run", "report_table"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="move a collection of a running service to other weights (re-embedded from stored crops), "
        "look before switching (--dry-run), roll back, drop the old weights' data",
    )
    p.add_argument("--collection", default="default", help="the collection (default: default)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", help="a weights file (its model_version is read) or a model version")
    what.add_argument("--rollback", action="store_true", help="match the collection with its previous weights again")
    what.add_argument("--drop-old", action="store_true", help="erase the previous weights' data (no rollback after)")
    what.add_argument("--switch", action="store_true", help="switch a migration that is ready (after a dry run)")
    what.add_argument("--cancel", action="store_true", help="stop a migration and erase what it wrote")
    what.add_argument("--status", action="store_true", help="the collection's versions and its migration")
    p.add_argument("--dry-run", action="store_true", help="re-embed and report, but do not switch")
    p.add_argument(
        "--missing",
        choices=["refuse", "drop"],
        default="refuse",
        help="faces enrolled without a stored crop cannot be moved: refuse (list them) or delete them at the switch",
    )
    p.add_argument("--url", default=os.environ.get("OAML_URL", "http://127.0.0.1:8000"), help="the service")
    p.add_argument("--key", default=os.environ.get("OAML_API_KEY"), help="an admin key (default: $OAML_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the final status (with the report) as JSON")
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between progress reads")
    p.set_defaults(func=run)


def _version(to: str) -> str:
    path = Path(to)
    if path.suffix == ".safetensors" and path.is_file():
        from model.checkpoint import read_metadata

        return str(read_metadata(path)["model_version"])
    return to


def run(args: argparse.Namespace) -> int:
    import httpx

    headers = {"X-API-Key": args.key} if args.key else {}
    base = f"{args.url.rstrip('/')}/collections/{args.collection}"
    with httpx.Client(headers=headers, timeout=60) as client:
        try:
            if args.status:
                answer = client.get(f"{base}/migration")
            elif args.rollback:
                answer = client.post(f"{base}/rollback")
            elif args.drop_old:
                answer = client.delete(f"{base}/previous")
            elif args.switch:
                answer = client.post(f"{base}/migration/switch")
            elif args.cancel:
                answer = client.delete(f"{base}/migration")
            else:
                body = {"to": _version(args.to), "switch": not args.dry_run, "missing": args.missing}
                answer = client.post(f"{base}/migration", json=body)
            if answer.status_code >= 400:
                return _refused(answer)
            status = answer.json()
            if args.to and not args.status:
                status = _follow(client, base, args.poll_s)
        except httpx.HTTPError as exc:
            sys.stderr.write(f"oaml migrate: cannot reach {args.url}: {exc}\n")
            return 2
    migration = status.get("migration") or {}
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(_summary(status) + "\n")
        if migration.get("report"):
            sys.stdout.write(report_table(migration["report"]) + "\n")
    return 1 if migration.get("state") == "failed" else 0


def _refused(answer: httpx.Response) -> int:
    try:
        problem = answer.json()
    except ValueError:
        problem = {"detail": answer.text}
    sys.stderr.write(f"oaml migrate: {answer.status_code} {problem.get('code', '')}: {problem.get('detail')}\n")
    for row in problem.get("subjects") or []:
        sys.stderr.write(f"  {row['subject']}: {row['faces']} face(s) without a stored crop\n")
    return 1


def _follow(client: httpx.Client, base: str, poll_s: float) -> dict[str, Any]:
    """Poll the migration until it stops running, with a progress line on stderr."""
    started = time.monotonic()
    while True:
        status: dict[str, Any] = client.get(f"{base}/migration").json()
        migration = status.get("migration") or {}
        state = migration.get("state")
        if state not in ("running", "switching"):
            sys.stderr.write("\n")
            return status
        done, faces = migration.get("done", 0), migration.get("faces", 0)
        rate, left = migration.get("faces_per_second"), migration.get("seconds_left")
        width = 30
        filled = int(width * done / faces) if faces else width
        sys.stderr.write(
            f"\r{state} to {migration.get('to')}: [{'#' * filled}{'.' * (width - filled)}] {done}/{faces} faces"
            + (f", {rate:.1f} faces/s" if rate else "")
            + (f", {left:.0f} s left" if left is not None else "")
            + f" ({time.monotonic() - started:.0f} s)   "
        )
        sys.stderr.flush()
        time.sleep(poll_s)


def _summary(status: dict[str, Any]) -> str:
    migration = status.get("migration") or {}
    line = f"collection {status['collection']}: model {status['model_version']}"
    if status.get("previous_version"):
        line += f" (previous {status['previous_version']} kept for rollback)"
    if migration:
        line += f"; migration to {migration.get('to')}: {migration.get('state')}"
        if migration.get("derived_from"):
            line += f" (made from the faces' stored data at {migration['derived_from']}: no crops needed)"
        if migration.get("error"):
            line += f" ({migration['error']})"
    return line


def report_table(report: dict[str, Any]) -> str:
    """A migration's report (:func:`service.migration.decision_report`) as a short table."""
    rank = report.get("rank1") or {}
    lines = [
        f"How decisions move from {report['old']} to {report['new']} on the collection's own {report['faces']} "
        f"faces ({report['probes']} probes; {report['subjects_measured']} subjects with two faces or more):",
        f"  own subject ranked first: {_pct(rank.get('old'))} -> {_pct(rank.get('new'))}",
    ]
    worse = report.get("subjects_worse") or []
    if worse:
        lines.append(f"  subjects ranked first less often: {', '.join(worse[:10])}{' ...' if len(worse) > 10 else ''}")
    lines.append("  | preset | threshold old -> new | pairs of subjects passing old -> new | new lookalikes |")
    lines.append("  |---|---|---|---|")
    for name, row in report.get("presets", {}).items():
        thr, passing = row["threshold"], row["pairs_passing"]
        shown = ", ".join(f"{'+'.join(p['subjects'])} ({p['score']:.2f})" for p in row["new_lookalikes"][:3])
        lines.append(
            f"  | {name} | {thr['old']:.2f} -> {thr['new']:.2f} | {passing['old']} -> {passing['new']} | "
            f"{shown or '-'} |"
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
