"""Open-set identification on LFW, through the running service: FPIR and DIR at each preset, against SFace.

The protocol (NIST FRTE 1:N terms). LFW's identities are shuffled (seeded). ``strangers`` people
with a single photo are never enrolled: their photos are the non-mated probes. The gallery is
filled in order: first the people with two or more photos (their first photo enrolled, their
second kept as the mated probe), then the remaining single-photo people (distractors, never
probed). At each gallery size ``K`` every mated probe of an enrolled person and every stranger is
sent to ``POST /identify`` of an in-process app (aligned crops, ``aligned=true``: the served
decision, shortlist, QAConv and thresholds included), clean, and again with a reserved
evaluation occluder (a mask for even probes, sunglasses for odd ones).

- FPIR at a preset: strangers whose best candidate passes the preset's threshold (as ``/info``
  states it for this gallery size), against the preset's target.
- DIR at a preset: mated probes whose best candidate is their own person and passes it.
- DIR at a measured FPIR (the field's headline number, for OAML's fused score and for the SFace
  peer's cosine on the same crops, exact search): the threshold set on the strangers' best scores
  so that the stated share of them passes, then the mated probes that are first and pass it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["evaluate_open_set", "markdown_open_set"]

logger = logging.getLogger(__name__)


@dataclass
class _Person:
    name: str
    photos: list[str]  # paths in the cache, by photo number


def _people(cache: Path, seed: int) -> list[_Person]:
    by_name: dict[str, list[str]] = {}
    for line in (cache / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_name.setdefault(rec["identity"], []).append(rec["path"])
    people = [_Person(n, sorted(p)) for n, p in sorted(by_name.items())]
    order = np.random.default_rng([seed, 41]).permutation(len(people))
    return [people[i] for i in order]


def _occluded_png(crop: np.ndarray, landmarks: np.ndarray, occluder: Any, seed: int) -> bytes:
    import io

    from PIL import Image

    image, _ = occluder(crop, landmarks, np.random.default_rng([2027, seed]))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _dir_at_measured_fpir(
    stranger_best: np.ndarray, mated_best: np.ndarray, mated_right: np.ndarray, fpir: float
) -> float | None:
    """DIR at the threshold that lets ``fpir`` of the strangers through (None: too few strangers to say)."""
    allowed = int(np.floor(fpir * len(stranger_best)))
    if len(stranger_best) == 0 or (allowed == 0 and fpir * len(stranger_best) < 1):
        return None
    t = np.sort(stranger_best)[::-1][allowed] if allowed < len(stranger_best) else -np.inf
    return float(np.mean(mated_right & (mated_best > t))) if len(mated_best) else None


def evaluate_open_set(
    weights: Path,
    lfw_cache: Path,
    occluder_root: Path | None = None,
    sizes: tuple[int | None, ...] = (100, 1000, None),
    strangers: int = 1000,
    seed: int = 0,
    peer: Any | None = None,
) -> dict[str, Any]:
    """The report behind ``oaml eval-identify`` (see the module docstring); ``None`` in ``sizes`` is the
    largest gallery the data allow."""
    from fastapi.testclient import TestClient

    from model.align import load_image
    from model.openset import IDENTIFY_PRESETS
    from model.training.evaluate import evaluation_occluders
    from service.app import create_app
    from service.config import Settings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # thousands of in-process requests
    started = time.perf_counter()
    people = _people(lfw_cache, seed)
    single = [p for p in people if len(p.photos) == 1]
    multi = [p for p in people if len(p.photos) >= 2]
    outsiders = single[: min(strangers, len(single) // 2)]
    gallery = multi + single[len(outsiders) :]
    ks = tuple(sorted({min(s, len(gallery)) if s else len(gallery) for s in sizes}))
    manifest = {
        json.loads(line)["path"]: json.loads(line) for line in (lfw_cache / "manifest.jsonl").read_text().splitlines()
    }
    occluders = list(evaluation_occluders(occluder_root).values()) if occluder_root is not None else []
    views = ("clean", "occluded") if occluders else ("clean",)

    def probe(path: str, i: int, view: str) -> bytes:
        """A photo as sent: the aligned crop, or it with a reserved occluder (a mask, or sunglasses)."""
        if view == "clean":
            return (lfw_cache / path).read_bytes()
        rec = manifest[path]
        return _occluded_png(load_image(lfw_cache / path), np.asarray(rec["aligned_landmarks"]), occluders[i % 2], i)

    report: dict[str, Any] = {"protocol": __doc__.split("\n\n")[1].replace("\n", " ").strip(), "sizes": []}
    with tempfile.TemporaryDirectory(prefix="oaml-openset-") as tmp:
        settings = Settings(weights=weights, data_dir=Path(tmp))
        with TestClient(create_app(settings)) as client:
            report["ran_on"] = ran_on(client.get("/info").json(), lfw_cache, occluder_root)
            enrolled: set[str] = set()
            done = 0
            for k in ks:
                for person in gallery[done:k]:  # grow the gallery to k people
                    first = person.photos[0]
                    r = client.post(
                        "/gallery",
                        data={"subject": f"p{done:05d}", "name": person.name, "aligned": "true"},
                        files=[("images", (Path(first).name, probe(first, 0, "clean"), "image/jpeg"))],
                    )
                    if r.status_code == 201:
                        enrolled.add(person.name)
                    done += 1
                info = client.get("/info").json()
                thresholds = {name: row["threshold"] for name, row in info["identify_presets"].items()}
                # every person with a second photo is a mated probe, also one whose enrolment failed (a miss, as
                # NIST counts a failure to enrol); the occluder of a probe follows its gallery position
                mated = [(p, i) for i, p in enumerate(gallery[:k]) if len(p.photos) >= 2]
                row: dict[str, Any] = {
                    "gallery_people": k,
                    "enrolled_faces": info["gallery_faces"],
                    "mated_probes": len(mated),
                    "strangers": len(outsiders),
                    "not_enrolled": k - sum(1 for p in gallery[:k] if p.name in enrolled),
                    "thresholds": thresholds,
                }
                for view in views:
                    s_best = np.array([_best(client, probe(p.photos[0], i, view))[1] for i, p in enumerate(outsiders)])
                    m = [_best(client, probe(p.photos[1], i, view)) for p, i in mated]
                    m_best = np.array([score for _, score in m])
                    m_right = np.array([name == p.name for (name, _), (p, _) in zip(m, mated, strict=True)], dtype=bool)
                    presets = {
                        name: {
                            "fpir_target": target,
                            "fpir": float(np.mean(s_best > thresholds[name])),
                            "false_positives": int(np.sum(s_best > thresholds[name])),
                            "dir": float(np.mean(m_right & (m_best > thresholds[name]))) if len(m) else None,
                        }
                        for name, target in IDENTIFY_PRESETS.items()
                    }
                    measured = {str(f): _dir_at_measured_fpir(s_best, m_best, m_right, f) for f in (0.1, 0.01)}
                    row[view] = {"presets": presets, "dir_at_fpir": measured, "rank1": float(np.mean(m_right))}
                    logger.info("open set K=%d %s: %s", k, view, json.dumps(row[view]))
                report["sizes"].append(row)
    if peer is not None:
        report["peer"] = _peer_rows(peer, gallery, outsiders, ks, views, probe)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def ran_on(info: dict[str, Any], lfw_cache: Path, occluder_root: Path | None) -> dict[str, Any]:
    """Where and on what a report was measured: the CPU, the path that served (``/info``: device, engine and
    precision, how the index keeps its maps) and digests of the LFW cache (its manifest, and its crops alone:
    the manifest names absolute source paths) and of the occluder templates. Served scores move with the
    CPU's kernels and with the aligned crops, so a recorded table that a later run does not reproduce can be
    traced to what differs rather than guessed at."""
    from datetime import UTC, datetime

    from model.cpu import cpu_description
    from model.digests import file_sha256, tree_sha256

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpu": cpu_description(),
        "device": info["device"],
        "served": info["backbone_path"]["served"],
        "map_storage": info["gallery_search"]["map_storage"],
        "lfw_manifest_sha256": file_sha256(lfw_cache / "manifest.jsonl"),  # landmarks, and absolute source paths
        "lfw_crops_sha256": tree_sha256(lfw_cache, skip=frozenset({"manifest.jsonl"})),  # the crops alone
        "occluders_sha256": tree_sha256(occluder_root) if occluder_root is not None else None,
    }


def _best(client: Any, data: bytes) -> tuple[str | None, float]:
    """The best candidate's name and fused score for one aligned probe (``/identify``, top 1)."""
    r = client.post("/identify", data={"aligned": "true", "top_k": "1"}, files={"image": ("p.png", data)})
    found = r.json()["candidates"] if r.status_code == 200 else []
    return (found[0]["name"], found[0]["score"]) if found else (None, -np.inf)


