"""When a training run from trained weights becomes a release candidate, and whether the candidate ships.

Two bars, in order. The cheap one, checked at every validation of the run (``oaml train-status``): the run's
best validation score beats the score of the weights it started from, measured on the same held-out people
(:mod:`model.training.validation`), by the recipe's ``release_margin``. The expensive one, run once the first is
met (``oaml train-release``): the public suite (LFW, CFP-FP, CFP-FF, clean and occluded, with the SFace peer),
on which the candidate, calibrated as the shipped weights were, must be better than the shipped weights on every
clean row (issue #32's target adds CFP-FP fused at least 75% and LFW fused at least 92.5%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TARGETS", "ReleaseGate", "SuiteVerdict", "release_gate", "suite_verdict"]


@dataclass(frozen=True)
class ReleaseGate:
    """Whether a run from trained weights has earned a run of the public suite (``oaml train-release``): its
    best validation score beats its initial weights' on the same people by ``release_margin``."""

    met: bool
    best: float
    best_step: int | None
    baseline: float
    margin: float
    reason: str


def release_gate(status: dict[str, Any]) -> ReleaseGate | None:
    """The release rule on a run's ``status.json`` (None for a run without initial weights or before its
    baseline was measured)."""
    base = status.get("baseline") or {}
    if base.get("score") is None or base.get("validation_set") != status.get("validation_set"):
        return None
    baseline, margin = float(base["score"]), float(status.get("release_margin", 0.01))
    best = status.get("best_score")
    best = float(best) if best is not None and math.isfinite(float(best)) else float("nan")
    step = status.get("best_step")
    at = f" (step {step:,})" if step is not None else ""
    if math.isnan(best):
        return ReleaseGate(False, best, step, baseline, margin, "no validation on the current set yet")
    gain = best - baseline
    met = gain >= margin
    verdict = "met: `oaml train-release` runs the public suite on best.safetensors" if met else "not yet"
    reason = (
        f"best {best:.4f}{at} against the initial weights' {baseline:.4f}: {gain:+.4f}, needs {margin:+.4f}; {verdict}"
    )
    return ReleaseGate(met, best, step, baseline, margin, reason)


#: issue #32's floor for a released backbone: fused accuracy on these clean rows of the public suite
TARGETS = {"LFW": 0.925, "CFP-FP": 0.75}


@dataclass(frozen=True)
class SuiteVerdict:
    """The candidate against the shipped weights on the public suite, row by row (fused, served accuracy)."""

    ships: bool
    table: str  # Markdown: each row, both accuracies, the change, and which rule it meets or fails
    failed: tuple[str, ...]  # the rules it fails, in words


def suite_verdict(
    candidate: dict[str, Any], shipped: dict[str, Any], targets: dict[str, float] | None = None
) -> SuiteVerdict:
    """Whether a candidate ships: fused accuracy above the shipped weights' on every clean row of the suite and
    at least ``targets`` (default :data:`TARGETS`) where set. Occluded rows are shown and not required: a
    better backbone that loses occluded accuracy is a finding for the card, not a blocked release.

    ``candidate`` and ``shipped`` are ``oaml eval --suite public`` reports (``suite.json``) of one run."""
    targets = TARGETS if targets is None else targets
    failed: list[str] = []
    if candidate.get("embedding") != shipped.get("embedding"):
        failed.append(
            f"the two reports were measured on different embedding paths ({candidate.get('embedding')} and "
            f"{shipped.get('embedding')}): run the suite on both"
        )
    rows = ["| set | condition | shipped | candidate | change | rule |", "|---|---|---|---|---|---|"]
    for name, data in candidate["sets"].items():
        theirs = shipped["sets"].get(name, {})
        for condition in ("clean", "occluded"):
            if condition not in data:
                continue
            new = float(data[condition]["fused"]["accuracy"])
            old = theirs.get(condition, {}).get("fused", {}).get("accuracy")
            rules = []
            if condition == "clean":
                if old is None:
                    failed.append(f"{name} clean: the shipped weights have no such row to compare")
                    rules.append("no shipped row: fails")
                else:
                    better = new > float(old)
                    rules.append("better than shipped" if better else "not better than shipped: fails")
                    if not better:
                        failed.append(
                            f"{name} clean: {100 * new:.2f}% is not above the shipped {100 * float(old):.2f}%"
                        )
                if name in targets:
                    meets = new >= targets[name]
                    rules.append(f"at least {100 * targets[name]:.1f}%" + ("" if meets else ": fails"))
                    if not meets:
                        failed.append(f"{name} clean: {100 * new:.2f}% is below the {100 * targets[name]:.1f}% target")
            else:
                rules.append("shown")
            shown_old = f"{100 * float(old):.2f}%" if old is not None else "-"
            change = f"{100 * (new - float(old)):+.2f}" if old is not None else "-"
            rows.append(f"| {name} | {condition} | {shown_old} | {100 * new:.2f}% | {change} | {'; '.join(rules)} |")
    for name in targets:
        if name not in candidate["sets"]:
            failed.append(f"{name}: not in the candidate's suite run")
    return SuiteVerdict(not failed, "\n".join(rows), tuple(failed))
