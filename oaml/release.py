"""``oaml train-release RUN``: a training run's best model made a release candidate and put to the public suite.

When the run's release rule is met (``oaml train-status``: its best validation beats its initial weights' on the
same held-out people by ``release_margin``), this copies ``best.safetensors`` out of the run, calibrates it as
the shipped weights were (``oaml calibrate`` on people none of its lineage trained on, plus ``celeba_extra``),
runs the public suite on it and on the shipped weights (the same sets, crops and occluders on this machine's
embedding path, the SFace peer beside them; or reads a kept report of the shipped weights), and writes
``release.md``: the suite rows side by side and whether the candidate ships
(:func:`model.training.release.suite_verdict`). Shipping itself stays a reviewed change (docs/operations.md,
"Upgrading the weights"): the file goes into ``weights/`` under a new name with its card, and collections move
to it by a migration. On this project's 2-core CPU the calibration takes minutes and each model's suite run
about 50.

Exit status: 0 the candidate ships, 2 it does not (``release.md`` says which rule it fails), 3 the run's rule
is not met (nothing run; ``--force`` runs it anyway), 1 an error (said on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train-release",
        help="a run whose validation beat its initial weights': calibrate its best model and run the public suite on "
        "it beside the shipped weights; release.md says whether it ships (exit 0) or not (2)",
    )
    p.add_argument("run", type=Path, help="the run folder (--out of oaml train)")
    p.add_argument("--out", type=Path, default=None, help="the candidate's folder (default: RUN/release)")
    p.add_argument(
        "--shipped",
        type=Path,
        default=Path("weights/oaml_ir18.safetensors"),
        help="the weights it must beat (default: the shipped default)",
    )
    p.add_argument("--data-root", type=Path, default=Path("../oaml_data"), help="prepared caches (make prepare-data)")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="the shared data folder")
    p.add_argument(
        "--holdout",
        type=Path,
        action="append",
        default=None,
        help="aligned caches of people no model trained on, for the calibration (default: <data-root>/celeba_extra)",
    )
    p.add_argument(
        "--shipped-report",
        type=Path,
        default=None,
        help="a kept suite.json of the shipped weights from a run on this machine (oaml eval --suite public --peer "
        "sface): the suite then runs on the candidate alone, in half the time; refused for another model version, "
        "and the verdict refuses a report measured on another embedding path",
    )
    p.add_argument("--force", action="store_true", help="calibrate and run the suite although the rule is not met")
    p.set_defaults(func=run)


#: exit status when the run's release rule is not met (nothing was run)
RULE_NOT_MET = 3


def run(args: argparse.Namespace) -> int:
    from model.training.preempt import read_status
    from model.training.release import release_gate, suite_verdict
    from oaml.cli import main as oaml

    if not (args.run / "status.json").exists():
        raise SystemExit(f"{args.run / 'status.json'} not found: is {args.run} a training run's folder?")
    gate = release_gate(read_status(args.run))
    if gate is None and not args.force:
        raise SystemExit(
            f"{args.run} has no baseline on its current validation set (a run from trained weights measures one when "
            "it starts, or resumes on a changed set; see oaml train-status): --force runs the suite anyway"
        )
    rule = gate.reason if gate is not None else "no baseline to compare with (run with --force)"
    logger.info("release rule: %s", rule)
    if gate is not None and not gate.met and not args.force:
        return RULE_NOT_MET
    if not args.shipped.is_file():
        raise SystemExit(f"--shipped {args.shipped} not found")
    kept = _shipped_report(args)
    best = args.run / "best.safetensors"
    if not best.exists():
        raise SystemExit(f"{best} not found: the run has not validated yet")
    out = args.out or args.run / "release"
    out.mkdir(parents=True, exist_ok=True)
    candidate = out / "candidate.safetensors"
    shutil.copyfile(best, candidate)
    holdout = args.holdout or [args.data_root / "celeba_extra"]
    where = ["--data-root", str(args.data_root), "--shared", str(args.shared)]
    # each model its own suite run (the candidate's trunk is not the shipped one's, so `--also` would refuse);
    # the same sets, crops and occluders, on this machine's embedding path
    steps = [
        ["calibrate", str(candidate), "--data-root", str(args.data_root), "--dtype", "float16"]
        + [arg for h in holdout for arg in ("--holdout", str(h))],
        ["eval", str(candidate), "--suite", "public", "--peer", "sface", "--out", str(out / "suite"), *where],
    ]
    if kept is None:
        steps.append(
            ["eval", str(args.shipped), "--suite", "public", "--peer", "sface", "--out", str(out / "shipped"), *where]
        )
    for step in steps:
        logger.info("oaml %s", " ".join(step))
        rc = oaml(step)
        if rc:
            raise SystemExit(f"oaml {step[0]} failed ({rc}): the candidate in {out} is not released")
    theirs = kept if kept is not None else json.loads((out / "shipped" / "suite.json").read_text())
    verdict = suite_verdict(json.loads((out / "suite" / "suite.json").read_text()), theirs)
    (out / "release.md").write_text(_release_note(args, candidate, rule, verdict, kept is not None))
    logger.info("the candidate %s: %s", "ships" if verdict.ships else "does not ship", out / "release.md")
    return 0 if verdict.ships else 2


def _shipped_report(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--shipped-report``, read and checked against ``--shipped`` (None: the suite runs both models)."""
    if args.shipped_report is None:
        return None
    from model.checkpoint import read_metadata

    path = args.shipped_report / "suite.json" if args.shipped_report.is_dir() else args.shipped_report
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--shipped-report {path}: {exc}") from exc
    version = read_metadata(args.shipped)["model_version"]
    if not isinstance(report, dict) or report.get("weights", {}).get("model_version") != version:
        raise SystemExit(
            f"--shipped-report {path} is a report of {report.get('weights', {}).get('model_version')}, "
            f"not of {args.shipped} ({version})"
        )
    # the whole suite (as `oaml eval --record` takes it): every set, and the fixed subset a folds-only run lacks
    if len(report.get("sets", {})) < 3 or len(report.get("subset", {})) < 4:
        raise SystemExit(f"--shipped-report {path} is not a whole suite run (LFW, CFP-FP and CFP-FF, every fold)")
    return report


