"""The ``oaml`` command line: one entry point, a sub-command per task."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("oaml")


def _cmd_import_adaface(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import export_backbone, import_adaface_ckpt, save_checkpoint

    model, report = import_adaface_ckpt(args.ckpt, arch=args.arch)
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
    from model.prepare import prepare

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
    from model.train import TrainConfig, Trainer

    overrides = {
        "out": str(args.out) if args.out else None,
        "max_steps": args.max_steps,
        "epochs": args.epochs,
        "init_from": str(args.init_from) if args.init_from else None,
    }
    cfg = TrainConfig.from_toml(args.config, **overrides)
    if args.data_root is not None:
        cfg.train = [str(Path(args.data_root) / p) if not Path(p).is_absolute() else p for p in cfg.train]
        if cfg.occluders and not Path(cfg.occluders).is_absolute():
            cfg.occluders = str(Path(args.data_root) / cfg.occluders)
    state = Trainer(cfg).fit()
    json.dump({"global_step": state["global_step"], "epoch": state["epoch"], "best_score": state["best_score"]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from model.calibration import export_check, fit_calibration
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.evaluate import validation_scores
    from model.train import TrainConfig, load_training_data, split_by_identity

    model, meta = load_checkpoint(args.weights)
    cfg = TrainConfig.from_dict(meta["training"]["config"])
    root = Path(args.data_root)
    caches = [p if Path(p).is_absolute() else str(root / Path(p).name) for p in cfg.train]
    data = load_training_data(caches)
    _, val_idx = split_by_identity(data.labels, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        raise SystemExit("the weights were trained without a validation split: nothing to calibrate on")
    occluders = args.occluders or (str(root / "occluders") if (root / "occluders").exists() else None)
    scores = validation_scores(model, data.images[val_idx], data.labels[val_idx], data.landmarks[val_idx], occluders, seed=cfg.seed)
    cal = fit_calibration(scores["cos"], scores["qa"], scores["visibility"], scores["same"])
    meta["calibration"] = cal.to_dict()
    meta["calibration"]["source"] = f"validation split: {len(np.unique(data.labels[val_idx]))} identities held out of training"
    out = args.out or args.weights
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    if dtype is not None:
        # the served weights are the rounded ones: measure what rounding costs on the same pairs
        rounded = copy.deepcopy(model).to(dtype).float()
        exported = validation_scores(rounded, data.images[val_idx], data.labels[val_idx], data.landmarks[val_idx], occluders, seed=cfg.seed)
        meta["export_check"] = export_check(cal, scores, exported, args.dtype)
    written = save_checkpoint(model, out, {k: v for k, v in meta.items() if k not in ("content_sha256", "model_version", "dtype")}, dtype=dtype)
    json.dump({"weights": str(out), "model_version": written["model_version"], "calibration": cal.to_dict()}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from model.calibration import Calibration
    from model.checkpoint import load_checkpoint
    from model.evaluate import draw_roc, evaluate_lfw, markdown_report

    model, meta = load_checkpoint(args.weights)
    cal = Calibration.from_dict(meta["calibration"]) if "calibration" in meta else None
    peer = None
    if args.peer == "sface":
        from model.teacher import SFaceTeacher

        # the distillation teacher is also the peer: SFace on the same aligned crops, unflipped
        peer = SFaceTeacher(threads=2)
    report = evaluate_lfw(model, args.lfw_cache, args.pairs, args.occluders, cal, peer=peer, precision=args.precision, flip=not args.no_flip)
    report["weights"] = {"file": str(args.weights), "model_version": meta["model_version"]}
    args.out.mkdir(parents=True, exist_ok=True)
    draw_roc(report, args.out / "roc.png")
    (args.out / "report.md").write_text(markdown_report(report))
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (args.out / "report.json").write_text(json.dumps(public, indent=2))
    sys.stdout.write(markdown_report(report) + "\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "weights": args.weights}.items() if v is not None}
    settings = Settings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, workers=1)
    return 0


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
    p.add_argument("--filename-identity", action="store_true", help="identity from file names: S1-P1-F-39-1.jpg -> S1-P1")
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
    p.add_argument("--init-from", type=Path, default=None, help="start from OAML .safetensors or AdaFace .ckpt weights")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="fit score fusion and preset thresholds on the weights' validation split")
    p.add_argument("weights", type=Path)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the aligned training caches")
    p.add_argument("--occluders", default=None, help="occluder templates (default: <data-root>/occluders when present)")
    p.add_argument("--out", type=Path, default=None, help="output weights file (default: update in place)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="precision of the written weights")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("eval", help="LFW 6000 pairs, clean and synthetically occluded, with an optional SFace peer row")
    p.add_argument("weights", type=Path)
    p.add_argument("--lfw-cache", type=Path, required=True, help="aligned LFW cache made by `oaml prepare`")
    p.add_argument("--pairs", type=Path, required=True, help="LFW pairs.txt")
    p.add_argument("--occluders", type=Path, default=None, help="occluder templates; adds the mask and sunglasses protocols")
    p.add_argument("--peer", choices=["none", "sface"], default="none")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-flip", action="store_true", help="skip flip-test fusion (faster)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md, roc.png")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("info", help="print the metadata of an OAML weights file")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
