"""A training run on a lent GPU, prepared here by ``oaml gpu-bundle`` and run there by ``bash BUNDLE/run.sh``.

A lease is short (about 10 minutes a command, 15 in all) and each command carries at most 64 MiB of files,
the project's tree included. So the bundle is a folder of parts:

- ``part-000.tar.gz`` ...: the training data (aligned caches as JPEG, their manifests, the training occluders,
  the folded SFace teacher, optionally the starting weights in fp16), each tar under ``--part-mb``;
- ``PARTS.json``: every part's size and SHA-256 and what the set holds; ``config.toml``: the recipe, its data
  paths relative to the unpacked data; ``run.sh``: the entry point.

Each command carries the bundle's small files and one or more parts. ``run.sh unpack`` unpacks the parts
it finds into ``BUNDLE/data`` (git-ignored, so the host keeps it between commands while it stays up) and
records each part it checked; ``run.sh BUDGET_S OUT`` unpacks what came with it, refuses to train unless
every part listed is unpacked (a run on part of the faces would be another experiment), trains inside the
budget, validates, exports the best weights in fp16 split into pieces under 16 MiB (what comes back from a
lent host is limited per file) and writes ``OUT/run.json``: timings, training images/s measured by the run
itself, the validation history, the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tarfile
import time
import tomllib
from pathlib import Path
from typing import Any

from model.digests import file_sha256

__all__ = ["pack_parts", "unpack_parts", "missing_parts", "split_file", "join_parts", "export_fp16", "main"]

logger = logging.getLogger("oaml.gpu_run")

_PROCESS_START = time.perf_counter()  # a budget counts from here: the interpreter's start, near enough
PARTS = "PARTS.json"
DATA = "data"
_DONE = ".parts"  # under DATA: one file per unpacked, checked part
#: pieces of the returned weights: under the device tool's per-file limit on what comes back
PIECE_BYTES = 15 * 2**20


def pack_parts(folder: Path, out: Path, part_bytes: int) -> list[dict[str, Any]]:
    """Pack ``folder``'s files into gzip'd tars ``out/part-NNN.tar.gz``, in path order, each at most
    ``part_bytes``. gzip takes away the tar headers and block padding (about 0.8 KB per crop, a fifth of a
    crop's bytes) and a little of the JPEG data itself."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    # gzip shrinks JPEGs a little too: start from an estimate that fills parts, repack a set that came out over
    for margin in (1.1, 1.06, 1.03, 1.0, 0.95, 0.9, 0.8):
        listed = _pack(folder, out, files, int(part_bytes * margin))
        if all(p["bytes"] <= part_bytes for p in listed):
            return listed
        for part in listed:
            (out / part["name"]).unlink()
    raise AssertionError(f"could not pack {folder} into parts of {part_bytes} bytes")


def _pack(folder: Path, out: Path, files: list[Path], target: int) -> list[dict[str, Any]]:
    """First fit, largest files first (a 48 MB starting-weights file would otherwise open a part of its own
    behind a half-full one); each part's members are then written in path order."""
    overhead = 100  # a member's compressed tar header and padding
    groups: list[list[Path]] = []
    sizes: list[int] = []
    for path in sorted(files, key=lambda p: -p.stat().st_size):
        need = path.stat().st_size + overhead
        if need > target:
            raise ValueError(f"{path} ({need} bytes) does not fit in a part of {target} bytes")
        room = next((i for i, used in enumerate(sizes) if used + need <= target), None)
        if room is None:
            groups.append([])
            sizes.append(0)
            room = len(groups) - 1
        groups[room].append(path)
        sizes[room] += need
    groups = [sorted(g) for g in groups]
    listed = []
    for number, members in enumerate(groups):
        name = f"part-{number:03d}.tar.gz"
        with tarfile.open(out / name, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
            for path in members:
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(folder)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with path.open("rb") as f:
                    tar.addfile(info, f)
        packed = (out / name).stat().st_size
        listed.append({"name": name, "bytes": packed, "sha256": file_sha256(out / name), "files": len(members)})
    return listed


def _safe_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders inside ``dest`` only: a part is data, and nothing in it may write elsewhere."""
    members = []
    for m in tar.getmembers():
        target = (dest / m.name).resolve()
        if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest.resolve()):
            raise ValueError(f"refusing tar member {m.name!r}: not a plain file inside the data folder")
        members.append(m)
    return members


def unpack_parts(bundle: Path) -> list[str]:
    """Unpack every part present in ``bundle`` whose checksum matches PARTS.json; returns the names unpacked."""
    listing = json.loads((bundle / PARTS).read_text())
    data = bundle / DATA
    (data / _DONE).mkdir(parents=True, exist_ok=True)
    done = []
    for part in listing["parts"]:
        path = bundle / part["name"]
        marker = data / _DONE / part["name"]
        if not path.exists():
            continue
        if marker.exists() and marker.read_text().strip() == part["sha256"]:
            continue
        if file_sha256(path) != part["sha256"]:
            raise ValueError(f"{part['name']}: checksum differs from {PARTS} (a truncated or stale upload)")
        with tarfile.open(path) as tar:
            members = _safe_members(tar, data)
            if hasattr(tarfile, "data_filter"):  # Python 3.12+ (and 3.11.4+): the standard library's check too
                tar.extractall(data, members=members, filter="data")
            else:
                tar.extractall(data, members=members)  # noqa: S202 (members checked above)
        marker.write_text(part["sha256"] + "\n")
        done.append(part["name"])
        logger.info("unpacked %s (%d files)", part["name"], part["files"])
    return done


def missing_parts(bundle: Path) -> list[str]:
    listing = json.loads((bundle / PARTS).read_text())
    data = bundle / DATA
    missing = []
    for part in listing["parts"]:
        marker = data / _DONE / part["name"]
        if not (marker.exists() and marker.read_text().strip() == part["sha256"]):
            missing.append(part["name"])
    return missing


def split_file(path: Path, piece_bytes: int = PIECE_BYTES) -> list[dict[str, Any]]:
    """``path`` -> ``path.000``, ``path.001``, ... each at most ``piece_bytes``; the original is removed."""
    pieces = []
    with path.open("rb") as f:
        for number in range(10_000):
            chunk = f.read(piece_bytes)
            if not chunk:
                break
            piece = path.with_name(f"{path.name}.{number:03d}")
            piece.write_bytes(chunk)
            pieces.append({"name": piece.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    path.unlink()
    return pieces


def join_parts(first_piece: Path, out: Path, expected_sha256: str | None = None) -> Path:
    """The inverse of :func:`split_file`: ``name.000``, ``name.001``, ... concatenated into ``out``."""
    stem = first_piece.name.rsplit(".", 1)[0]
    pieces = sorted(first_piece.parent.glob(f"{stem}.[0-9][0-9][0-9]"))
    with out.open("wb") as f:
        for piece in pieces:
            f.write(piece.read_bytes())
    if expected_sha256 is not None and file_sha256(out) != expected_sha256:
        out.unlink()
        raise ValueError(f"{out}: the joined pieces do not match the recorded checksum")
    return out


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _throughput(rates: list[float]) -> dict[str, float]:
    """Training images/s (every face through the network: labelled, unlabelled and mixed, timed around each
    step, validation excluded): the median over the run, and over the steps after the first 20 (warm)."""
    if not rates:
        return {}
    warm = rates[20:] or rates
    return {
        "median_img_per_s": round(statistics.median(rates), 1),
        "warm_median_img_per_s": round(statistics.median(warm), 1),
        "steps_timed": len(rates),
    }


def train(
    bundle: Path, budget_s: float, out: Path, started: float | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train on the unpacked bundle inside ``budget_s`` seconds (counted from ``started``, the process's start
    by default), export, write run.json.

    Only what comes back goes to ``out`` (the lent host returns a few files under 16 MiB each): run.json,
    steps.jsonl and the weights' pieces; the trainer's own folder (checkpoints of 100 MB) stays in
    ``bundle/run``. run.json is written even when the run fails or never validated, with what it has."""
    from model.training.train import TrainConfig, Trainer

    started = _PROCESS_START if started is None else started
    listing = json.loads((bundle / PARTS).read_text())
    reserve_s = listing.get("reserve_s", 30.0)  # the fp16 export, the split and run.json after the trainer ends
    cfg = TrainConfig.from_toml(bundle / "config.toml", **(overrides or {})).with_data_root(bundle / DATA)
    if listing.get("init_from"):  # starting weights that travelled in a part
        cfg.init_from = str(bundle / DATA / listing["init_from"])
    run_dir = bundle / "run"
    if run_dir.exists():  # a rerun on the same host starts afresh rather than resuming a stale schedule
        shutil.rmtree(run_dir)
    cfg.out = str(run_dir)
    cfg.budget_minutes = max(budget_s - reserve_s - (time.perf_counter() - started), 10.0) / 60.0
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "budget_s": budget_s,
        "bundle": {k: v for k, v in listing.items() if k != "parts"},
        "config": cfg.to_dict(),
        "machine": _machine(),
    }
    trainer = None
    try:
        trainer = Trainer(cfg)
        loaded_s = time.perf_counter() - started
        state = trainer.fit()
        trained_s = time.perf_counter() - started
        report.update(
            seconds={"load": round(loaded_s, 1), "train_and_validate": round(trained_s - loaded_s, 1)},
            steps=state["global_step"],
            epochs=state["epoch"],
            best_score=state["best_score"],
            throughput=_throughput(trainer.step_rates),
            history=state["history"],
        )
        source = run_dir / "best.safetensors"  # exported by every validation that improved the score
        if source.exists():
            weights = out / "weights"
            weights.mkdir(parents=True, exist_ok=True)
            exported = weights / "oaml_ir18_v3.fp16.safetensors"
            export_fp16(source, exported)
            digest = file_sha256(exported)
            report["weights"] = {"file": exported.name, "sha256": digest, "pieces": split_file(exported)}
        else:
            report["weights"] = None
            logger.error("no validation improved on the start: no weights to return")
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        if trainer is not None:
            report.update(throughput=_throughput(trainer.step_rates), history=trainer.state["history"])
        raise
    finally:
        report.setdefault("seconds", {})["total"] = round(time.perf_counter() - started, 1)
        (out / "run.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if (run_dir / "steps.jsonl").exists():
            shutil.copy2(run_dir / "steps.jsonl", out / "steps.jsonl")
    return report


def export_fp16(src: Path, dst: Path) -> None:
    """The weights as an fp16 serving file (half the bytes; the format the service and `oaml calibrate` read),
    with their metadata and a fresh content hash."""
    import torch

    from model.checkpoint import export_backbone, load_checkpoint

    model, meta = load_checkpoint(src)
    export_backbone(model, dst, torch.float16, {k: v for k, v in meta.items() if k not in ("model_version", "dtype")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("what", help="'unpack', or the budget in seconds")
    parser.add_argument("out", nargs="?", type=Path, help="where weights and run.json go (with a budget)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting (a TOML value), e.g. to smoke-test a bundle on a CPU: --set p=4 --set k=2",
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    bundle = args.bundle.resolve()
    unpacked = unpack_parts(bundle)
    logger.info("parts unpacked by this command: %s", ", ".join(unpacked) or "none")
    missing = missing_parts(bundle)
    if args.what == "unpack":
        logger.info("still to come: %s", ", ".join(missing) or "nothing: ready to train")
        return 0
    try:
        budget_s = float(args.what)
    except ValueError:
        parser.error("the first argument is 'unpack' or a budget in seconds")
    if args.out is None:
        parser.error("a budget needs an output folder")
    if missing:
        logger.error("refusing to train on a partial data set: missing %s (run.sh unpack with them first)", missing)
        return 3
    report = train(bundle, budget_s, args.out.resolve(), overrides=overrides)
    rate = report["throughput"].get("warm_median_img_per_s")
    weights = report["weights"]
    logger.info(
        "trained %d steps in %.0f s, %s training images/s (warm median), best validation score %.4f; weights: %s",
        report["steps"],
        report["seconds"]["total"],
        rate,
        report["best_score"],
        ", ".join(p["name"] for p in weights["pieces"]) if weights else "none",
    )
    return 0 if weights else 4


if __name__ == "__main__":
    sys.exit(main())
