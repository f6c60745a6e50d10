"""``oaml eval --suite public``: the verification benchmarks the field reports, side by side with the peer.

Sets (each a list of pairs in 10 official folds, over an aligned cache made by ``oaml prepare``):

- **LFW** (6,000 pairs): unconstrained web photos, mostly frontal; the field's baseline.
- **CFP-FP** (frontal against profile, 7,000 pairs less those touching a missing photo): pose.
- **CFP-FF** (frontal against frontal, the same people): the same photos without the pose gap, so
  FP minus FF is what a profile costs.

Each set is scored clean and **occluded**: the second photo of every pair wears an occluder reserved
for evaluation (a mask or sunglasses, chosen and drawn by a hash of the photo's name: about half
each), so every set sees both kinds. Every face is embedded once per condition on the served path
(:class:`model.embedder.Embedder`) and the SFace peer embeds exactly the same crops, occluded pixels
included. A pair whose face was not found in the cache counts as a non-match (lowest score) and the
count is reported per set: nothing is dropped silently.

Metrics per matcher (AdaFace cosine, QAConv, fused, SFace): 10-fold accuracy (threshold chosen on
the other nine folds), AUC, TAR at FAR 1e-2 and 1e-3. The report also carries the same metrics on a
fixed subset (folds 1 and 2), which ``make test-slow`` recomputes from scratch to check the card: each
photo's occluder depends on the photo alone, so a subset embeds it exactly as the whole suite did.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.calibration import DEFAULT_CALIBRATION, Calibration
from model.checkpoint import derives_from
from model.embedder import Embedder, Features, score_pairs
from model.net import OAMLNet
from model.qaconv import QAConv
from model.training.evaluate import cached_crops, evaluation_occluders, read_lfw_pairs
from model.training.metrics import verification_report
from model.training.occlusion import Occluder

__all__ = [
    "PairSet",
    "SUITE_SETS",
    "SUBSET_FOLDS",
    "lfw_set",
    "cfp_set",
    "public_sets",
    "run_suite",
    "rescore",
    "rows_of",
    "SuiteModel",
    "suite_table",
    "MATCHERS",
]

logger = logging.getLogger(__name__)

#: The matchers every set reports, in table order.
MATCHERS = ("adaface", "qaconv", "fused", "sface_peer")
#: The folds of the fixed subset the slow test recomputes.
SUBSET_FOLDS = (1, 2)
#: What each set measures (README and card).
SUITE_SETS = {
    "LFW": "unconstrained web photos, mostly frontal",
    "CFP-FP": "frontal against profile: pose",
    "CFP-FF": "frontal against frontal, the same people and photos: CFP without the pose gap",
}


@dataclass(frozen=True)
class PairSet:
    """One benchmark: pairs (indices into ``keys``) of an aligned cache, with labels and folds."""

    name: str
    cache: Path
    keys: list[str]  # "identity/stem" of every photo the pairs use
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    dropped: int = 0  # pairs the official list has and this copy cannot hold (photos missing from the source)

    def subset(self, folds: Iterable[int]) -> PairSet:
        """The pairs of ``folds`` only (the photos they use, re-indexed)."""
        keep = np.isin(self.folds, list(folds))
        used = sorted(set(self.a[keep].tolist()) | set(self.b[keep].tolist()))
        where = {old: new for new, old in enumerate(used)}
        remap = np.vectorize(where.__getitem__, otypes=[np.int64])
        return PairSet(
            self.name,
            self.cache,
            [self.keys[i] for i in used],
            remap(self.a[keep]),
            remap(self.b[keep]),
            self.same[keep],
            self.folds[keep],
            self.dropped,
        )


def _pair_set(name: str, cache: Path, pairs: Sequence[tuple[str, str, bool, int]], dropped: int = 0) -> PairSet:
    keys = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    pos = {k: i for i, k in enumerate(keys)}
    return PairSet(
        name,
        cache,
        keys,
        np.array([pos[p[0]] for p in pairs], dtype=np.int64),
        np.array([pos[p[1]] for p in pairs], dtype=np.int64),
        np.array([p[2] for p in pairs], dtype=bool),
        np.array([p[3] for p in pairs], dtype=np.int64),
        dropped,
    )


def lfw_set(cache: str | Path, pairs_file: str | Path) -> PairSet:
    """LFW's View 2 (``pairs.txt``) over an ``oaml prepare`` cache of LFW."""
    pairs = read_lfw_pairs(pairs_file)
    return _pair_set("LFW", Path(cache), [(p.a, p.b, p.same, p.fold + 1) for p in pairs])


