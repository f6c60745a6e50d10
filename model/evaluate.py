"""``oaml eval``: LFW 6000 pairs (10 official folds), clean and with one side synthetically occluded.

Every protocol reports three rows for the model (AdaFace cosine only, QAConv only, fused) and, with
``--peer sface``, the SFace peer measured on exactly the same aligned crops (same detector, same
alignment, same occluded pixels). Metrics: accuracy with the threshold chosen on the other nine
folds, AUC, TAR at FAR 1e-2 and 1e-3; plus the occlusion head's mean visibility on clean faces
and on the occluded cells of occluded faces (cells whose true visible fraction is below 0.5).

Occluded protocols: the second image of every pair gets an occluder instance reserved for
evaluation (:data:`model.occlusion.EVAL_MASKS`, :data:`model.occlusion.EVAL_SUNGLASSES`), seeded by
the pair's index.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.align import ARCFACE_TEMPLATE, load_image, to_input_tensor
from model.calibration import DEFAULT_CALIBRATION, Calibration
from model.metrics import roc_curve, verification_report
from model.net import OAMLNet
from model.occlusion import (
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
    "Embeddings",
    "embed_crops",
    "pair_qaconv",
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


@dataclass
class Embeddings:
    embedding: torch.Tensor  # [N, 512], flip-fused
    occlusion: torch.Tensor  # [N, 1, 7, 7]
    feature_map: torch.Tensor  # [N, C, 7, 7]


@torch.no_grad()
def embed_crops(model: OAMLNet, crops: np.ndarray, batch_size: int = 32, flip: bool = True, precision: str = "fp32") -> Embeddings:
    """Embeddings (flip-fused by adding norm-weighted vectors, as AdaFace evaluates), maps of the unflipped crop."""
    model.eval()
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    embs, occs, maps = [], [], []
    for start in range(0, len(crops), batch_size):
        x = to_input_tensor(crops[start : start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.forward_all(x)
            vec = out.embedding * out.norm
            if flip:
                flipped = model.forward_all(torch.flip(x, dims=[3]))
                vec = vec + flipped.embedding * flipped.norm
        embs.append(torch.nn.functional.normalize(vec.float(), dim=1).cpu())
        occs.append(out.occlusion.float().cpu())
        maps.append(out.feature_map.float().cpu())
    return Embeddings(torch.cat(embs), torch.cat(occs), torch.cat(maps))


def _lfw_crops(cache_root: Path, keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligned crops, found flags and aligned landmarks for LFW keys from an ``oaml prepare`` cache.

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


def _occluders(root: Path) -> dict[str, Occluder]:
    return {
        "mask": MaskOccluder(load_mask_templates(root / "masks", EVAL_MASKS)),
        "sunglasses": SunglassesOccluder(load_sunglasses_templates(root / "sunglasses", EVAL_SUNGLASSES)),
    }


@torch.no_grad()
def pair_qaconv(qa: Any, a: Embeddings, ia: np.ndarray, b: Embeddings, ib: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """QAConv scores of pairs ``(a[ia[k]], b[ib[k]])``, gathering maps a chunk at a time (bounded memory)."""
    out = []
    for start in range(0, len(ia), chunk):
        sa, sb = ia[start : start + chunk], ib[start : start + chunk]
        out.append(qa.match_pairs(a.feature_map[sa], b.feature_map[sb], a.occlusion[sa], b.occlusion[sb]).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _pair_visibility(occ: torch.Tensor) -> np.ndarray:
    return occ.reshape(len(occ), -1).mean(1).numpy()


def evaluate_lfw(
    model: OAMLNet,
    lfw_cache: str | Path,
    pairs_file: str | Path,
    occluder_root: str | Path | None = None,
    calibration: Calibration | None = None,
    peer: Any | None = None,
    precision: str = "fp32",
    flip: bool = True,
) -> dict[str, Any]:
    """Run the clean and (when ``occluder_root`` is given) mask and sunglasses protocols."""
    cal = calibration or DEFAULT_CALIBRATION
    pairs = read_lfw_pairs(pairs_file)
    keys = sorted({p.a for p in pairs} | {p.b for p in pairs})
    pos = {k: i for i, k in enumerate(keys)}
    started = time.perf_counter()
    crops, found, landmarks = _lfw_crops(Path(lfw_cache), keys)
    logger.info("LFW: %d images, %d without a detected face", len(keys), int((~found).sum()))
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    ia = np.array([pos[p.a] for p in pairs])
    ib = np.array([pos[p.b] for p in pairs])
    clean = embed_crops(model, crops, flip=flip, precision=precision)
    peer_clean = peer.embed(crops) if peer is not None else None
    qa = model.qaconv.eval()
    report: dict[str, Any] = {"images": len(keys), "missing_faces": int((~found).sum()), "protocols": {}}

    def rows(emb_b: Embeddings, b_index: np.ndarray, peer_b: np.ndarray | None) -> dict[str, Any]:
        cos = (clean.embedding[ia] * emb_b.embedding[b_index]).sum(1).numpy()
        qas = pair_qaconv(qa, clean, ia, emb_b, b_index)
        vis = np.minimum(_pair_visibility(clean.occlusion[ia]), _pair_visibility(emb_b.occlusion[b_index]))
        fused = cal.score(cos, qas, vis)
        valid = found[ia] & found[b_index]
        # a pair whose face was not found counts as a rejection (lowest score), as the protocol requires
        out = {}
        for name, s in (("adaface", cos), ("qaconv", qas), ("fused", fused)):
            s = np.where(valid, s, -np.inf if name != "fused" else -1e9)
            out[name] = verification_report(np.nan_to_num(s, neginf=-1e9), same, folds)
        if peer_b is not None and peer_clean is not None:
            sp = (peer_clean[ia] * peer_b[b_index]).sum(1)
            out["sface_peer"] = verification_report(np.where(valid, sp, -1e9), same, folds)
        out["_scores"] = {"adaface": cos, "qaconv": qas, "fused": fused}
        return out

    clean_rows = rows(clean, ib, peer_clean)
    report["protocols"]["clean"] = {k: v for k, v in clean_rows.items() if k != "_scores"}
    report["protocols"]["clean"]["mean_visibility"] = float(clean.occlusion[found].mean())
    scores = {"clean": clean_rows["_scores"]}

    if occluder_root is not None:
        for name, occluder in _occluders(Path(occluder_root)).items():
            occluded = np.zeros((len(pairs), 112, 112, 3), dtype=np.uint8)
            grids = np.zeros((len(pairs), 7, 7), dtype=np.float32)
            for n, b in enumerate(ib):
                img, visible = occluder(crops[b], landmarks[b], np.random.default_rng([2026, n, len(name)]))
                occluded[n], grids[n] = img, visibility_grid(visible)
            emb_b = embed_crops(model, occluded, flip=flip, precision=precision)
            peer_b = peer.embed(occluded) if peer is not None else None
            r = rows(emb_b, np.arange(len(pairs)), peer_b)
            pred = emb_b.occlusion[:, 0].numpy()
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
        pts = [xy(f, t) for f, t in zip(far, tar) if f > 0]
        colour = colours.get(protocol, (0, 0, 0))
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((left + 10, top + 10 + 14 * i), f"fused, {protocol}", fill=colour)
    img.save(path)


def markdown_report(report: dict[str, Any]) -> str:
    """The report's tables as Markdown."""
    lines = []
    for protocol, rows in report["protocols"].items():
        lines += [f"#### LFW, {protocol}", "", "| matcher | accuracy | AUC | TAR@FAR=1e-2 | TAR@FAR=1e-3 |", "|---|---|---|---|---|"]
        for name in ("adaface", "qaconv", "fused", "sface_peer"):
            if name in rows:
                r = rows[name]
                lines.append(
                    f"| {name} | {100 * r['accuracy']:.2f}% +- {100 * r['accuracy_std']:.2f} | {r['auc']:.4f} | {r['tar_far_1e-2']:.4f} | {r['tar_far_1e-3']:.4f} |"
                )
        vis = [f"mean visibility {rows['mean_visibility']:.3f}"]
        if "mean_visibility_occluded_cells" in rows:
            vis.append(
                f"on occluded cells {rows['mean_visibility_occluded_cells']:.3f} (true visible fraction "
                f"{rows.get('true_visibility_occluded_cells', float('nan')):.3f}), on visible cells {rows['mean_visibility_visible_cells']:.3f}"
            )
        lines += ["", "Occlusion head: " + "; ".join(vis) + ".", ""]
    return "\n".join(lines)


