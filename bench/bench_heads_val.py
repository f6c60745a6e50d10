"""The trained heads of ``oaml heads train`` on a larger draw of its held-out identities (bench/RESULTS.md,
"Occlusion-aware heads on the frozen backbone"): every clean view against every occluded view of another photo
of the same identity, ``--pairs`` of them drawn, and as many impostors; the fusion refitted on half the
identities and every number measured on the other half. The report's own validation has a few hundred pairs;
this one resolves a few tenths of a point.

    .venv/bin/python bench/bench_heads_val.py --cache ../oaml_runs/heads_cache --run ../oaml_runs/heads_run
    .venv/bin/python bench/bench_heads_val.py --cache ../oaml_runs/heads_cache --pca 32 64 96 128

``--forms``: the served fusion's two forms (``oaml calibrate``'s fit, :mod:`model.calibration`) side by side for
each heads, the visibility form and the quality form (which also weighs the pair's lower AdaFace feature norm), on
these one-face-occluded pairs and on as many clean pairs (two clean views of different photos), both fitted on
half the identities of the two kinds together:

    .venv/bin/python bench/bench_heads_val.py --cache ../oaml_runs/heads_cache --pca 64 --forms

``--pca``: QAConv on that many principal directions of the training views' location vectors (the recipe
``init="pca"``, steps 0: the shipped tail and occlusion head), made from the same training rows as ``oaml heads
train`` (the calibration identities left out), one row each.

``--int8``: under each heads' row, the same pairs with the second face's maps as an index with
``OAML_MAP_STORAGE=int8`` keeps them (int8, a scale per face and channel): what that storage costs.

    .venv/bin/python bench/bench_heads_val.py --cache ../oaml_runs/heads_cache --pca 64 128 --int8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.training.calibrate import fit_calibration  # noqa: E402
from model.training.heads import (  # noqa: E402
    HeadCache,
    HeadConfig,
    Heads,
    _fusion,
    calibration_labels,
    load_heads,
    pair_scores,
    train_heads,
)
from model.training.metrics import verification_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--run", type=Path, default=None, help="the folder of oaml heads train (<n>.pt)")
    parser.add_argument("--pca", type=int, nargs="*", default=[], help="principal-direction heads of these channels")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "oaml_data", help="for the calibration ids")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "oaml_ir18.safetensors")
    parser.add_argument("--pairs", type=int, default=8000, help="genuine pairs drawn (and as many impostors)")
    parser.add_argument("--forms", action="store_true", help="the fusion's visibility and quality forms compared")
    parser.add_argument(
        "--int8", action="store_true", help="also each heads' QAConv and fusion with the second face's maps in int8"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = HeadCache(args.cache)
    base, meta = load_checkpoint(args.weights)
    train, val = cache.split()
    d = cache.data
    rng = np.random.default_rng(5)
    clean, occ = val[d["view"][val] == 0], val[d["view"][val] > 0]
    ia, ib, same = _draw(d, clean, occ, args.pairs, rng)
    ba, bb = cache.batch(ia), cache.batch(ib)
    labels = d["label"][ia]
    half = np.isin(labels, np.unique(labels)[::2])
    test = ~half
    folds = np.arange(int(test.sum())) % 10

    def cell(scores: np.ndarray) -> str:
        x = verification_report(scores[test], same[test], folds)
        return f"{100 * x['accuracy']:.2f}% / {x['tar_far_1e-3']:.3f} / {x['auc']:.4f}"

    out = [
        f"{len(same) // 2} genuine pairs drawn, as many impostors; {int(test.sum())} measured",
        "",
        "| heads | QAConv | fused | cosine alone |",
        "|---|---|---|---|",
    ]
    heads = {"shipped": Heads(base, HeadConfig(channels=None)).eval()}
    if args.run is not None:
        heads.update({p.stem: load_heads(p, base) for p in sorted(args.run.glob("[0-9]*.pt"))})
    if args.pca:  # the training rows of `oaml heads train`: the weights' calibration identities left out
        train = train[~np.isin(d["label"][train], calibration_labels(cache, meta, args.data_root))]
    for k in args.pca:
        cfg = HeadConfig(channels=k, init="pca", steps=0, train_occlusion=False, tuned_occlusion=False)
        heads[f"principal directions, {k} channels"] = train_heads(cache, base, cfg, train)[0]
    for n, (name, h) in enumerate(heads.items()):
        cos, qa, vis = pair_scores(h, ba, bb)
        fused = _fusion(cos, qa, vis, same, half)
        out.append(f"| {name} | {cell(qa)} | {cell(fused)} | {cell(cos) if n == 0 else ''} |")
        if args.int8:  # the same pairs, the second face kept as an int8 index keeps it
            qa8 = pair_scores(h, ba, bb, gallery_storage="int8")[1]
            out.append(f"| {name}, int8 maps | {cell(qa8)} | {cell(_fusion(cos, qa8, vis, same, half))} | |")
    if args.forms:
        out += _forms(cache, heads, (ia, ib, same), _draw(d, clean, clean, args.pairs // 2, rng))
    sys.stdout.write("\n".join(out) + "\n")


def _draw(
    d: dict[str, np.ndarray], clean: np.ndarray, other: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` genuine pairs (a clean view against a view in ``other`` of another photo of the same identity) and as
    many impostors (against another identity's view in ``other``)."""
    genuine = [
        (r, m)
        for r in clean
        for m in other[(d["label"][other] == d["label"][r]) & (d["image"][other] != d["image"][r])]
    ]
    chosen = rng.choice(len(genuine), size=min(n, len(genuine)), replace=False)
    a = [genuine[i][0] for i in chosen]
    b = [genuine[i][1] for i in chosen]
    for _ in range(len(chosen)):
        r = rng.choice(clean)
        a.append(r)
        b.append(rng.choice(other[d["label"][other] != d["label"][r]]))
    return np.array(a), np.array(b), np.repeat([1, 0], len(chosen))