def _release_note(args: argparse.Namespace, candidate: Path, rule: str, verdict: Any, kept: bool) -> str:
    """``release.md``: what the candidate is, the run's rule, the suite rows side by side, the verdict."""
    from model.checkpoint import read_metadata
    from model.training.ledger import describe_compute

    training = read_metadata(candidate)["training"]
    lines = [
        f"# Release candidate from {args.run}",
        "",
        f"- The run's rule: {rule}",
        f"- Trained: step {training.get('global_step')}, data {', '.join(training.get('data', []))}; "
        + (
            f"{len(training['trained_identities'])} people in its lineage"
            if "trained_identities" in training
            else "its lineage not recorded (an export of older code)"
        ),
        f"- Compute: {describe_compute(training.get('compute'))}",
        f"- Against: {args.shipped}",
        "",
        "Fused (served) accuracy over the official folds, "
        + (f"the shipped weights' from the kept report {args.shipped_report}:" if kept else "both run here now:"),
        "",
        verdict.table,
        "",
        "**Ships.**" if verdict.ships else "**Does not ship:**",
    ]
    lines += [f"- {reason}" for reason in verdict.failed]
    if verdict.ships:
        lines += [
            "",
            "Next: copy candidate.safetensors into weights/ under a new name, `oaml calibrate-identify`, "
            "`oaml quantize` and `oaml check-engine`, `oaml eval --suite public --peer sface --record`, write its "
            "card, and move collections to it by a migration (docs/operations.md, Upgrading the weights).",
        ]
    return "\n".join(lines) + "\n"