def _peer_rows(
    peer: Any,
    gallery: list[_Person],
    outsiders: list[_Person],
    sizes: tuple[int, ...],
    views: tuple[str, ...],
    probe: Callable[[str, int, str], bytes],
) -> list[dict[str, Any]]:
    """The SFace peer on the same people and crops: cosine, exact search over every enrolled face."""
    import io

    from PIL import Image

    def embed(blobs: list[bytes]) -> np.ndarray:
        return np.asarray(peer.embed(np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])))

    g = embed([probe(p.photos[0], 0, "clean") for p in gallery[: max(sizes)]])
    strangers = {v: embed([probe(p.photos[0], i, v) for i, p in enumerate(outsiders)]) for v in views}
    multi = [(p, i) for i, p in enumerate(gallery) if len(p.photos) >= 2]
    rows = []
    for k in sizes:
        row: dict[str, Any] = {"gallery_people": k}
        mated = [(p, i) for p, i in multi if i < k]
        for v in views:
            m_emb = embed([probe(p.photos[1], i, v) for p, i in mated])
            s_best = (strangers[v] @ g[:k].T).max(1)
            sims = m_emb @ g[:k].T
            m_best, m_right = sims.max(1), sims.argmax(1) == np.array([i for _, i in mated])
            row[v] = {
                "dir_at_fpir": {str(f): _dir_at_measured_fpir(s_best, m_best, m_right, f) for f in (0.1, 0.01)},
                "rank1": float(np.mean(m_right)),
            }
        rows.append(row)
    return rows