def _forms(
    cache: HeadCache,
    heads: dict[str, Heads],
    occluded: tuple[np.ndarray, np.ndarray, np.ndarray],
    clean: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> list[str]:
    """The table of ``--forms``: per heads and kind of pair, the cosine alone and the two fusion forms, each fitted
    by :func:`fit_calibration` on half the identities of both kinds and measured on the other half."""
    d = cache.data
    kinds = {"one face occluded": occluded, "both clean": clean}
    out = [
        "",
        "| heads | pairs | cosine alone | visibility form (served today) | quality form |",
        "|---|---|---|---|---|",
    ]
    for name, h in heads.items():
        rows = {}
        for kind, (ia, ib, same) in kinds.items():
            cos, qa, vis = pair_scores(h, cache.batch(ia), cache.batch(ib))
            labels = d["label"][ia]
            norm = np.minimum(d["norm"][ia], d["norm"][ib]).astype(np.float64)
            rows[kind] = (cos, qa, vis, norm, same, np.isin(labels, np.unique(labels)[::2]))
        fit = [np.concatenate([r[i][r[5]] for r in rows.values()]) for i in range(5)]
        plain = fit_calibration(fit[0], fit[1], fit[2], fit[4].astype(bool))
        quality = fit_calibration(fit[0], fit[1], fit[2], fit[4].astype(bool), fit[3])
        for kind, (cos, qa, vis, norm, same, half) in rows.items():
            test = ~half

            def cell(scores: np.ndarray, test: np.ndarray = test, same: np.ndarray = same) -> str:
                x = verification_report(scores[test], same[test], np.arange(int(test.sum())) % 10)
                return f"{100 * x['accuracy']:.2f}% / {x['tar_far_1e-3']:.3f} / {x['auc']:.4f}"

            cells = [cell(cos), cell(plain.score(cos, qa, vis)), cell(quality.score(cos, qa, vis, norm))]
            out.append(f"| {name} | {kind} ({int(test.sum())}) | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    main()