def cfp_set(root: str | Path, protocol: str) -> PairSet:
    """CFP's official ``pairs_fp.txt`` or ``pairs_ff.txt`` (``fold<TAB>a<TAB>b<TAB>same``) over its cache."""
    root = Path(root)
    pairs, official = [], 3500 * 2  # 10 folds of 350 same and 350 different pairs
    for line in (root / f"pairs_{protocol}.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fold, a, b, same = line.split("\t")
        pairs.append((str(Path(a).with_suffix("")), str(Path(b).with_suffix("")), same.strip() == "1", int(fold)))
    return _pair_set(f"CFP-{protocol.upper()}", root, pairs, dropped=official - len(pairs))


def public_sets(lfw_cache: Path, lfw_pairs: Path, cfp_root: Path) -> list[PairSet]:
    """The public suite's sets, those whose data is there (a missing one is logged, not faked)."""
    sets = []
    if (lfw_cache / "manifest.jsonl").exists() and lfw_pairs.exists():
        sets.append(lfw_set(lfw_cache, lfw_pairs))
    else:
        logger.warning("LFW left out: no cache at %s (make prepare-data) or no %s", lfw_cache, lfw_pairs)
    for protocol in ("fp", "ff"):
        if (cfp_root / f"pairs_{protocol}.txt").exists() and (cfp_root / "manifest.jsonl").exists():
            sets.append(cfp_set(cfp_root, protocol))
        else:
            logger.warning(
                "CFP-%s left out: no aligned cache with pairs_%s.txt at %s", protocol.upper(), protocol, cfp_root
            )
    return sets


@dataclass(frozen=True)
class SuiteModel:
    """A heads-only variant scored from the same pass (``oaml eval --also``): a model with the embedder's trunk
    (:func:`model.checkpoint.derives_from`), whose features are the pass's through its heads
    (:meth:`model.embedder.Features.through`), exactly what its own pass at that precision makes. Two releases
    that differ in their heads alone are measured for the price of one."""

    name: str
    net: OAMLNet
    calibration: Calibration | None = None


@dataclass
class _Embedded:
    """One cache's photos, embedded clean and occluded (each photo once per condition, shared by its sets): the
    features of every model scored, the embedder's first."""

    keys: list[str]
    found: np.ndarray
    clean: list[Features]
    occluded: list[Features]
    peer_clean: np.ndarray | None = None
    peer_occluded: np.ndarray | None = None
    index: dict[str, int] = field(default_factory=dict)


def _embed_cache(
    cache: Path,
    keys: list[str],
    embedder: Embedder,
    occluders: dict[str, Occluder],
    peer: Any | None,
    also: Sequence[SuiteModel] = (),
) -> _Embedded:
    crops, found, landmarks = cached_crops(cache, keys)
    kinds = list(occluders.values())
    occluded = crops.copy()
    for i, key in enumerate(keys):  # each photo's own occluder and draw, whatever else is embedded with it
        if found[i]:
            tag = zlib.crc32(key.encode())
            occluded[i], _ = kinds[tag % len(kinds)](crops[i], landmarks[i], np.random.default_rng([2026, 22, tag]))
    clean, occ = embedder(crops), embedder(occluded)
    done = _Embedded(
        keys,
        found,
        [clean, *(clean.through(m.net) for m in also)],
        [occ, *(occ.through(m.net) for m in also)],
        index={k: i for i, k in enumerate(keys)},
    )
    if peer is not None:
        done.peer_clean, done.peer_occluded = peer.embed(crops), peer.embed(occluded)
    return done


def _components(pairs: PairSet, emb: _Embedded, occluded: bool, model: int, qaconv: QAConv) -> dict[str, np.ndarray]:
    """Every pair's component scores (what :func:`rows_of` fuses and measures): kept in ``pairs.npz`` beside the
    report, so that a refitted fusion is measured again without embedding a photo (:func:`rescore`)."""
    ia = np.array([emb.index[pairs.keys[i]] for i in pairs.a], dtype=np.int64)
    ib = np.array([emb.index[pairs.keys[i]] for i in pairs.b], dtype=np.int64)
    side_b = emb.occluded[model] if occluded else emb.clean[model]
    s = score_pairs(qaconv, emb.clean[model], side_b, ia, ib)
    out = {
        "adaface": s.cos,
        "qaconv": s.qa,
        "visibility": s.visibility,
        "norm": s.norm,
        "same": np.asarray(pairs.same),
        "folds": np.asarray(pairs.folds),
        "valid": emb.found[ia] & emb.found[ib],
    }
    if emb.peer_clean is not None:
        peer_b = emb.peer_occluded if occluded else emb.peer_clean
        assert peer_b is not None
        out["sface_peer"] = (emb.peer_clean[ia] * peer_b[ib]).sum(1)
    return out


def rows_of(components: dict[str, np.ndarray], cal: Calibration) -> dict[str, Any]:
    """One set and condition's metrics per matcher, the fused score by ``cal``."""
    valid, same = components["valid"].astype(bool), components["same"]
    scores = {
        "adaface": components["adaface"],
        "qaconv": components["qaconv"],
        "fused": cal.score(components["adaface"], components["qaconv"], components["visibility"], components["norm"]),
    }
    if "sface_peer" in components:
        scores["sface_peer"] = components["sface_peer"]
    out: dict[str, Any] = {"pairs": int(len(same)), "pairs_without_face": int((~valid).sum())}
    # one fold (a quick look with --folds 1) has no other folds to choose a threshold on: the best one
    folds = components["folds"] if len(np.unique(components["folds"])) > 1 else None
    for name, v in scores.items():  # a pair whose face was not found is a non-match: the lowest score
        out[name] = verification_report(np.where(valid, v, -1e9), same, folds)
    return out


def _subset_rows(components: dict[str, np.ndarray], cal: Calibration) -> dict[str, Any] | None:
    """:func:`rows_of` on the pairs of the fixed subset (:data:`SUBSET_FOLDS`), or None if it has none."""
    keep = np.isin(components["folds"], SUBSET_FOLDS)
    return rows_of({k: v[keep] for k, v in components.items()}, cal) if keep.any() else None


def run_suite(
    sets: Sequence[PairSet],
    embedder: Embedder,
    occluder_root: Path,
    calibration: Calibration | None = None,
    peer: Any | None = None,
    subset: bool = True,
    also: Sequence[SuiteModel] = (),
) -> list[dict[str, Any]]:
    """Score every set clean and occluded; one report per model, the embedder's first and then each of ``also``,
    with the metrics of the fixed subset (:data:`SUBSET_FOLDS`) as well when ``subset`` (the sets are whole).
    Each report is JSON-ready but for ``_pairs``: every pair's component scores by ``set/condition/name``
    (``oaml eval`` writes them to ``pairs.npz``; :func:`rescore`)."""
    for variant in also:
        if not derives_from(embedder.model, variant.net):
            raise ValueError(f"{variant.name} does not share the trunk of the weights evaluated: it needs its own run")
    occluders = evaluation_occluders(occluder_root)
    started = time.perf_counter()
    by_cache: dict[Path, list[str]] = {}
    for s in sets:
        by_cache.setdefault(s.cache, [])
        by_cache[s.cache] = sorted(set(by_cache[s.cache]) | set(s.keys))
    models = [(embedder.model.qaconv, calibration or DEFAULT_CALIBRATION)]
    models += [(v.net.qaconv, v.calibration or DEFAULT_CALIBRATION) for v in also]
    reports: list[dict[str, Any]] = [
        {"embedding": embedder.describe(), "sets": {}, "subset": {"folds": list(SUBSET_FOLDS)}, "_pairs": {}}
        for _ in models
    ]
    for cache, keys in by_cache.items():
        t0 = time.perf_counter()
        emb = _embed_cache(cache, keys, embedder, occluders, peer, also)
        logger.info(
            "embedded %d photos of %s (clean and occluded) in %.0fs", len(keys), cache, time.perf_counter() - t0
        )
        for s in (s for s in sets if s.cache == cache):
            missing = sorted({s.keys[i] for i in np.concatenate([s.a, s.b]) if not emb.found[emb.index[s.keys[i]]]})
            for m, (qaconv, cal) in enumerate(models):
                entry: dict[str, Any] = {
                    "measures": SUITE_SETS.get(s.name, ""),
                    "photos": len(s.keys),
                    "photos_without_face": len(missing),
                    "official_pairs_dropped": s.dropped,
                }
                subset_rows = {}
                for condition in ("clean", "occluded"):
                    kept = _components(s, emb, condition == "occluded", m, qaconv)
                    entry[condition], subset_rows[condition] = rows_of(kept, cal), _subset_rows(kept, cal)
                    reports[m]["_pairs"].update({f"{s.name}/{condition}/{k}": v for k, v in kept.items()})
                reports[m]["sets"][s.name] = entry
                if subset and subset_rows["clean"] is not None:  # the subset's rows, from the same pairs' scores
                    reports[m]["subset"][s.name] = subset_rows
                fused = {c: entry[c]["fused"]["accuracy"] for c in ("clean", "occluded")}
                logger.info("%s (model %d): %s", s.name, m, json.dumps(fused))
    for report, (_, cal) in zip(reports, models, strict=True):
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["calibration"] = "fitted" if cal.fitted else "default"
        report["occluded_protocol"] = (
            "the second photo of every pair wears an evaluation-only occluder, a mask or sunglasses (about half "
            "each), chosen and drawn by a hash of the photo's name"
        )
    return reports


def rescore(report: dict[str, Any], pairs: Mapping[str, np.ndarray], cal: Calibration) -> dict[str, Any]:
    """``report`` again with ``cal``'s fusion, from the component scores its run kept (``pairs.npz``): every set
    and the fixed subset, without embedding a photo. The components are the model's (its trunk and heads), so
    they hold for any calibration of the same model version: how a refitted fusion is measured on the suite."""
    out = copy.deepcopy({k: v for k, v in report.items() if not k.startswith("_")})
    for name, entry in out["sets"].items():
        for condition in ("clean", "occluded"):
            prefix = f"{name}/{condition}/"
            comp = {k.removeprefix(prefix): np.asarray(pairs[k]) for k in pairs if k.startswith(prefix)}
            if not comp:
                raise ValueError(f"no component scores of {name} {condition}: the run kept none")
            entry[condition] = rows_of(comp, cal)
            if name in out.get("subset", {}):
                out["subset"][name][condition] = _subset_rows(comp, cal)
    out["calibration"] = "fitted" if cal.fitted else "default"
    return out


def suite_table(report: dict[str, Any]) -> str:
    """The report as one Markdown table: a row per set and condition, a column per matcher; each cell 10-fold
    accuracy and TAR at FAR 1e-3."""
    present = [m for m in MATCHERS if any(m in e[c] for e in report["sets"].values() for c in ("clean", "occluded"))]
    title = {"adaface": "AdaFace cosine", "qaconv": "QAConv", "fused": "fused (served)", "sface_peer": "SFace peer"}
    lines = [
        "| set | condition | pairs | without a face | " + " | ".join(title[m] for m in present) + " |",
        "|---|---|---|---|" + "---|" * len(present),
    ]
    # the suite's order, not the report's (metadata is stored with sorted keys)
    order = [n for n in SUITE_SETS if n in report["sets"]] + sorted(set(report["sets"]) - set(SUITE_SETS))
    for name in order:
        entry = report["sets"][name]
        for condition in ("clean", "occluded"):
            rows = entry[condition]
            cells = [
                f"{100 * rows[m]['accuracy']:.2f}% / {rows[m]['tar_far_1e-3']:.3f}" if m in rows else "-"
                for m in present
            ]
            lines.append(
                f"| {name} | {condition} | {rows['pairs']} | {rows['pairs_without_face']} | " + " | ".join(cells) + " |"
            )
    emb = report.get("embedding", {})
    lines += [
        "",
        "Cells: accuracy over the official folds (each fold's threshold chosen on the others) / TAR at FAR 1e-3. "
        "Occluded: "
        + report.get("occluded_protocol", "")
        + f". Embedding path: {emb.get('device')}, {emb.get('precision')}, flip test "
        + ("on" if emb.get("flip") else "off")
        + f"; {report.get('seconds', 0) / 60:.0f} minutes.",
    ]
    return "\n".join(lines)