def validation_scores(
    model: OAMLNet,
    images: np.ndarray,
    labels: np.ndarray,
    landmarks: np.ndarray,
    occluder_root: str | Path | None,
    seed: int = 0,
    max_genuine: int = 20000,
    max_impostor: int = 40000,
    precision: str = "fp32",
) -> dict[str, np.ndarray]:
    """Cosine, QAConv, pair visibility and labels on held-out identities, for calibration.

    Every image is embedded clean and once occluded (a training-family occluder, seeded); half of
    the pairs compare clean with clean, half clean with occluded.
    """
    from model.occlusion import OcclusionAugmenter

    rng = np.random.default_rng([seed, 17])
    occluder = OcclusionAugmenter.from_folder(occluder_root, probability=1.0)
    occluded = np.stack([occluder.occlude(img, lm, np.random.default_rng([seed, 19, i]))[0] for i, (img, lm) in enumerate(zip(images, landmarks))])
    clean = embed_crops(model, images, precision=precision)
    occl = embed_crops(model, occluded, precision=precision)
    n = len(labels)
    genuine = np.array([(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]])
    genuine = genuine[rng.permutation(len(genuine))[:max_genuine]]
    a, b = rng.integers(0, n, (2, max_impostor * 2))
    keep = labels[a] != labels[b]
    impostor = np.stack([a[keep], b[keep]], 1)[:max_impostor]
    pairs = np.concatenate([genuine, impostor])
    same = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    use_occluded = rng.random(len(pairs)) < 0.5
    # one table holding both versions: index i is clean image i, index n + i its occluded copy
    both = Embeddings(*(torch.cat([getattr(clean, f), getattr(occl, f)]) for f in ("embedding", "occlusion", "feature_map")))
    ia, ib = pairs[:, 0], pairs[:, 1] + n * use_occluded
    cos = (both.embedding[ia] * both.embedding[ib]).sum(1).numpy()
    qa = pair_qaconv(model.qaconv.eval(), both, ia, both, ib)
    vis = np.minimum(_pair_visibility(both.occlusion[ia]), _pair_visibility(both.occlusion[ib]))
    return {"cos": cos, "qa": qa, "visibility": vis, "same": same, "occluded": use_occluded}
