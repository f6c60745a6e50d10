"""``oaml eval``: LFW 6000 pairs (10 official folds), clean and with one side synthetically occluded.

Every protocol reports three rows for the model (AdaFace cosine only, QAConv only, fused) and, with
``--peer sface``, the SFace peer measured on exactly the same aligned crops (same detector, same
alignment, same occluded pixels). Metrics: accuracy with the threshold chosen on the other nine
folds, AUC, TAR at FAR 1e-2 and 1e-3; plus the occlusion head's mean visibility on clean faces
and on the occluded cells of occluded faces (cells whose true visible fraction is below 0.5).

Occluded protocols: the second image of every pair gets an occluder instance reserved for
evaluation (:data:`model.training.occlusion.EVAL_MASKS`, :data:`model.training.occlusion.EVAL_SUNGLASSES`), seeded by
the pair's index.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.align import ARCFACE_TEMPLATE, load_image
from model.calibration import DEFAULT_CALIBRATION, Calibration
from model.embedder import Embedder, Features, score_pairs
from model.training.calibrate import preset_rates, reliability
from model.training.metrics import roc_curve, verification_report
from model.training.occlusion import (
    EVAL_MASKS,
    EVAL_SUNGLASSES,
    MaskOccluder,
    Occluder,
    SunglassesOccluder,
    load_mask_templates,
    load_sunglasses_templates,
    visibility_grid,
)

__all__ = [
    "LFWPair",
    "read_lfw_pairs",
    "cached_crops",
    "evaluation_occluders",
    "evaluate_lfw",
    "validation_scores",
    "draw_roc",
    "markdown_report",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LFWPair:
    a: str  # "Name/Name_0001"
    b: str
    same: bool
    fold: int


def read_lfw_pairs(path: str | Path) -> list[LFWPair]:
    """The View-2 ``pairs.txt``: first line ``folds n``, then per fold n same and n different lines."""
    lines = Path(path).read_text().strip().splitlines()
    folds, per_fold = (int(v) for v in lines[0].split())
    pairs = []
    for i, line in enumerate(lines[1:]):
        fields = line.split()
        fold = i // (2 * per_fold)
        if len(fields) == 3:
            name, x, y = fields
            pairs.append(LFWPair(f"{name}/{name}_{int(x):04d}", f"{name}/{name}_{int(y):04d}", True, fold))
        elif len(fields) == 4:
            n1, x, n2, y = fields
            pairs.append(LFWPair(f"{n1}/{n1}_{int(x):04d}", f"{n2}/{n2}_{int(y):04d}", False, fold))
        else:
            raise ValueError(f"{path}:{i + 2}: cannot parse {line!r}")
    if len(pairs) != folds * 2 * per_fold:
        raise ValueError(f"{path}: expected {folds * 2 * per_fold} pairs, read {len(pairs)}")
    return pairs


def cached_crops(cache_root: Path, keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligned crops, found flags and aligned landmarks for ``identity/stem`` keys from an ``oaml prepare`` cache
    (LFW's, CFP's).

    A photo without a detected face gets a black crop, the template landmarks and ``found=False``.
    """
    index = {}
    for line in (cache_root / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        index[f"{rec['identity']}/{Path(rec['path']).stem}"] = rec
    crops, found = np.zeros((len(keys), 112, 112, 3), dtype=np.uint8), np.zeros(len(keys), dtype=bool)
    landmarks = np.repeat(ARCFACE_TEMPLATE[None], len(keys), axis=0)
    for i, key in enumerate(keys):
        rec = index.get(key)
        if rec is not None:
            crops[i] = load_image(cache_root / rec["path"])
            landmarks[i] = rec["aligned_landmarks"]
            found[i] = True
    return crops, found, landmarks


def evaluation_occluders(root: Path) -> dict[str, Occluder]:
    """The mask and sunglasses occluders reserved for evaluation (never used in training)."""
    return {
        "mask": MaskOccluder(load_mask_templates(root / "masks", EVAL_MASKS)),
        "sunglasses": SunglassesOccluder(load_sunglasses_templates(root / "sunglasses", EVAL_SUNGLASSES)),
    }


def evaluate_lfw(
    embedder: Embedder,
    lfw_cache: str | Path,
    pairs_file: str | Path,
    occluder_root: str | Path | None = None,
    calibration: Calibration | None = None,
    peer: Any | None = None,
) -> dict[str, Any]:
    """Run the clean and (when ``occluder_root`` is given) mask and sunglasses protocols.

    Faces are embedded by ``embedder`` (the served path: see :mod:`model.embedder`). With a fitted
    calibration, each protocol also reports the fused score's TAR and FAR at the shipped preset
    thresholds: what a user of ``/verify`` gets at each preset on LFW.
    """
    cal = calibration or DEFAULT_CALIBRATION
    pairs = read_lfw_pairs(pairs_file)
    keys = sorted({p.a for p in pairs} | {p.b for p in pairs})
    pos = {k: i for i, k in enumerate(keys)}
    started = time.perf_counter()
    crops, found, landmarks = cached_crops(Path(lfw_cache), keys)
    logger.info("LFW: %d images, %d without a detected face", len(keys), int((~found).sum()))
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    ia = np.array([pos[p.a] for p in pairs])
    ib = np.array([pos[p.b] for p in pairs])
    clean = embedder(crops)
    peer_clean = peer.embed(crops) if peer is not None else None
    qa = embedder.model.qaconv
    report: dict[str, Any] = {
        "images": len(keys),
        "missing_faces": int((~found).sum()),
        "embedding": embedder.describe(),
        "protocols": {},
    }

    def rows(emb_b: Features, b_index: np.ndarray, peer_b: np.ndarray | None) -> dict[str, Any]:
        s = score_pairs(qa, clean, emb_b, ia, b_index)
        fused = cal.score(s.cos, s.qa, s.visibility, s.norm)
        valid = found[ia] & found[b_index]
        # a pair whose face was not found counts as a rejection (lowest score), as the protocol requires
        out: dict[str, Any] = {}
        for name, v in (("adaface", s.cos), ("qaconv", s.qa), ("fused", fused)):
            out[name] = verification_report(np.where(valid, v, -1e9), same, folds)
        if peer_b is not None and peer_clean is not None:
            sp = (peer_clean[ia] * peer_b[b_index]).sum(1)
            out["sface_peer"] = verification_report(np.where(valid, sp, -1e9), same, folds)
        if cal.fitted:
            out["presets"] = preset_rates(cal, np.where(valid, fused, -np.inf), same)
            # out of the calibration's domain: how true `probability` stays on LFW (1:1 pairs)
            out["probability_ece"] = reliability(cal.probability(fused[valid]), same[valid])["ece"]
        out["_scores"] = {"adaface": s.cos, "qaconv": s.qa, "fused": fused}
        return out

    clean_rows = rows(clean, ib, peer_clean)
    report["protocols"]["clean"] = {k: v for k, v in clean_rows.items() if k != "_scores"}
    report["protocols"]["clean"]["mean_visibility"] = float(clean.occlusion[torch.from_numpy(found)].mean())
    scores = {"clean": clean_rows["_scores"]}

    if occluder_root is not None:
        for name, occluder in evaluation_occluders(Path(occluder_root)).items():
            occluded = np.zeros((len(pairs), 112, 112, 3), dtype=np.uint8)
            grids = np.zeros((len(pairs), 7, 7), dtype=np.float32)
            for n, b in enumerate(ib):
                img, visible = occluder(crops[b], landmarks[b], np.random.default_rng([2026, n, len(name)]))
                occluded[n], grids[n] = img, visibility_grid(visible)
            emb_b = embedder(occluded)
            peer_b = peer.embed(occluded) if peer is not None else None
            r = rows(emb_b, np.arange(len(pairs)), peer_b)
            pred = emb_b.occlusion.numpy()
            hidden = grids < 0.5
            r["mean_visibility"] = float(pred.mean())
            r["mean_visibility_occluded_cells"] = float(pred[hidden].mean()) if hidden.any() else float("nan")
            # semi-transparent occluders (tinted lenses) leave part of a cell visible: the target itself is not 0
            r["true_visibility_occluded_cells"] = float(grids[hidden].mean()) if hidden.any() else float("nan")
            r["mean_visibility_visible_cells"] = float(pred[~hidden].mean())
            scores[name] = r.pop("_scores")
            report["protocols"][name] = r
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["calibration"] = "fitted" if cal.fitted else "default"
    report["_scores"] = {k: {m: v.tolist() for m, v in s.items()} for k, s in scores.items()}
    report["_labels"] = same.tolist()
    return report


def draw_roc(report: dict[str, Any], path: str | Path, size: tuple[int, int] = (720, 520)) -> None:
    """ROC curves (TAR vs log FAR) of every protocol's fused score, as a PNG."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 20, w - 20, h - 50
    d.rectangle((left, top, right, bottom), outline="black")
    lo, hi = -4.0, 0.0

    def xy(far: float, tar: float) -> tuple[float, float]:
        lf = np.log10(max(far, 10**lo))
        return left + (lf - lo) / (hi - lo) * (right - left), bottom - tar * (bottom - top)

    for e in range(int(lo), int(hi) + 1):
        x, _ = xy(10.0**e, 0)
        d.line((x, bottom, x, bottom + 5), fill="black")
        d.text((x - 12, bottom + 8), f"1e{e}", fill="black")
    for t in (0.0, 0.5, 0.8, 0.9, 1.0):
        _, y = xy(1, t)
        d.line((left - 5, y, left, y), fill="black")
        d.text((left - 40, y - 6), f"{t:.1f}", fill="black")
    d.text((w // 2 - 30, h - 22), "FAR (log)", fill="black")
    colours = {"clean": (31, 119, 180), "mask": (214, 39, 40), "sunglasses": (44, 160, 44)}
    labels = np.array(report["_labels"], dtype=bool)
    for i, (protocol, s) in enumerate(report["_scores"].items()):
        far, tar, _ = roc_curve(np.array(s["fused"]), labels)
        pts = [xy(f, t) for f, t in zip(far, tar, strict=True) if f > 0]
        colour = colours.get(protocol, (0, 0, 0))
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((left + 10, top + 10 + 14 * i), f"fused, {protocol}", fill=colour)
    img.save(path)


def markdown_report(report: dict[str, Any]) -> str:
    """The report's tables as Markdown."""
    lines = []
    emb = report.get("embedding")
    if emb:
        lines += [
            f"Embedding path: {emb['device']}, {emb['precision']}, flip test {'on' if emb['flip'] else 'off'}.",
            "",
        ]
    for protocol, rows in report["protocols"].items():
        lines += [
            f"#### LFW, {protocol}",
            "",
            "| matcher | accuracy | AUC | TAR@FAR=1e-2 | TAR@FAR=1e-3 |",
            "|---|---|---|---|---|",
        ]
        for name in ("adaface", "qaconv", "fused", "sface_peer"):
            if name in rows:
                r = rows[name]
                lines.append(
                    f"| {name} | {100 * r['accuracy']:.2f}% +- {100 * r['accuracy_std']:.2f} | {r['auc']:.4f} "
                    f"| {r['tar_far_1e-2']:.4f} | {r['tar_far_1e-3']:.4f} |"
                )
        if "presets" in rows:
            lines += [
                "",
                "| preset (FAR on calibration pairs) | threshold | TAR on LFW | FAR on LFW |",
                "|---|---|---|---|",
            ]
            for name, p in rows["presets"].items():
                lines.append(
                    f"| {name} ({p['far_target']:g}) | {p['threshold']:.3f} | {p['tar']:.4f} "
                    f"| {p['far']:.4f} ({round(p['far'] * p['impostor'])} of {p['impostor']}) |"
                )
            lines += ["", f"Probability: expected calibration error on these pairs {rows['probability_ece']:.3f}."]
        vis = [f"mean visibility {rows['mean_visibility']:.3f}"]
        if "mean_visibility_occluded_cells" in rows:
            vis.append(
                f"on occluded cells {rows['mean_visibility_occluded_cells']:.3f} (true visible fraction "
                f"{rows.get('true_visibility_occluded_cells', float('nan')):.3f}), "
                f"on visible cells {rows['mean_visibility_visible_cells']:.3f}"
            )
        lines += ["", "Occlusion head: " + "; ".join(vis) + ".", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class PairSample:
    """Pairs of held-out faces for calibration: indices into ``[clean images, occluded copies]``."""

    ia: np.ndarray
    ib: np.ndarray
    same: np.ndarray
    occluded: np.ndarray  # the second face is the occluded copy
    identity_a: np.ndarray
    identity_b: np.ndarray


def held_out_views(
    images: np.ndarray, landmarks: np.ndarray, occluder_root: str | Path | None, seed: int = 0
) -> np.ndarray:
    """``[2n, 112, 112, 3]``: the clean images, then one occluded copy of each (training-family occluders, seeded)."""
    from model.training.occlusion import OcclusionAugmenter

    occluder = OcclusionAugmenter.from_folder(occluder_root, probability=1.0)
    occluded = [
        occluder.occlude(img, lm, np.random.default_rng([seed, 19, i]))[0]
        for i, (img, lm) in enumerate(zip(images, landmarks, strict=True))
    ]
    return np.concatenate([images, np.stack(occluded)]) if occluded else images


def sample_pairs(labels: np.ndarray, seed: int = 0, max_genuine: int = 20000, max_impostor: int = 40000) -> PairSample:
    """Genuine pairs (random subset of all ordered same-identity pairs) and random impostor pairs.

    Half of the pairs, at random, take the occluded copy of their second face.
    """
    rng = np.random.default_rng([seed, 17])
    n = len(labels)
    same_label = labels[:, None] == labels[None, :]
    np.fill_diagonal(same_label, False)
    genuine = np.argwhere(same_label)
    genuine = genuine[rng.permutation(len(genuine))[:max_genuine]]
    a, b = rng.integers(0, n, (2, max_impostor * 2))
    keep = labels[a] != labels[b]
    impostor = np.stack([a[keep], b[keep]], 1)[:max_impostor]
    pairs = np.concatenate([genuine, impostor])
    same = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    occluded = rng.random(len(pairs)) < 0.5
    return PairSample(pairs[:, 0], pairs[:, 1] + n * occluded, same, occluded, labels[pairs[:, 0]], labels[pairs[:, 1]])


def validation_scores(
    embedder: Embedder,
    images: np.ndarray,
    labels: np.ndarray,
    landmarks: np.ndarray,
    occluder_root: str | Path | None,
    seed: int = 0,
    max_genuine: int = 20000,
    max_impostor: int = 40000,
) -> dict[str, np.ndarray]:
    """Cosine, QAConv, pair visibility and lower norm, labels and identities of pairs of held-out faces, for
    calibration.

    Every image is embedded clean and once occluded; half of the pairs compare clean with clean,
    half clean with occluded (:func:`sample_pairs`). ``identity_a``/``identity_b`` let a caller
    split the pairs by identity (cross-validated calibration checks).
    """
    views = embedder(held_out_views(images, landmarks, occluder_root, seed))
    pairs = sample_pairs(labels, seed, max_genuine, max_impostor)
    s = score_pairs(embedder.model.qaconv, views, views, pairs.ia, pairs.ib)
    return {
        "cos": s.cos,
        "qa": s.qa,
        "visibility": s.visibility,
        "norm": s.norm,
        "same": pairs.same,
        "occluded": pairs.occluded,
        "identity_a": pairs.identity_a,
        "identity_b": pairs.identity_b,
    }


def open_set_scores(
    embedder: Embedder,
    calibration: Calibration,
    images: np.ndarray,
    labels: np.ndarray,
    landmarks: np.ndarray,
    occluder_root: str | Path | None,
    seed: int = 0,
    max_probes: int = 3000,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each stranger probe's fused scores against a gallery of other people, for the open-set model.

    The gallery holds one clean face per identity; each probe is another face (half of them occluded,
    as in :func:`sample_pairs`), scored against every gallery face *not* of its own identity: from its
    gallery's point of view, a stranger. Returns one array of impostor fused scores per probe, and each
    probe's identity (so a check can keep a person's photos on one side of a split).
    """
    rng = np.random.default_rng([seed, 29])
    order = rng.permutation(len(labels))
    gallery: dict[int, int] = {}
    for i in order.tolist():
        gallery.setdefault(int(labels[i]), i)
    g_idx = np.array(sorted(gallery.values()))
    in_gallery = set(g_idx.tolist())
    rest = np.array([i for i in order.tolist() if i not in in_gallery])[:max_probes]
    views = embedder(held_out_views(images, landmarks, occluder_root, seed))
    occluded = rng.random(len(rest)) < 0.5
    probes = torch.from_numpy(rest + len(labels) * occluded)  # the occluded copy sits n places on
    gallery_at = torch.from_numpy(g_idx)
    qaconv = embedder.model.qaconv.eval()
    device = next(qaconv.parameters()).device
    # the gallery laid out once, as the service's index does; each probe then scores against it in one GEMM
    prepared = qaconv.prepare_gallery(
        views.feature_map[gallery_at].to(device), views.occlusion[gallery_at][:, None].to(device)
    )
    cos = (views.embedding[probes] @ views.embedding[gallery_at].T).double().numpy()
    vis = torch.minimum(views.visibility[probes][:, None], views.visibility[gallery_at][None]).double().numpy()
    qa = np.concatenate(
        [
            qaconv.match(
                views.feature_map[probes[s : s + 64]].to(device),
                prepared,
                probe_occ=views.occlusion[probes[s : s + 64]][:, None].to(device),
            )
            .double()
            .cpu()
            .numpy()
            for s in range(0, len(probes), 64)
        ]
    )
    norm = torch.minimum(views.norm[probes][:, None], views.norm[gallery_at][None]).double().numpy()
    fused = calibration.score(cos, qa, vis, norm)
    rows = [fused[j][labels[g_idx] != labels[face]] for j, face in enumerate(rest.tolist())]
    return rows, labels[rest]


def _training_split(training_config: dict[str, Any], data_root: str | Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """(the weights' training data, train indices, validation indices), rebuilt from their training config and
    the caches under ``data_root``: the split training made."""
    from model.training.lineage import config_caches
    from model.training.train import TrainConfig, load_training_data, read_exclusions, split_by_identity

    cfg = TrainConfig.from_dict(training_config)
    # the identities training left out stay out here too, so the split rebuilt is the one training made
    excluded = read_exclusions(cfg.exclude_identities)
    data = load_training_data(config_caches(training_config, data_root), excluded)
    train_idx, val_idx = split_by_identity(data.labels, cfg.val_fraction, cfg.seed)
    return data, train_idx, val_idx


def training_crops(
    training_config: dict[str, Any], data_root: str | Path, count: int, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """``count`` crops drawn at random from the faces the weights trained on (never the validation split, whose
    pairs calibrate and check them), and the caches they came from."""
    data, train_idx, _ = _training_split(training_config, data_root)
    if len(train_idx) == 0:
        raise ValueError("the weights' training split is empty under this data root")
    pick = np.random.default_rng(seed).choice(train_idx, size=min(count, len(train_idx)), replace=False)
    return data.images[np.sort(pick)], sorted(set(data.sources))


def held_out_faces(
    training_config: dict[str, Any],
    data_root: str | Path,
    holdout: Sequence[str | Path] = (),
    lineage: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, landmarks) of identities a model never trained on.

    The weights' own validation split (rebuilt from their training config and the caches under
    ``data_root``) plus every ``holdout`` cache; a holdout cache the weights trained on is refused.
    With ``lineage`` (the weights' metadata), the split's people that the weights learnt from through their
    initial weights are left out too (:func:`model.training.lineage.trained_identities`): a fine-tune's split
    can hold its starting point's training people. Labels are distinct across sets.
    """
    from model.training.lineage import trained_identities, unseen
    from model.training.train import TrainConfig, load_training_data

    cfg = TrainConfig.from_dict(training_config)
    data, _, split = _training_split(training_config, data_root)
    val_idx = (
        split
        if lineage is None
        else unseen(data.identities, data.labels, split, trained_identities(lineage, data_root))
    )
    if len(val_idx) < len(split):
        logger.info(
            "held out: %d of %d validation faces left out (people the weights' initial weights trained on)",
            len(split) - len(val_idx),
            len(split),
        )
    images, labels, landmarks = data.images[val_idx], data.labels[val_idx], data.landmarks[val_idx]
    trained_on = {Path(p).name for p in cfg.train}
    for extra in holdout:
        if Path(extra).name in trained_on:
            raise ValueError(
                f"holdout {extra}: the weights were trained on {Path(extra).name!r}; "
                "calibration needs unseen identities"
            )
        more = load_training_data([extra])
        images = np.concatenate([images, more.images])
        labels = np.concatenate(
            [labels, more.labels + int(labels.max(initial=-1)) + 1]
        )  # never merges with another set
        landmarks = np.concatenate([landmarks, more.landmarks])
    return images, labels, landmarks