def markdown_open_set(report: dict[str, Any]) -> str:
    """The report as the model card's table: per gallery size and view, FPIR and DIR at each preset, and DIR at
    a measured FPIR for OAML and the peer."""
    from model.openset import IDENTIFY_PRESETS

    peer = {r["gallery_people"]: r for r in report.get("peer", [])}
    measured_at = ("0.1", "0.01")  # the header's order: a report read back from metadata has its keys sorted
    lines = [
        "| gallery | probes | preset: FPIR measured (target), DIR | DIR @ FPIR 0.1 / 0.01 "
        "| SFace DIR @ FPIR 0.1 / 0.01 | rank-1 (OAML / SFace) |",
        "|---|---|---|---|---|---|",
    ]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    for row in report["sizes"]:
        for view in ("clean", "occluded"):
            if view not in row:
                continue
            r = row[view]
            presets = "; ".join(
                f"{n}: {pct(p['fpir'])} ({p['fpir_target']:g}), {pct(p['dir'])}"
                for n in [*IDENTIFY_PRESETS, *sorted(set(r["presets"]) - set(IDENTIFY_PRESETS))]
                if (p := r["presets"].get(n))
            )
            ours = " / ".join(pct(r["dir_at_fpir"].get(f)) for f in measured_at)
            theirs = peer.get(row["gallery_people"], {}).get(view)
            peer_dir = " / ".join(pct(theirs["dir_at_fpir"].get(f)) for f in measured_at) if theirs else "n/a"
            rank1 = f"{pct(r['rank1'])} / {pct(theirs['rank1']) if theirs else 'n/a'}"
            lines.append(
                f"| {row['gallery_people']:,} ({view}) | {row['mated_probes']} mated, {row['strangers']} strangers "
                f"| {presets} | {ours} | {peer_dir} | {rank1} |"
            )
    where = report.get("ran_on")
    if where:  # reports recorded before 2026-12-07 do not say
        occluders = where["occluders_sha256"][:12] if where["occluders_sha256"] else "none"
        crops = f", crops {where['lfw_crops_sha256'][:12]}" if where.get("lfw_crops_sha256") else ""  # since 12-07
        lines += [
            "",
            f"Measured {where['date']} on {where['cpu']}: backbone {where['served']} on {where['device']}, "
            f"{where['map_storage']} maps; LFW manifest {where['lfw_manifest_sha256'][:12]}{crops}, "
            f"occluders {occluders}.",
        ]
    return "\n".join(lines)
