"""The ``oaml`` command line: one entry point, a sub-command per task (imports are lazy: ``--help`` stays fast)."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.card_tables import CardSection

__all__ = ["main"]

logger = logging.getLogger("oaml")


def _cmd_import_adaface(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import export_backbone, save_checkpoint
    from model.errors import CheckpointError
    from model.training.adaface_import import import_adaface_ckpt

    try:
        model, report = import_adaface_ckpt(args.ckpt, arch=args.arch)
    except CheckpointError as exc:  # untrusted input: one line saying why, never a traceback
        logger.error("cannot import %s: %s", args.ckpt, exc.message)
        return 2
    meta = {
        "source": {"kind": "adaface-lightning", "file": Path(args.ckpt).name},
        "untrained_heads": report.missing_heads,
        "quality": {"norm_mean": report.head_batch_mean, "norm_std": report.head_batch_std},
    }
    if args.dtype == "float32":
        written = save_checkpoint(model, args.out, meta)
    else:
        written = export_backbone(model, args.out, dtype=getattr(torch, args.dtype), metadata=meta)
    logger.info("wrote %s (%s); untrained heads: %s", args.out, written["model_version"], report.missing_heads)
    json.dump({"model_version": written["model_version"], "untrained_heads": report.missing_heads}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from model.checkpoint import read_metadata

    json.dump(read_metadata(args.weights), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from model.align import FaceDetector
    from model.training.prepare import prepare

    counts = prepare(
        args.src,
        args.dst,
        filename_identity=args.filename_identity,
        image_format=args.format,
        detector=FaceDetector(threads=args.threads),
        limit=args.limit,
    )
    json.dump(counts, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from model.training.train import TrainConfig, Trainer

    overrides = {
        "out": str(args.out) if args.out else None,
        "max_steps": args.max_steps,
        "epochs": args.epochs,
        "init_from": str(args.init_from) if args.init_from else None,
        "budget_minutes": args.budget_minutes,
        "validate_every_s": args.validate_every_s,
        "augment_workers": args.augment_workers,
        "max_samples": args.max_samples,
        "preemptible": True if args.preemptible else None,
        "offsite": str(args.offsite) if args.offsite else None,
    }
    cfg = TrainConfig.from_toml(args.config, **overrides)
    if args.data_root is not None:
        cfg = cfg.with_data_root(args.data_root)
    trainer = Trainer(cfg)
    state = trainer.fit()
    report: dict[str, Any] = {
        "global_step": state["global_step"],
        "epoch": state["epoch"],
        "best_score": state["best_score"],
    }
    if trainer.stopped_by:
        report["stopped_by"] = trainer.stopped_by
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_train_status(args: argparse.Namespace) -> int:
    from model.training.preempt import format_status, run_status

    info = run_status(args.run)
    if args.json:
        json.dump(info, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_status(info) + "\n")
    return 0


def _cmd_train_control(args: argparse.Namespace) -> int:
    from model.training.preempt import control

    line, there = control(args.run, args.action, wait_s=args.wait)
    sys.stdout.write(line + "\n")
    return 0 if there or args.action == "stop" else 1


def _cmd_bundle(args: argparse.Namespace) -> int:
    from model.training.bundle import make_bundle

    summary = make_bundle(
        args.out, args.cache, args.occluders, quality=args.quality, limit_mb=args.limit_mb, teacher=args.teacher
    )
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_gpu_bundle(args: argparse.Namespace) -> int:
    from model.training.bundle import make_gpu_bundle

    listing = make_gpu_bundle(
        args.out,
        args.config,
        args.data_root,
        quality=args.quality,
        part_mb=args.part_mb,
        init_from=args.init_from,
        reserve_s=args.reserve_s,
    )
    json.dump({k: listing[k] for k in ("caches", "bytes", "parts")}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from model.calibration import PRIOR
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.embedder import Embedder
    from model.training.calibrate import (
        cross_validated_reliability,
        draw_reliability,
        export_check,
        fit_calibration,
        preset_rates,
        reliability,
    )
    from model.training.evaluate import held_out_faces, validation_scores

    model, meta = load_checkpoint(args.weights)
    root = Path(args.data_root)
    try:
        images, labels, landmarks = held_out_faces(meta["training"]["config"], root, args.holdout, lineage=meta)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if len(images) == 0:
        raise SystemExit(
            "the weights were trained without a validation split and no --holdout was given: nothing to calibrate on"
        )
    occluders = args.occluders or (str(root / "occluders") if (root / "occluders").exists() else None)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    # the served weights are the written (rounded) ones, run as the service runs them
    served_model = copy.deepcopy(model).to(dtype).float() if dtype is not None else model
    served = Embedder(served_model, device=args.device, precision=args.precision)
    seed = int(meta["training"]["config"].get("seed", 0))
    pairs = {"seed": seed, "max_genuine": args.genuine_pairs, "max_impostor": args.impostor_pairs}
    scores = _calibration_scores(
        args, meta, pairs, served, lambda: validation_scores(served, images, labels, landmarks, occluders, **pairs)
    )
    norm = scores["norm"] if args.fusion == "quality" else None
    cal = fit_calibration(scores["cos"], scores["qa"], scores["visibility"], scores["same"], norm)
    fused = cal.score(scores["cos"], scores["qa"], scores["visibility"], norm)
    in_sample = reliability(cal.probability(fused), scores["same"])
    held_out = cross_validated_reliability(
        scores["cos"],
        scores["qa"],
        scores["visibility"],
        scores["same"],
        scores["identity_a"],
        scores["identity_b"],
        seed=seed,
        norm=norm,
    )
    n_ids = len(np.unique(labels))
    meta["calibration"] = {
        **cal.to_dict(),
        "source": f"{n_ids} identities never trained on: the weights' validation split"
        + (f" and {', '.join(Path(h).name for h in args.holdout)}" if args.holdout else ""),
        "identities": n_ids,
        "images": int(len(images)),
        "holdout": [Path(h).name for h in args.holdout],
        "pairs_sampled": pairs,
        "embedding": served.describe(),
        "prior": PRIOR,
        "presets": preset_rates(cal, fused, scores["same"]),
        "reliability": {
            "ece_in_sample": in_sample["ece"],
            "ece_cross_validated": held_out["ece"] if held_out["pairs"] else None,
            "folds": held_out["folds"],
            "bins": held_out["bins"],
        },
    }
    if args.plot:
        draw_reliability({"in sample": in_sample, "cross-validated by identity": held_out}, args.plot)
    if args.export_check:
        reference = validation_scores(
            Embedder(model, device=args.device, precision="fp32"), images, labels, landmarks, occluders, **pairs
        )
        meta["export_check"] = export_check(cal, reference, scores, {**served.describe(), "weights": args.dtype})
    else:
        meta.pop("export_check", None)
    out = args.out or args.weights
    written = save_checkpoint(
        model,
        out,
        {k: v for k, v in meta.items() if k not in ("content_sha256", "model_version", "dtype")},
        dtype=dtype,
    )
    summary = {"weights": str(out), "model_version": written["model_version"], "calibration": meta["calibration"]}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _calibration_scores(
    args: argparse.Namespace, meta: dict[str, Any], pairs: dict[str, Any], served: Any, compute: Callable[[], Any]
) -> dict[str, Any]:
    """The held-out pairs' component scores: computed (and kept in ``--scores`` when given), or read back from
    ``--scores`` when it holds this model version's scores of the same pairs on the same path, so that another
    fusion form is fitted in seconds instead of embedding every face again."""
    import numpy as np

    key = {
        "model_version": meta["model_version"],
        "pairs": pairs,
        "holdout": [str(Path(h).name) for h in args.holdout],
        "embedding": served.describe(),
        "dtype": args.dtype,
    }
    if args.scores is not None and args.scores.is_file():
        with np.load(args.scores) as kept:
            if json.loads(str(kept["key"])) == key:
                logging.getLogger(__name__).info("pair scores read back from %s", args.scores)
                return {k: kept[k] for k in kept.files if k != "key"}
        raise SystemExit(f"{args.scores} holds other scores (another model, pairs or path): remove it to recompute")
    scores: dict[str, Any] = compute()
    if args.scores is not None:
        np.savez_compressed(args.scores, key=json.dumps(key), **scores)
    return scores


def _cmd_check_engine(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_checkpoint, rewrite_metadata
    from model.cpu import cpu_description
    from model.errors import CheckpointError
    from model.training.engine_check import check_engine, markdown, with_engine_check

    model, meta = load_checkpoint(args.weights)
    torch.set_num_threads(args.threads)
    lfw_cache = args.lfw_cache or Path(args.data_root) / "lfw"
    pairs = args.pairs or args.shared / "eval" / "lfw" / "pairs.txt"
    try:
        report = check_engine(
            model, meta, args.engine, args.precision, Path(args.data_root), args.holdout, lfw_cache, pairs,
            args.occluders, args.threads, args.reference,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(str(exc)) from exc
    command = "oaml " + " ".join(sys.argv[1:]) if sys.argv[1:] else "oaml check-engine"
    sys.stdout.write(markdown(report, cpu_description(), command) + "\n")
    if args.record:
        try:
            rewrite_metadata(model, args.weights, with_engine_check(meta, report, command), "recording the check")
        except CheckpointError as exc:
            raise SystemExit(str(exc)) from exc
    return 0 if report["passes"] else 1


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_checkpoint, rewrite_metadata
    from model.errors import CheckpointError
    from model.quantize import fit_int8
    from model.training.evaluate import training_crops

    model, meta = load_checkpoint(args.weights)
    torch.set_num_threads(args.threads)
    if not (meta.get("training") or {}).get("config"):
        raise SystemExit(f"{args.weights} carries no training config: nothing says which crops it trained on")
    try:
        crops, caches = training_crops(meta["training"]["config"], args.data_root, args.crops, args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(str(exc)) from exc
    recipe = fit_int8(model, crops, alpha=args.alpha, data=caches)
    meta["int8"] = recipe.to_dict()
    checks = (meta.get("calibration") or {}).get("engine_checks")
    if checks:  # a check of another recipe no longer vouches for anything
        meta["calibration"]["engine_checks"] = [c for c in checks if c.get("precision") != "int8"]
    try:
        rewrite_metadata(model, args.weights, meta, "writing the recipe")
    except CheckpointError as exc:
        raise SystemExit(str(exc)) from exc
    logger.info(
        "int8 recipe %s: %d layers, fitted on %d training crops of %s; check it with "
        "`oaml check-engine --engine openvino --precision int8`",
        recipe.fingerprint(), len(recipe.ranges), recipe.crops, ", ".join(caches),
    )  # fmt: skip
    return 0


def _cmd_calibrate_identify(args: argparse.Namespace) -> int:
    import torch

    from model.card import WeightsCard
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.embedder import Embedder
    from model.training.calibrate import fit_open_set, open_set_check
    from model.training.evaluate import held_out_faces, open_set_scores

    model, meta = load_checkpoint(args.weights)
    card = WeightsCard.from_metadata(meta)
    if not card.calibration.fitted:
        raise SystemExit(f"{args.weights} has no fitted calibration: run `oaml calibrate` first")
    root = Path(args.data_root)
    try:
        images, labels, landmarks = held_out_faces(meta["training"]["config"], root, args.holdout, lineage=meta)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    occluders = args.occluders or (str(root / "occluders") if (root / "occluders").exists() else None)
    served = Embedder(model, device=args.device, precision=args.precision)  # the file as the service runs it
    seed = int(meta["training"]["config"].get("seed", 0))
    rows, who = open_set_scores(served, card.calibration, images, labels, landmarks, occluders, seed, args.probes)
    fitted = fit_open_set(rows, seed)
    fitted.validation = open_set_check(rows, who, seed)  # split by identity: fitted on one half, measured on the other
    fitted.validation["source"] = (
        f"{len(set(labels.tolist()))} identities never trained on (the weights' validation split"
        + (f" and {', '.join(Path(h).name for h in args.holdout)})" if args.holdout else ")")
        + ": one clean face each in the gallery, other faces (half occluded) as strangers to it"
    )
    fitted.validation["embedding"] = served.describe()
    meta["calibration"]["open_set"] = fitted.to_dict()
    out = args.out or args.weights
    written = save_checkpoint(
        model,
        out,
        {k: v for k, v in meta.items() if k not in ("content_sha256", "model_version", "dtype")},
        dtype=getattr(torch, str(meta.get("dtype", "float32"))),  # the file keeps its precision
    )
    summary = {"weights": str(out), "model_version": written["model_version"], "open_set": fitted.validation}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_calibrate_attributes(args: argparse.Namespace) -> int:
    import torch

    from model.align import FaceDetector, FacePipeline
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.embedder import Embedder
    from model.training.attributes import calibrate_attributes

    model, meta = load_checkpoint(args.weights)
    served = Embedder(model, device=args.device, precision=args.precision)
    pipeline = FacePipeline(FaceDetector(threads=2)) if args.mask_photos else None
    rules = calibrate_attributes(served, args.masked, args.clean, args.mask_photos, pipeline, args.limit)
    meta["attributes"] = {**rules.to_metadata(), "embedding": served.describe()}
    out = args.out or args.weights
    written = save_checkpoint(
        model,
        out,
        {k: v for k, v in meta.items() if k not in ("content_sha256", "model_version", "dtype")},
        dtype=getattr(torch, str(meta.get("dtype", "float32"))),
    )
    json.dump({"weights": str(out), "model_version": written["model_version"], "attributes": meta["attributes"]},
              sys.stdout, indent=2)  # fmt: skip
    sys.stdout.write("\n")
    return 0


def _record_metrics(weights: Path, key: str, value: dict[str, Any]) -> None:
    """Keep ``value`` as ``metrics[key]`` in the weights' metadata, with the command that made it (the claims the
    model card makes travel with the weights; the tensors, and so model_version, do not change)."""

    from model.checkpoint import load_checkpoint, rewrite_metadata
    from model.errors import CheckpointError

    model, meta = load_checkpoint(weights)
    metrics = dict(meta.get("metrics") or {})  # the other recorded metrics stay
    command = "oaml " + " ".join(sys.argv[1:]) if sys.argv[1:] else "oaml"
    if key == "lfw":  # the LFW report kept its command beside it, at the top level, before the suite existed
        metrics.update(lfw=value, command=command)
    else:
        metrics[key] = {**value, "command": command}
    meta["metrics"] = metrics
    try:
        rewrite_metadata(model, weights, meta, "recording metrics")
    except CheckpointError as exc:
        raise SystemExit(str(exc)) from exc


def _cmd_eval(args: argparse.Namespace) -> int:
    from model.calibration import Calibration
    from model.checkpoint import load_checkpoint
    from model.embedder import FLIP_TEST, Embedder

    suite = args.suite or ("lfw" if args.pairs is not None else "public")
    model, meta = load_checkpoint(args.weights)
    cal = Calibration.from_dict(meta["calibration"]) if "calibration" in meta else None
    args.out.mkdir(parents=True, exist_ok=True)
    if suite == "public" and args.rescore is not None:  # the kept scores are all it reads: no model runs
        return _eval_public(args, None, cal, None, meta)
    peer = None
    if args.peer == "sface":
        from model.training.teacher import SFaceTeacher

        # the distillation teacher is also the peer: SFace on the same aligned crops, unflipped
        peer = SFaceTeacher(threads=2)
    embedder = Embedder(
        model, device=args.device, precision=args.precision, flip=FLIP_TEST if args.flip is None else args.flip
    )
    if suite == "public":
        return _eval_public(args, embedder, cal, peer, meta)
    from model.training.evaluate import draw_roc, evaluate_lfw, markdown_report

    if args.lfw_cache is None or args.pairs is None:
        raise SystemExit("--suite lfw needs --lfw-cache and --pairs")
    report = evaluate_lfw(embedder, args.lfw_cache, args.pairs, args.occluders, cal, peer=peer)
    report["weights"] = {"file": str(args.weights), "model_version": meta["model_version"]}
    draw_roc(report, args.out / "roc.png")
    (args.out / "report.md").write_text(markdown_report(report))
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (args.out / "report.json").write_text(json.dumps(public, indent=2))
    if args.record:
        _record_metrics(args.weights, "lfw", public)
    sys.stdout.write(markdown_report(report) + "\n")
    return 0


def _eval_public(args: argparse.Namespace, embedder: Any, cal: Any, peer: Any, meta: dict[str, Any]) -> int:
    """``--suite public``: LFW, CFP-FP and CFP-FF, clean and occluded, one table (see model.training.suite)."""
    import numpy as np

    from model.calibration import Calibration
    from model.card_tables import SUITE
    from model.checkpoint import load_checkpoint
    from model.training.suite import SuiteModel, public_sets, run_suite, suite_table

    if args.also and (args.record or args.rescore):
        raise SystemExit("--also scores more models in one run: not with --record (one model's) or --rescore")
    files = [(args.weights, meta, args.out)]
    if args.rescore is not None:
        reports = [_rescored(args.rescore, meta, cal)]
        if args.record and (len(reports[0]["sets"]) < 3 or len(reports[0].get("subset", {})) < 4):
            raise SystemExit("--record takes the whole suite: the rescored run was not")
    else:
        shared = args.shared
        sets = public_sets(
            args.lfw_cache or args.data_root / "lfw",
            args.pairs or shared / "eval/lfw/pairs.txt",
            args.cfp or shared / "eval/cfp",
        )
        if not sets:
            raise SystemExit("no evaluation set found: run `make prepare-data` (LFW) and check --shared (CFP)")
        if args.folds:
            if args.record:
                raise SystemExit("--record takes the whole suite: not with --folds")
            sets = [s.subset(int(f) for f in args.folds.split(",")) for s in sets]
        elif args.record and len(sets) < 3:
            raise SystemExit("--record takes the whole suite: LFW, CFP-FP and CFP-FF must all be there")
        occluders = Path(args.occluders) if args.occluders else shared / "occluders"
        also = []
        for path in args.also:
            net, their = load_checkpoint(path)
            cal_of = Calibration.from_dict(their["calibration"]) if "calibration" in their else None
            also.append(SuiteModel(str(path), net, cal_of))
            files.append((path, their, args.out / path.stem))
        try:
            reports = run_suite(sets, embedder, occluders, cal, peer=peer, subset=not args.folds, also=also)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    for report, (path, their, out) in zip(reports, files, strict=True):
        report["weights"] = {"file": str(path), "model_version": their["model_version"]}
        out.mkdir(parents=True, exist_ok=True)
        pairs = report.pop("_pairs", None)
        if pairs:
            np.savez_compressed(out / "pairs.npz", **pairs)
        (out / "suite.json").write_text(json.dumps(report, indent=2))
        (out / "suite.md").write_text(suite_table(report) + "\n")
        if len(files) > 1:
            sys.stdout.write(f"{path} ({their['model_version']}):\n")
        sys.stdout.write(suite_table(report) + "\n")
    report, table = reports[0], suite_table(reports[0])
    if args.record:
        _record_metrics(args.weights, "suite", report)
        _record_card(args.weights, args.card, SUITE, table)
    return 0


def _record_card(weights: Path, card: Path | None, section: CardSection, table: str) -> None:
    """Write ``table`` as ``section`` (:mod:`model.card_tables`) of the model card (``card``, else the README.md
    beside the weights); a card without that section's markers is left alone, with a warning."""
    card = card or weights.parent / "README.md"
    if card.is_file() and section.present(card.read_text()):
        section.write(card, table)
    else:
        logging.getLogger(__name__).warning(
            "no model card with both markers of the %s table at %s: only the weights record it", section.name, card
        )


