"""The occlusion-aware heads trained on a frozen backbone, on the CPU (issue #34).

The backbone's trunk stays as shipped; what is trained is what it feeds: QAConv (a learned projection of the
512-channel 7x7 map to fewer channels, its tail), and the occlusion head. Because the trunk is frozen, each
training view's trunk map is computed once and cached (:func:`build_cache`): the heads then train on cached
maps at thousands of pairs a second, so a recipe, and every ablation of it, takes minutes on two cores instead
of the hours a backbone pass per step would take.

The cache holds, per view of a training face (``views`` per face: the first clean, the others each wearing a
training-only occluder drawn on its landmarks, as the trainer's augmentation does): the trunk map (fp16
``[512, 7, 7]``), the global embedding and norm (what the cosine branch sees), the 7x7 visibility target, the
face's identity (-1 for the unlabelled caches: real masked faces, faces in every head pose), and the SFace
teacher's embedding of the same view *without* its occluder (the privileged view: what the face would say
uncovered).

What the heads learn (:class:`HeadConfig`): QAConv's pairwise BCE and batch-hard ranking on the identities,
visibility-weighted as served; and, optionally, pair-level function matching: on every pair of a batch, QAConv's
score (one or both faces occluded) is asked to rank pairs as the teacher's cosine of the two *clean* views does
(a standardised MSE between the two ``[B, B]`` matrices): what the occluded face still shares with the other,
told by a stronger model that saw it uncovered.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.align import to_input_tensor
from model.checkpoint import load_checkpoint, save_checkpoint
from model.net import OAMLNet, OcclusionHead, build_model
from model.qaconv import QAConv
from model.training.augment import AugmentConfig, FaceAugmenter
from model.training.calibrate import logistic_fit
from model.training.losses import occlusion_loss, pairwise_matching_loss, triplet_ranking_loss
from model.training.metrics import verification_report
from model.training.occlusion import OcclusionAugmenter, visibility_grid

__all__ = [
    "build_cache",
    "HeadCache",
    "HeadConfig",
    "train_heads",
    "train_occlusion_head",
    "evaluate_heads",
    "evaluate_occlusion",
    "export_heads",
]

logger = logging.getLogger(__name__)

_FIELDS = ("maps", "emb", "norm", "vis", "teacher", "label", "image", "view")


def build_cache(
    weights: str | Path,
    labelled: list[str],
    unlabelled: list[str],
    out: str | Path,
    occluders: str | Path,
    views: int = 4,
    seed: int = 0,
    batch: int = 64,
    exclude: set[str] | None = None,
    chunk: int = 2048,
    max_views: int | None = None,
) -> Path:
    """Write the head-training cache of ``weights``' frozen trunk to ``out`` (resumable: finished chunks are
    kept; each chunk's views are a function of the seed and their index). ``max_views`` caps the labelled
    views (the first images in the sets' order: a cache that fits a CPU afternoon)."""
    from model.training.teacher import SFaceTorch
    from model.training.train import load_training_data

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_checkpoint(weights)
    model.eval()
    teacher = SFaceTorch.load(None).eval()
    augmenter = FaceAugmenter(AugmentConfig(occlusion=1.0), OcclusionAugmenter.from_folder(occluders, probability=1.0))
    clean = FaceAugmenter(AugmentConfig(occlusion=0.0), None)
    sets = [("labelled", load_training_data(labelled, exclude), views)]
    if unlabelled:
        sets.append(("unlabelled", load_training_data(unlabelled), 1))
    manifest: dict[str, Any] = {
        "weights": meta["model_version"],
        "views": views,
        "seed": seed,
        "max_views": max_views,
        "parts": [],
    }
    started = time.perf_counter()
    for kind, data, n_views in sets:
        rows = [(i, v) for i in range(len(data.images)) for v in range(n_views)]
        if kind == "labelled" and max_views is not None:
            rows = rows[:max_views]
        for c, start in enumerate(range(0, len(rows), chunk)):
            part = out / f"{kind}-{c:04d}.npz"
            manifest["parts"].append(part.name)
            if part.exists():
                continue
            fields: dict[str, list[Any]] = {k: [] for k in _FIELDS}
            todo = rows[start : start + chunk]
            for b in range(0, len(todo), batch):
                views_b, teach_b = [], []
                for i, v in todo[b : b + batch]:
                    rng = np.random.default_rng([seed, i, v, 0 if kind == "labelled" else 1])
                    aug = (augmenter if v > 0 else clean)(data.images[i], data.landmarks[i], rng, teacher_view=True)
                    assert aug.teacher_image is not None  # asked for
                    views_b.append(aug.image)
                    teach_b.append(aug.teacher_image)
                    fields["vis"].append(visibility_grid(aug.visible).reshape(-1).astype(np.float16))
                    fields["label"].append(np.int32(data.labels[i] if kind == "labelled" else -1))
                    fields["image"].append(np.int32(i if kind == "labelled" else -1 - i))
                    fields["view"].append(np.int8(v))
                with torch.inference_mode():
                    x = to_input_tensor(np.stack(views_b))
                    trunk = model.forward_features(x)
                    emb, norm = model.forward_head(trunk)
                    t = teacher(torch.from_numpy(np.stack(teach_b)).permute(0, 3, 1, 2).float())
                fields["maps"].append(trunk.half().numpy())
                fields["emb"].append(emb.half().numpy())
                fields["norm"].append(norm.reshape(-1).float().numpy())
                fields["teacher"].append(t.half().numpy())
            arrays: dict[str, Any] = {
                k: np.concatenate(v) if k in ("maps", "emb", "norm", "teacher") else np.stack(v)
                for k, v in fields.items()
            }
            np.savez(part.with_suffix(".tmp.npz"), **arrays)
            part.with_suffix(".tmp.npz").replace(part)
            logger.info("head cache %s: %d views (%.0f s so far)", part.name, len(todo), time.perf_counter() - started)
    (out / "cache.json").write_text(json.dumps(manifest, indent=2))
    return out


class HeadCache:
    """The cached views, in memory (fp16 maps: 50 KB a view)."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.manifest = json.loads((folder / "cache.json").read_text())
        parts = [np.load(folder / name) for name in self.manifest["parts"]]
        self.data = {k: np.concatenate([p[k] for p in parts]) for k in _FIELDS}
        self.labelled = np.flatnonzero(self.data["label"] >= 0)
        self.unlabelled = np.flatnonzero(self.data["label"] < 0)

    def __len__(self) -> int:
        return len(self.data["label"])

    def split(self, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) of the labelled views, disjoint by identity."""
        labels = self.data["label"]
        ids = np.unique(labels[self.labelled])
        held = set(np.random.default_rng(seed).permutation(ids)[: max(1, int(len(ids) * fraction))].tolist())
        val = np.array([r for r in self.labelled if labels[r] in held])
        train = np.array([r for r in self.labelled if labels[r] not in held])
        return train, val

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        d = self.data
        return {
            "maps": torch.from_numpy(d["maps"][rows].astype(np.float32)),
            "emb": torch.from_numpy(d["emb"][rows].astype(np.float32)),
            "vis": torch.from_numpy(d["vis"][rows].astype(np.float32)).reshape(-1, 1, 7, 7),
            "teacher": torch.from_numpy(d["teacher"][rows].astype(np.float32)),
            "label": torch.from_numpy(d["label"][rows].astype(np.int64)),
        }


@dataclass
class HeadConfig:
    """One head recipe (and each ablation is one of these)."""

    channels: int | None = 64  # QAConv's projected channels; None: the trunk's 512, no projection
    steps: int = 3000
    p: int = 16
    k: int = 4
    unlabelled_per_batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    w_pair: float = 1.0
    w_triplet: float = 1.0
    triplet_margin: float = 1.0
    w_distill: float = 1.0  # pair-level function matching against the teacher's clean-view cosines
    w_occlusion: float = 1.0
    train_occlusion: bool = True
    occlusion_method: str = "scaling"
    seed: int = 0
    log_every: int = 100
    #: how the projection starts: ``"random"`` (orthogonal) or ``"pca"``: the principal directions of the
    #: training views' location vectors (:func:`pca_projection`), with the shipped QAConv's tail; with
    #: ``steps=0`` nothing is learnt from identity labels
    init: str = "random"
    pca_views: int = 3000
    #: QAConv weighted by the occlusion head tuned once for all recipes (else the weights' own head)
    tuned_occlusion: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Heads(nn.Module):
    """What is trained: QAConv's projection and tail, and the occlusion head (initialised from the weights')."""

    def __init__(self, base: OAMLNet, cfg: HeadConfig) -> None:
        super().__init__()
        channels = base.feature_channels
        self.proj: nn.Sequential | None = None
        if cfg.channels is not None:
            self.proj = nn.Sequential(
                nn.Conv2d(channels, cfg.channels, kernel_size=1, bias=False), nn.BatchNorm2d(cfg.channels)
            )
            conv = self.proj[0]
            assert isinstance(conv, nn.Conv2d)
            nn.init.orthogonal_(conv.weight)
        self.qaconv = QAConv(cfg.channels or channels, 7, 7, occlusion_method=cfg.occlusion_method)
        if cfg.channels is None:
            self.qaconv.load_state_dict(base.qaconv.state_dict())
        self.occlusion = OcclusionHead(channels, base.occlusion_head.conv1.out_channels)
        self.occlusion.load_state_dict(base.occlusion_head.state_dict())

    def local(self, maps: torch.Tensor) -> torch.Tensor:
        return maps if self.proj is None else self.proj(maps)


@torch.no_grad()
def pca_projection(maps: torch.Tensor, channels: int, chunk: int = 256) -> torch.Tensor:
    """The ``channels`` principal directions ``[channels, C]`` of the location vectors of ``maps`` ``[N, C, H, W]``,
    each L2-normalised first and not centred: QAConv compares locations by their cosine, and the directions that
    keep most of the unit vectors' second moment keep most of those cosines. Unsupervised: on a frozen trunk a
    learned projection fits the few hundred identities it is trained on (bench/RESULTS.md), these cannot."""
    c = maps.shape[1]
    if not 0 < channels <= c:
        raise ValueError(f"channels must be in 1..{c}, got {channels}")
    moment = torch.zeros(c, c, dtype=torch.float64)
    count = 0
    for s in range(0, len(maps), chunk):
        x = maps[s : s + chunk].float()
        x = F.normalize(x.permute(0, 2, 3, 1).reshape(-1, c), dim=1).double()
        moment += x.T @ x
        count += len(x)
    _, vectors = torch.linalg.eigh(moment / max(count, 1))  # ascending eigenvalues
    return vectors.flip(1)[:, :channels].T.float().contiguous()


def set_projection(proj: nn.Sequential, directions: torch.Tensor) -> None:
    """A projection (1x1 convolution, BatchNorm) that is exactly ``directions @ x`` at each location in eval mode."""
    conv, bn = proj[0], proj[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():
        conv.weight.copy_(directions.reshape(conv.weight.shape))
        bn.reset_parameters()
        assert bn.running_var is not None
        bn.running_var.fill_(1.0 - bn.eps)


def _sample(cache: HeadCache, rows: np.ndarray, cfg: HeadConfig, rng: np.random.Generator) -> np.ndarray:
    """A PK batch of views (P identities, K views each: clean and occluded alike) and unlabelled views."""
    labels = cache.data["label"][rows]
    by_label: dict[int, np.ndarray] = getattr(_sample, "_cache", {}).get(id(rows)) or {}
    if not by_label:
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        by_label = {int(labels[g[0]]): rows[g] for g in np.split(order, bounds)}
        _sample._cache = {id(rows): by_label}  # type: ignore[attr-defined]
    ids = [i for i, r in by_label.items() if len(r) >= 2]
    chosen = rng.choice(ids, size=cfg.p, replace=False)
    picked = [rng.choice(by_label[i], size=cfg.k, replace=len(by_label[i]) < cfg.k) for i in chosen]
    batch = np.concatenate(picked)
    if cfg.unlabelled_per_batch and len(cache.unlabelled):
        batch = np.concatenate([batch, rng.choice(cache.unlabelled, size=cfg.unlabelled_per_batch, replace=False)])
    return batch


def _standardised(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = x[mask]
    return (x - values.mean()) / values.std().clamp_min(1e-6)


def train_occlusion_head(
    cache: HeadCache, base: OAMLNet, train_rows: np.ndarray, steps: int = 600, batch: int = 64, lr: float = 1e-3
) -> tuple[OcclusionHead, list[dict[str, float]]]:
    """Fine-tune the weights' occlusion head on the cached views' visibility targets, alone: its input is the
    frozen trunk map and its loss its own, so it needs no pairs, and every QAConv recipe then trains on the same
    tuned head (frozen), which keeps each recipe's 3x3 convolution backward pass out of the ablation's cost."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = OcclusionHead(base.feature_channels, base.occlusion_head.conv1.out_channels)
    head.load_state_dict(base.occlusion_head.state_dict())
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    curve: list[dict[str, float]] = []
    running: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        head.train()
        b = cache.batch(rng.choice(train_rows, size=batch, replace=False))
        loss = occlusion_loss(head(b["maps"]), b["vis"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "occlusion": round(float(np.mean(running)), 5)})
            running = []
            logger.info("occlusion head %s", json.dumps(curve[-1]))
    return head.eval(), curve


@torch.no_grad()
def evaluate_occlusion(cache: HeadCache, head: OcclusionHead, rows: np.ndarray) -> dict[str, float]:
    """The head's visibility on held-out views against the drawn occluders' targets: mean absolute error, and
    cell accuracy at 0.5 (hidden or not), on the occluded views and on the clean ones."""
    out: dict[str, float] = {}
    views = cache.data["view"][rows]
    for name, part in (("occluded", rows[views > 0]), ("clean", rows[views == 0])):
        errors, right, cells = 0.0, 0, 0
        for s in range(0, len(part), 512):
            b = cache.batch(part[s : s + 512])
            pred = head(b["maps"]).reshape(b["vis"].shape)
            errors += float((pred - b["vis"]).abs().sum())
            right += int(((pred > 0.5) == (b["vis"] > 0.5)).sum())
            cells += b["vis"].numel()
        out[f"{name}_mae"] = round(errors / max(cells, 1), 4)
        out[f"{name}_cell_accuracy"] = round(right / max(cells, 1), 4)
    return out


def train_heads(
    cache: HeadCache,
    base: OAMLNet,
    cfg: HeadConfig,
    train_rows: np.ndarray,
    occlusion: OcclusionHead | None = None,
) -> tuple[Heads, list[dict[str, float]]]:
    """Train the heads on cached views; returns them (eval mode) and the loss curve (every ``log_every``).
    ``occlusion``: an occlusion head to start from (frozen unless ``cfg.train_occlusion``) instead of the
    weights' own."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    heads = Heads(base, cfg)
    if occlusion is not None:
        heads.occlusion.load_state_dict(occlusion.state_dict())
    if cfg.init == "pca":
        if heads.proj is None:
            raise ValueError("init='pca' needs a projection (channels)")
        views = np.concatenate([train_rows, cache.unlabelled])
        picked = np.sort(rng.choice(views, size=min(cfg.pca_views, len(views)), replace=False))
        set_projection(
            heads.proj, pca_projection(torch.from_numpy(cache.data["maps"][picked]), heads.qaconv.num_features)
        )
        heads.qaconv.load_state_dict(base.qaconv.state_dict())  # the tail reads 2 x 49 maxima, whatever the channels
    params = [
        p
        for n, p in heads.named_parameters()
        if p.requires_grad and (cfg.train_occlusion or not n.startswith("occlusion."))
    ]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict[str, float]] = []
    running: dict[str, list[float]] = {}
    started = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        heads.train()
        b = cache.batch(_sample(cache, train_rows, cfg, rng))
        labelled = b["label"] >= 0
        vis_pred = heads.occlusion(b["maps"])
        vis = vis_pred.detach()  # QAConv weights by the predicted visibility, as served (never shaping the head)
        local = heads.local(b["maps"])
        scores = heads.qaconv(local, local, vis, vis)
        losses: dict[str, torch.Tensor] = {}
        lab = b["label"][labelled]
        s_lab = scores[labelled][:, labelled]
        losses["pair"] = cfg.w_pair * pairwise_matching_loss(s_lab, lab)
        losses["triplet"] = cfg.w_triplet * triplet_ranking_loss(s_lab, lab, cfg.triplet_margin)
        if cfg.w_distill:
            t = F.normalize(b["teacher"], dim=1)
            target = t @ t.T
            off = ~torch.eye(len(scores), dtype=torch.bool)
            losses["distill"] = cfg.w_distill * F.mse_loss(
                _standardised(scores, off)[off], _standardised(target, off)[off]
            )
        if cfg.train_occlusion and cfg.w_occlusion:
            losses["occlusion"] = cfg.w_occlusion * occlusion_loss(vis_pred[labelled], b["vis"][labelled])
        total = torch.stack(list(losses.values())).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        for k, v in {**losses, "total": total}.items():
            running.setdefault(k, []).append(float(v.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "lr": lr, "seconds": round(time.perf_counter() - started, 1)}
            row.update({k: round(float(np.mean(v)), 5) for k, v in running.items()})
            curve.append(row)
            running = {}
            logger.info("heads %s", json.dumps(row))
    heads.eval()
    return heads, curve


def _pairs(cache: HeadCache, rows: np.ndarray, seed: int, n: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out pairs: genuine (a clean view against an occluded view of another photo of the same identity) and
    impostors (a clean view against an occluded view of another identity): the 'one face occluded' protocol."""
    rng = np.random.default_rng(seed)
    d = cache.data
    clean = rows[d["view"][rows] == 0]
    occluded = rows[d["view"][rows] > 0]
    by_label: dict[int, list[int]] = {}
    for r in occluded:
        by_label.setdefault(int(d["label"][r]), []).append(int(r))
    a: list[int] = []
    b: list[int] = []
    same: list[int] = []

    def add(x: int, y: int, genuine: int) -> None:
        a.append(x)
        b.append(y)
        same.append(genuine)

    for r in rng.permutation(clean):
        mates = [x for x in by_label.get(int(d["label"][r]), []) if d["image"][x] != d["image"][r]]
        if mates and len(a) < 2 * n and sum(same) < n:
            add(int(r), int(rng.choice(mates)), 1)
        others = occluded[d["label"][occluded] != d["label"][r]]
        if len(a) < 2 * n and len(same) - sum(same) < n:
            add(int(r), int(rng.choice(others)), 0)
    return np.array(a), np.array(b), np.array(same)


@torch.no_grad()
def pair_scores(
    heads: Heads, ba: dict[str, torch.Tensor], bb: dict[str, torch.Tensor], gallery_storage: str = "native"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair's (cosine, QAConv score, lower mean visibility) from two :meth:`HeadCache.batch` of the same
    length, as the service scores a pair (QAConv weighted by the heads' predicted visibility); the second face's
    maps kept as ``gallery_storage`` says (:meth:`model.qaconv.QAConv.match_pairs`)."""
    cos = (F.normalize(ba["emb"], dim=1) * F.normalize(bb["emb"], dim=1)).sum(1).numpy()
    va, vb = heads.occlusion(ba["maps"]), heads.occlusion(bb["maps"])
    qa = torch.cat(
        [
            heads.qaconv.match_pairs(
                heads.local(ba["maps"][s : s + 256]),
                heads.local(bb["maps"][s : s + 256]),
                va[s : s + 256],
                vb[s : s + 256],
                gallery_storage=gallery_storage,
            )
            for s in range(0, len(cos), 256)
        ]
    ).numpy()
    vis = torch.minimum(va.reshape(len(cos), -1).mean(1), vb.reshape(len(cos), -1).mean(1)).numpy()
    return cos, qa, vis


@torch.no_grad()
def evaluate_heads(cache: HeadCache, heads: Heads, rows: np.ndarray, seed: int = 1) -> dict[str, Any]:
    """Accuracy (10-fold best threshold) and TAR at FAR 1e-2/1e-3 of the cosine, QAConv and their fusion (a
    logistic regression on cosine, QAConv and the pair's visibility with its interactions, fitted on half the
    identities and measured on the other half) on held-out one-face-occluded pairs."""
    a, b, same = _pairs(cache, rows, seed)
    cos, qa, vis = pair_scores(heads, cache.batch(a), cache.batch(b))
    labels = cache.data["label"][a]
    half = np.isin(labels, np.unique(labels)[::2])
    fused = _fusion(cos, qa, vis, same, half)
    out: dict[str, Any] = {"pairs": int(len(a)), "genuine": int(same.sum())}
    test = ~half  # every number on the identities the fusion was not fitted on
    folds = np.arange(int(test.sum())) % 10
    for name, s in (("cosine", cos), ("qaconv", qa), ("fused", fused)):
        report = verification_report(s[test], same[test], folds)
        out[name] = {k: round(float(v), 4) for k, v in report.items()}
    return out


def _fusion(cos: np.ndarray, qa: np.ndarray, vis: np.ndarray, same: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """The served fusion's form (:func:`model.training.calibrate.fit_calibration`: the standardised scores and
    their products with the occlusion), fitted on the ``fit`` pairs."""
    occ = 1 - vis
    x = np.stack([cos, qa, cos * occ, qa * occ], 1)
    mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-9
    w, b = logistic_fit((x[fit] - mu) / sd, same[fit].astype(np.float64))
    return np.asarray(((x - mu) / sd) @ w + b)


def export_heads(base_weights: str | Path, heads: Heads, out: str | Path, extra: dict[str, Any]) -> dict[str, Any]:
    """The base weights' backbone with the trained heads, as a new weights file (a new model version: the
    calibration and the checks must be made again for it)."""
    base, meta = load_checkpoint(base_weights)
    channels = heads.qaconv.num_features if heads.proj is not None else None
    model = build_model(base.arch, occlusion_method=heads.qaconv.occlusion_method, qaconv_channels=channels)
    state = {
        k: v for k, v in base.state_dict().items() if not k.startswith(("qaconv.", "occlusion_head.", "qaconv_proj."))
    }
    state.update({f"qaconv.{k}": v for k, v in heads.qaconv.state_dict().items()})
    state.update({f"occlusion_head.{k}": v for k, v in heads.occlusion.state_dict().items()})
    if heads.proj is not None:
        state.update({f"qaconv_proj.{k}": v for k, v in heads.proj.state_dict().items()})
    model.load_state_dict(state, strict=True)
    # what depends on the trunk alone stays true: its training, the norm's quality scale, the int8 recipe (the
    # trunk's activation ranges); the attributes' thresholds too while the occlusion head is the weights' own
    kept = ["training", "quality", "int8"]
    if all(torch.equal(v, base.occlusion_head.state_dict()[k]) for k, v in heads.occlusion.state_dict().items()):
        kept.append("attributes")
    keep: dict[str, Any] = {k: meta[k] for k in kept if k in meta}
    keep["heads_training"] = extra
    keep["base_model_version"] = meta["model_version"]
    return save_checkpoint(model.eval(), out, keep, dtype=getattr(torch, str(meta.get("dtype", "float32"))))


def config_dict(cfg: HeadConfig) -> dict[str, Any]:
    return asdict(cfg)


#: The recipe and its ablation: each row changes one thing from the one before (bench/RESULTS.md). Every row
#: but the last two weights QAConv by the same tuned occlusion head, frozen (:func:`train_occlusion_head`); the
#: last two keep the weights' own head, by which QAConv scored better (the first of them ships as
#: ``oaml_ir18_q64``; the second doubles its channels).
RECIPES: dict[str, HeadConfig] = {
    "shipped QAConv, fine-tuned (512 channels)": HeadConfig(
        channels=None, w_distill=0.0, unlabelled_per_batch=0, train_occlusion=False, steps=1000
    ),
    "projection to 64 channels": HeadConfig(
        channels=64, w_distill=0.0, unlabelled_per_batch=0, train_occlusion=False, steps=1500
    ),
    "+ privileged distillation (SFace on the clean views)": HeadConfig(
        channels=64, w_distill=1.0, unlabelled_per_batch=0, train_occlusion=False, steps=1500
    ),
    "+ unlabelled real masks and poses in the distillation": HeadConfig(
        channels=64, w_distill=1.0, unlabelled_per_batch=16, train_occlusion=False, steps=1500
    ),
    "principal directions to 64 channels, shipped tail (no labels)": HeadConfig(
        channels=64, init="pca", steps=0, train_occlusion=False
    ),
    "+ the shipped occlusion head": HeadConfig(
        channels=64, init="pca", steps=0, train_occlusion=False, tuned_occlusion=False
    ),
    "the same at 128 channels (int8 maps keep them within 8 KB a face)": HeadConfig(
        channels=128, init="pca", steps=0, train_occlusion=False, tuned_occlusion=False
    ),
}


def run_recipes(
    cache: HeadCache,
    base_weights: str | Path,
    out: str | Path,
    recipes: dict[str, HeadConfig] | None = None,
    steps: int | None = None,
    occlusion_steps: int = 600,
    data_root: str | Path | None = None,
    only: list[int] | None = None,
) -> dict[str, Any]:
    """Tune the occlusion head, then train and evaluate every recipe on it (or the recipes numbered ``only``), on
    the same split (held-out identities); write ``report.json``, the head (``occlusion.pt``) and each recipe's
    heads (``<n>.pt``, numbered as in the recipes) to ``out``; returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, meta = load_checkpoint(base_weights)
    train_rows, val_rows = cache.split()
    kept_out: list[int] = []
    if data_root is not None:  # the identities that calibrate the weights stay unseen by the heads too
        kept_out = calibration_labels(cache, meta, data_root)
        train_rows = train_rows[~np.isin(cache.data["label"][train_rows], kept_out)]
    report: dict[str, Any] = {
        "train_views": int(len(train_rows)),
        "validation_views": int(len(val_rows)),
        "identities_kept_out": len(kept_out),
        "recipes": {},
    }
    shipped = Heads(base, HeadConfig(channels=None))
    shipped.eval()
    report["shipped"] = evaluate_heads(cache, shipped, val_rows)
    report["shipped_occlusion"] = evaluate_occlusion(cache, shipped.occlusion, val_rows)
    started = time.perf_counter()
    occlusion, occlusion_curve = train_occlusion_head(cache, base, train_rows, steps=occlusion_steps)
    report["occlusion"] = {
        "steps": occlusion_steps,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "curve": occlusion_curve,
        "validation": evaluate_occlusion(cache, occlusion, val_rows),
    }
    torch.save(occlusion.state_dict(), out / "occlusion.pt")
    for n, (name, cfg) in enumerate((recipes or RECIPES).items()):
        if only is not None and n not in only:
            continue
        if steps is not None and cfg.steps:
            cfg = HeadConfig(**{**asdict(cfg), "steps": steps})
        if cfg.unlabelled_per_batch and not len(cache.unlabelled):
            cfg = HeadConfig(**{**asdict(cfg), "unlabelled_per_batch": 0})
        started = time.perf_counter()
        heads, curve = train_heads(cache, base, cfg, train_rows, occlusion if cfg.tuned_occlusion else None)
        result = evaluate_heads(cache, heads, val_rows)
        torch.save({"config": asdict(cfg), "state": heads.state_dict()}, out / f"{n}.pt")
        report["recipes"][name] = {
            "config": asdict(cfg),
            "minutes": round((time.perf_counter() - started) / 60, 1),
            "curve": curve,
            "validation": result,
            "file": f"{n}.pt",
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        logger.info("%s: %s", name, json.dumps(result))
    return report


def calibration_labels(cache: HeadCache, meta: dict[str, Any], data_root: str | Path) -> list[int]:
    """The cache's labels of the weights' own validation identities (what ``oaml calibrate`` fits the fusion and
    the presets on), so that head training can leave them out. The cache's labelled sets begin with the
    weights' training sets, in order, so their labels coincide; checked here, image by image."""
    from model.training.evaluate import _training_split

    data, _, val_idx = _training_split(meta["training"]["config"], data_root)
    rows = cache.labelled[cache.data["image"][cache.labelled] < len(data.labels)]
    if not np.array_equal(cache.data["label"][rows], data.labels[cache.data["image"][rows]]):
        raise ValueError("the cache's labelled sets do not begin with the weights' training sets, in order")
    return sorted({int(x) for x in data.labels[val_idx]})


def load_heads(path: str | Path, base: OAMLNet) -> Heads:
    saved = torch.load(path, weights_only=True)
    heads = Heads(base, HeadConfig(**saved["config"]))
    heads.load_state_dict(saved["state"])
    return heads.eval()
