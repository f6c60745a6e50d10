"""How far any fusion of a model's components could go on the public suite: the evidence issue #34 asks for when
its target is out of reach on a frozen trunk.

For each row of a kept suite run (``oaml eval --suite public --out DIR`` keeps ``pairs.npz``), from the component
scores alone (nothing is embedded; seconds):

- the AdaFace cosine and the served fusion (the weights' own calibration), each pair's decision at its fold's
  threshold (chosen on the other folds, as the suite's accuracy is), and the fused-minus-cosine difference with
  its paired standard error (the per-pair difference of the two decisions' correctness: both scores decide the
  same pairs, so the error of the difference is far below that of either accuracy);
- two ceilings, **fitted on the evaluation row itself** (a logistic regression on the row's other folds, scored
  on the held-out fold): the served form's features (cosine, QAConv, each times the occlusion), and those plus
  the pair's lower log feature norm and its products. An upper bound of what a fusion of these components could
  reach on that very distribution, never a number a shipped model could claim (no fusion is fitted on `eval/`).

    .venv/bin/python bench/bench_fusion_ceiling.py ../oaml_runs/q64/suite_both ../oaml_runs/q64/suite_both/oaml_ir18_q64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.calibration import DEFAULT_CALIBRATION, Calibration, log_norm  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.training.calibrate import logistic_fit  # noqa: E402
from model.training.metrics import FoldResult, kfold_accuracy  # noqa: E402
from model.training.suite import SUITE_SETS  # noqa: E402


def fold_decisions(scores: np.ndarray, same: np.ndarray, folds: np.ndarray, result: FoldResult) -> np.ndarray:
    """Whether each pair is decided rightly at its fold's threshold, the one ``result`` (``kfold_accuracy`` of
    these scores) chose on the other folds: the suite's accuracy is the mean of these per fold."""
    thresholds = np.asarray(result.thresholds)[np.searchsorted(np.unique(folds), folds)]
    return (np.asarray(scores, dtype=np.float64) > thresholds) == same


def ceiling(features: np.ndarray, same: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each pair's score by a logistic regression fitted on the row's other folds (standardised there)."""
    out = np.zeros(len(same))
    for f in np.unique(folds):
        fit, test = folds != f, folds == f
        mu, sd = features[fit].mean(0), features[fit].std(0) + 1e-9
        w, b = logistic_fit((features[fit] - mu) / sd, same[fit].astype(np.float64))
        out[test] = ((features[test] - mu) / sd) @ w + b
    return out


def row(comp: dict[str, np.ndarray], cal: Calibration) -> dict[str, float]:
    """One set and condition: accuracies (%), the served fusion's gain over the cosine and its paired error."""
    valid, same, folds = comp["valid"].astype(bool), comp["same"].astype(bool), comp["folds"]
    cos, qa, vis, norm = comp["adaface"], comp["qaconv"], comp["visibility"], comp["norm"]
    served = cal.score(cos, qa, vis, norm)
    occ = 1 - vis
    zn = log_norm(norm)
    zn = (zn - zn[valid].mean()) / (zn[valid].std() + 1e-9)
    form = np.stack([cos, qa, cos * occ, qa * occ], 1)
    scores = {
        "cosine": cos,
        "fused": served,
        "ceiling": ceiling(form, same, folds),
        "ceiling_norm": ceiling(np.concatenate([form, np.stack([zn, cos * zn, qa * zn], 1)], 1), same, folds),
    }
    # a pair whose face was not found is a non-match (the lowest score), as the suite scores it
    scores = {k: np.where(valid, v, -1e9) for k, v in scores.items()}
    folded = {k: kfold_accuracy(v, same, folds) for k, v in scores.items()}
    out = {k: 100 * r.mean for k, r in folded.items()}
    fused, cosine = (fold_decisions(scores[k], same, folds, folded[k]) for k in ("fused", "cosine"))
    diff = fused.astype(float) - cosine
    out["gain"], out["gain_se"] = 100 * diff.mean(), 100 * diff.std(ddof=1) / np.sqrt(len(diff))
    return out


def table(run: Path) -> list[str]:
    """The rows of one kept run, with the calibration of the weights it names."""
    report = json.loads((run / "suite.json").read_text())
    weights = Path(report["weights"]["file"])
    _, meta = load_checkpoint(weights if weights.is_absolute() else ROOT / weights)
    if meta["model_version"] != report["weights"]["model_version"]:
        raise SystemExit(f"{weights} is no longer the model version {run} scored")
    cal = Calibration.from_dict(meta["calibration"]) if "calibration" in meta else DEFAULT_CALIBRATION
    with np.load(run / "pairs.npz") as kept:
        pairs = {k: kept[k] for k in kept.files}
    lines = []
    for name in [n for n in SUITE_SETS if n in report["sets"]]:
        for condition in ("clean", "occluded"):
            prefix = f"{name}/{condition}/"
            r = row({k.removeprefix(prefix): v for k, v in pairs.items() if k.startswith(prefix)}, cal)
            lines.append(
                f"| `{weights.stem}` | {name} | {condition} | {r['cosine']:.2f}% | {r['fused']:.2f}% | "
                f"{r['gain']:+.2f} ± {r['gain_se']:.2f} | {r['ceiling']:.2f}% ({r['ceiling'] - r['cosine']:+.2f}) | "
                f"{r['ceiling_norm']:.2f}% ({r['ceiling_norm'] - r['cosine']:+.2f}) |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="folders of `oaml eval --suite public` (pairs.npz)")
    args = parser.parse_args()
    out = [
        "| weights | set | condition | cosine | fused (served) | fused - cosine, paired SE | ceiling: served form "
        "| ceiling: + feature norm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in args.runs:
        out += table(run)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