def _rescored(folder: Path, meta: dict[str, Any], cal: Any) -> dict[str, Any]:
    """``--rescore``: a kept run's report (``suite.json``, ``pairs.npz``) with the weights' calibration now."""
    import numpy as np

    from model.calibration import DEFAULT_CALIBRATION
    from model.training.suite import rescore

    try:
        report = json.loads((folder / "suite.json").read_text())
        with np.load(folder / "pairs.npz") as kept:
            pairs = {k: kept[k] for k in kept.files}
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--rescore needs {folder}/suite.json and pairs.npz of an earlier run: {exc}") from exc
    if report.get("weights", {}).get("model_version") != meta["model_version"]:
        raise SystemExit(
            f"{folder} holds the scores of {report.get('weights', {}).get('model_version')}, not of "
            f"{meta['model_version']}: the calibration of one model version rescores only its own run"
        )
    return rescore(report, pairs, cal or DEFAULT_CALIBRATION)


def _cmd_eval_identify(args: argparse.Namespace) -> int:

    from model.card_tables import OPEN_SET
    from oaml.openset_eval import evaluate_open_set, markdown_open_set

    peer = None
    if args.peer == "sface":
        from model.training.teacher import SFaceTeacher

        peer = SFaceTeacher(threads=2)
    sizes = tuple(None if s == "all" else int(s) for s in args.sizes.split(","))
    report = evaluate_open_set(
        args.weights, args.lfw_cache, args.occluders, sizes=sizes, strangers=args.strangers, peer=peer
    )
    table = markdown_open_set(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "open_set.json").write_text(json.dumps(report, indent=2))
        (args.out / "open_set.md").write_text(table + "\n")
    if args.record:
        _record_metrics(args.weights, "open_set", report)
        _record_card(args.weights, args.card, OPEN_SET, table)
    sys.stdout.write(table + "\n")
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_checkpoint
    from model.training.heads import HeadCache, build_cache, export_heads, load_heads, run_recipes
    from model.training.train import read_exclusions

    torch.set_num_threads(args.threads)
    root = Path(args.data_root)
    if args.step == "cache":
        build_cache(
            args.weights,
            [str(root / c) for c in args.labelled],
            [str(root / c) for c in args.unlabelled],
            args.out,
            root / "occluders",
            views=args.views,
            exclude=read_exclusions(args.exclude),
            max_views=args.max_views,
        )
    elif args.step == "train":
        report = run_recipes(
            HeadCache(args.cache), args.weights, args.out, steps=args.steps, data_root=root, only=args.recipe
        )
        sys.stdout.write(json.dumps({k: v["validation"] for k, v in report["recipes"].items()}, indent=2) + "\n")
    else:
        base, _ = load_checkpoint(args.weights)
        heads = load_heads(args.heads, base)
        recipe = torch.load(args.heads, weights_only=True)["config"]  # what the card's metadata says was trained
        written = export_heads(args.weights, heads, args.out, {"heads": str(args.heads), "recipe": recipe})
        sys.stdout.write(written["model_version"] + "\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.config import Settings, invalid_settings
    from service.server import serve

    overrides = {
        k: v for k, v in {"host": args.host, "port": args.port, "weights": args.weights}.items() if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        logger.error("cannot start: invalid settings: %s", invalid_settings(exc))
        return 2
    return serve(settings)


def _add_embedding_options(p: argparse.ArgumentParser) -> None:
    """Device and precision, with the service's defaults (OAML_DEVICE / OAML_PRECISION semantics)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu or cuda")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="autocast precision; auto is the service's rule (fp16 on CUDA, bf16 on CPUs with bf16)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oaml", description="Occlusion-aware face matching")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP service (settings from OAML_* environment variables)")
    p.add_argument("--host", default=None, help="default OAML_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default OAML_PORT or 8000")
    p.add_argument("--weights", type=Path, default=None, help="default OAML_WEIGHTS or the shipped weights")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("import-adaface", help="convert an official AdaFace Lightning .ckpt to OAML safetensors")
    p.add_argument("ckpt", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--arch", default=None, help="architecture (default: from hyper-parameters or key count)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.set_defaults(func=_cmd_import_adaface)

    p = sub.add_parser("prepare", help="detect and align a folder of face photos into a 112x112 training cache")
    p.add_argument("src", type=Path, help="one sub-folder per identity (or flat, with --filename-identity)")
    p.add_argument("dst", type=Path)
    p.add_argument(
        "--filename-identity", action="store_true", help="identity from file names: S1-P1-F-39-1.jpg -> S1-P1"
    )
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--threads", type=int, default=1, help="detector threads")
    p.add_argument("--limit", type=int, default=None, help="only the first N photos")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train the OAML model from a TOML config")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="run folder (checkpoints, logs); overrides the config")
    p.add_argument("--data-root", type=Path, default=None, help="prefix for relative `train` and `occluders` paths")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from OAML .safetensors (fp32/fp16/bf16) or AdaFace .ckpt weights, with a fresh optimiser",
    )
    p.add_argument("--budget-minutes", type=float, default=None, help="size the schedule to end inside this time")
    p.add_argument("--validate-every-s", type=float, default=None, help="validate by the clock (short epochs)")
    p.add_argument("--augment-workers", type=int, default=None, help="processes preparing batches ahead (GPU hosts)")
    p.add_argument("--max-samples", type=int, default=None, help="the run's length in faces drawn (instead of steps)")
    p.add_argument(
        "--preemptible",
        action="store_true",
        help="may be killed at any time: checkpoints every checkpoint_every_s (180 s) in generations, SIGTERM/SIGINT "
        "stop after the step with a checkpoint, the schedule counted in steps (refuses --budget-minutes)",
    )
    p.add_argument(
        "--offsite",
        type=Path,
        default=None,
        help="a folder on storage that outlives this machine (a mounted bucket, NFS): each checkpoint is copied "
        "there, and a run whose folder is behind or gone resumes from it (one folder a run: docs/training.md)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("train-status", help="a training run's progress, speed, checkpoints and validation curve")
    p.add_argument("run", type=Path, help="the run folder (--out of oaml train)")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_cmd_train_status)

    p = sub.add_parser(
        "train-control",
        help="check, pause, resume or stop (checkpoint and exit) a background run by its pid file (1: none)",
    )
    p.add_argument("run", type=Path, help="the run folder holding train.pid")
    p.add_argument("action", choices=["check", "pause", "resume", "stop"])
    p.add_argument("--wait", type=float, default=900.0, help="stop: seconds to wait for the checkpoint and exit")
    p.set_defaults(func=_cmd_train_control)

    p = sub.add_parser("bundle", help="pack aligned caches and training occluders into one small folder for a GPU run")
    p.add_argument("out", type=Path, help="a new, empty folder: usable as --data-root of `oaml train`")
    p.add_argument("--cache", type=Path, action="append", required=True, help="aligned cache to include (repeatable)")
    p.add_argument("--occluders", type=Path, default=None, help="occluder templates (the evaluation ones are left out)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the re-encoded crops")
    p.add_argument("--limit-mb", type=float, default=None, help="fail when the bundle is larger")
    p.add_argument("--teacher", action="store_true", help="include the SFace teacher for function matching (10 MB)")
    p.set_defaults(func=_cmd_bundle)

    p = sub.add_parser(
        "gpu-bundle",
        help="prepare a GPU run: the recipe's data in tar parts under --part-mb, its config, PARTS.json and run.sh",
    )
    p.add_argument("out", type=Path, help="the bundle folder (empty or new; /bundle at the repository root is ignored)")
    p.add_argument("--config", type=Path, required=True, help="the training recipe (TOML)")
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the recipe's caches and occluders")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the re-encoded crops")
    p.add_argument(
        "--part-mb",
        type=float,
        default=56.0,
        help="the largest part (MiB): 64 MiB a command, less the tree without weights",
    )
    p.add_argument("--init-from", type=Path, default=None, help="weights to start from (carried in fp16)")
    p.add_argument("--reserve-s", type=float, default=30.0, help="seconds of the budget kept for export and log")
    p.set_defaults(func=_cmd_gpu_bundle)

    p = sub.add_parser(
        "check-engine",
        help="may another engine serve the calibration? presets within 0.001 and LFW within 0.1 point "
        "(exit 1 if not); --record lets the service's auto engine choose it",
    )
    p.add_argument("weights", type=Path)
    p.add_argument("--engine", required=True, choices=["torch", "onnxruntime", "openvino"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the aligned training caches")
    p.add_argument("--holdout", action="append", default=[], help="the calibration's held-out caches (repeatable)")
    p.add_argument("--occluders", type=Path, default=None, help="occluder templates (default: <data-root>/occluders)")
    p.add_argument("--lfw-cache", type=Path, default=None, help="LFW's aligned cache (default: <data-root>/lfw)")
    p.add_argument("--pairs", type=Path, default=None, help="LFW pairs.txt (default: <shared>/eval/lfw/pairs.txt)")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="the shared data folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--reference",
        default="calibrated",
        choices=["calibrated", "fp32"],
        help="what the candidate is measured against: the calibration's own path (default), or PyTorch fp32, on a "
        "CPU that emulates the calibrated precision (bf16 without native bf16: hours)",
    )
    p.add_argument(
        "--record", action="store_true", help="keep the verdict in the calibration (calibration.engine_checks)"
    )
    p.set_defaults(func=_cmd_check_engine)

    p = sub.add_parser(
        "quantize",
        help="fit the int8 recipe (equalisation and ranges, model/quantize.py) on training crops and keep it in "
        "the weights' metadata (tensors and model_version unchanged); then check it with check-engine",
    )
    p.add_argument("weights", type=Path)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the aligned training caches")
    p.add_argument("--crops", type=int, default=512, help="training crops to fit on")
    p.add_argument("--alpha", type=float, default=0.5, help="equalisation balance (0: weights only, 1: inputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "calibrate", help="fit score fusion, preset thresholds and probabilities on identities held out of training"
    )
    p.add_argument("weights", type=Path)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the aligned training caches")
    p.add_argument(
        "--holdout",
        action="append",
        default=[],
        help="another aligned cache of identities the weights never saw (repeatable)",
    )
    p.add_argument("--occluders", default=None, help="occluder templates (default: <data-root>/occluders when present)")
    p.add_argument("--out", type=Path, default=None, help="output weights file (default: update in place)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="precision of the written weights",
    )
    _add_embedding_options(p)
    p.add_argument("--genuine-pairs", type=int, default=30000, help="most genuine pairs sampled")
    p.add_argument("--impostor-pairs", type=int, default=300000, help="most impostor pairs sampled")
    p.add_argument("--plot", type=Path, default=None, help="write the reliability diagram (PNG) here")
    p.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="an .npz that keeps the pairs' component scores: written when absent, read back (no embedding) when "
        "it holds this model version's scores of the same pairs on the same path",
    )
    p.add_argument(
        "--fusion",
        choices=["visibility", "quality"],
        default="visibility",
        help="the fusion's form: visibility (cosine and QAConv weighted by the pair's visibility) or quality "
        "(also by the pair's lower AdaFace feature norm); see model.calibration",
    )
    p.add_argument(
        "--export-check", action="store_true", help="also score the pairs at full precision and record the drift"
    )
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "calibrate-identify",
        help="fit /identify's open-set model (the stranger population behind its FPIR presets) on held-out identities",
    )
    p.add_argument("weights", type=Path)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the aligned training caches")
    p.add_argument("--holdout", action="append", default=[], help="another aligned cache of unseen identities")
    p.add_argument("--occluders", default=None, help="occluder templates (default: <data-root>/occluders when present)")
    p.add_argument("--out", type=Path, default=None, help="output weights file (default: update in place)")
    p.add_argument("--probes", type=int, default=3000, help="stranger probes scored against the gallery")
    _add_embedding_options(p)
    p.set_defaults(func=_cmd_calibrate_identify)

    p = sub.add_parser(
        "eval",
        help="the benchmark suite (public: LFW, CFP-FP, CFP-FF, clean and occluded; lfw: LFW's detailed protocols), "
        "with an optional SFace peer column",
    )
    p.add_argument("weights", type=Path)
    p.add_argument(
        "--suite",
        choices=["public", "lfw"],
        default=None,
        help="public (the default without --pairs): LFW, CFP-FP, CFP-FF in one table; lfw: LFW clean, mask and "
        "sunglasses with presets and ROC (the default with --pairs)",
    )
    p.add_argument("--data-root", type=Path, default=Path("../oaml_data"), help="prepared caches (make prepare-data)")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="the shared data folder")
    p.add_argument("--lfw-cache", type=Path, default=None, help="aligned LFW cache (default: <data-root>/lfw)")
    p.add_argument("--pairs", type=Path, default=None, help="LFW pairs.txt (default: <shared>/eval/lfw/pairs.txt)")
    p.add_argument(
        "--cfp", type=Path, default=None, help="CFP's aligned cache and pair lists (default: <shared>/eval/cfp)"
    )
    p.add_argument(
        "--occluders",
        type=Path,
        default=None,
        help="occluder templates (public: default <shared>/occluders; lfw: adds the mask and sunglasses protocols)",
    )
    p.add_argument("--folds", default=None, help="public suite: only these folds of every set, e.g. 1 (a quick look)")
    p.add_argument(
        "--card",
        type=Path,
        default=None,
        help="with --record, the model card whose suite table is replaced (default: README.md beside the weights)",
    )
    p.add_argument("--peer", choices=["none", "sface"], default="none")
    p.add_argument(
        "--rescore",
        type=Path,
        default=None,
        help="public suite: measure the weights' calibration on the component scores an earlier run of the same "
        "model version kept in that folder (suite.json, pairs.npz), embedding nothing",
    )
    p.add_argument(
        "--also",
        type=Path,
        nargs="+",
        default=[],
        help="public suite: more weights with the same trunk (heads-only releases, `oaml heads export`), scored "
        "from the same pass; each report in <out>/<file stem>/",
    )
    _add_embedding_options(p)
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip-test fusion (default: as served; preset rows only hold on the served path)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for suite.json and suite.md (lfw: report.json, report.md, roc.png)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="also store the report in the weights' metadata (`metrics`; tensors unchanged)",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "calibrate-attributes",
        help="fit the mask-like attribute's threshold on aligned caches and measure it on real masked photos",
    )
    p.add_argument("weights", type=Path)
    p.add_argument("--masked", type=Path, required=True, help="aligned cache of real masked faces (training side)")
    p.add_argument("--clean", type=Path, required=True, help="aligned cache of unmasked faces the weights never saw")
    p.add_argument(
        "--mask-photos", type=Path, default=None, help="evaluation photos: <dir>/mask/*.jpg and <dir>/no_mask/*.jpg"
    )
    p.add_argument("--limit", type=int, default=3000, help="most faces read from each cache")
    p.add_argument("--out", type=Path, default=None, help="output weights file (default: update in place)")
    _add_embedding_options(p)
    p.set_defaults(func=_cmd_calibrate_attributes)

    p = sub.add_parser(
        "eval-identify",
        help="open-set identification on LFW through the service: FPIR and DIR per preset, DIR@FPIR against SFace",
    )
    p.add_argument("weights", type=Path)
    p.add_argument("--lfw-cache", type=Path, required=True, help="LFW aligned cache (oaml prepare)")
    p.add_argument("--occluders", type=Path, default=None, help="occluder templates: also probe with occluded faces")
    p.add_argument("--sizes", default="100,1000,all", help="gallery sizes in people (all: as many as the data allow)")
    p.add_argument("--strangers", type=int, default=1000, help="people never enrolled whose photos probe")
    p.add_argument("--peer", choices=["none", "sface"], default="none")
    p.add_argument("--out", type=Path, default=None, help="folder for open_set.json and open_set.md")
    p.add_argument(
        "--record",
        action="store_true",
        help="store the report in the weights' metadata and write its table into the model card",
    )
    p.add_argument(
        "--card",
        type=Path,
        default=None,
        help="with --record, the model card whose open-set table is replaced (default: README.md beside the weights)",
    )
    p.set_defaults(func=_cmd_eval_identify)

    p = sub.add_parser("info", help="print the metadata of an OAML weights file")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "heads",
        help="the occlusion-aware heads on a frozen backbone: cache its trunk maps of training views, train the "
        "recipe and its ablation on them, export the chosen heads as new weights",
    )
    p.add_argument("step", choices=["cache", "train", "export"])
    p.add_argument("weights", type=Path, help="the weights whose backbone stays frozen")
    p.add_argument("--data-root", type=Path, default=Path("../oaml_data"))
    p.add_argument("--labelled", nargs="+", default=["celeba", "afdb", "lag", "fgnet"])
    p.add_argument("--unlabelled", nargs="*", default=["mask_unlabeled", "aflw2000"])
    p.add_argument("--exclude", nargs="*", default=["configs/overlap/lag_eval.txt"])
    p.add_argument("--views", type=int, default=4, help="views per labelled face: one clean, the rest occluded")
    p.add_argument("--max-views", type=int, default=None, help="cap on the labelled views cached (cache)")
    p.add_argument("--cache", type=Path, help="the cache folder (train)")
    p.add_argument("--heads", type=Path, help="the trained heads to export (export)")
    p.add_argument("--steps", type=int, default=None, help="steps per recipe (default: the recipe's)")
    p.add_argument(
        "--recipe", type=int, action="append", help="train only this recipe, by its number (repeatable; train)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_cmd_heads)

    from oaml.bulk import add_parser as add_bulk_enrol
    from oaml.migrate import add_parser as add_migrate
    from oaml.release import add_parser as add_train_release

    add_migrate(sub)
    add_train_release(sub)
    add_bulk_enrol(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("oaml", "model", "service"):
            raise
        # a client-only install (pip install '.[client]') has httpx and nothing of the server
        logger.error(
            "oaml %s needs %s, which is not installed: pip install '.[server]' in a checkout of OAML (make install)",
            args.command,
            exc.name,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
