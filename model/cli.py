"""The ``oaml`` command line: one entry point, a sub-command per task."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oaml", description="Occlusion-aware face matching")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-adaface", help="convert an official AdaFace Lightning .ckpt to OAML safetensors")
    p.add_argument("ckpt", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--arch", default=None, help="architecture (default: from hyper-parameters or key count)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.set_defaults(func=_cmd_import_adaface)

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
