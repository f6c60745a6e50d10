"""The GPU run's bundle and script, run on the CPU: parts, the refusal of a partial set, a one-minute training."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.training.bundle import make_gpu_bundle
from model.training.gpu_run import join_parts, missing_parts, pack_parts, split_file, unpack_parts
from tests.test_train import write_fake_cache

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
train = ["faces"]
unlabeled = ["more"]
unlabeled_per_batch = 2
unlabeled_weights = { more = 2.0 }
occluders = "occluders"
teacher_view = "matched"
teacher_weights = "teacher/sface.safetensors"
arch = "ir_18"
val_fraction = 0.1
p = 2
k = 2
lr = 0.05
warmup_steps = 2
epochs = 100000
validate_every_s = 8
checkpoint_every = 1000
qaconv_k_nearest = 2
val_pairs = 20
precision = "fp32"
threads = 2
deterministic = false
fused_optimizer = true
augment_on = "device"
occluder_bank = 16

[augment]
occlusion = 0.5
blur = 0.2
jpeg = 0.2
mix = 0.25
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    """A bundle of two small caches and the SFace teacher, in parts just larger than the teacher's file: the
    crops in one part, the teacher in another."""
    from model.training.teacher import SFaceTorch

    tmp = tmp_path_factory.mktemp("gpu")
    SFaceTorch.from_onnx().save(tmp / "teacher.safetensors")
    part_mb = ((tmp / "teacher.safetensors").stat().st_size + 200_000) / 2**20
    data = tmp / "data"
    write_fake_cache(data / "faces", astronaut, identities=20, per_identity=20)  # noisy crops: 1.5 MB
    write_fake_cache(data / "more", astronaut, identities=3, per_identity=2)
    (tmp / "recipe.toml").write_text(RECIPE)
    out = tmp / "bundle"
    make_gpu_bundle(out, tmp / "recipe.toml", data, quality=85, part_mb=part_mb, reserve_s=8)
    return out


def run_sh(bundle: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OAML_REPO": str(ROOT), "PYTHON": str(Path(os.sys.executable))}
    return subprocess.run(
        ["bash", str(bundle / "run.sh"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


class TestParts:
    def test_parts_hold_every_file_under_the_size_and_unpack_to_the_same_bytes(self, tmp_path: Path) -> None:
        src = tmp_path / "src"
        rng = np.random.default_rng(0)
        for i in range(30):
            (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
            (src / f"d{i % 3}" / f"{i}.bin").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
        out = tmp_path / "bundle"
        out.mkdir()
        parts = pack_parts(src, out, 100_000)
        assert len(parts) >= 6 and all(p["bytes"] <= 100_000 for p in parts)
        assert sum(p["files"] for p in parts) == 30
        (out / "PARTS.json").write_text(json.dumps({"parts": parts}))
        assert missing_parts(out) == [p["name"] for p in parts]
        assert unpack_parts(out) == [p["name"] for p in parts] and missing_parts(out) == []
        for f in src.rglob("*.bin"):
            assert (out / "data" / f.relative_to(src)).read_bytes() == f.read_bytes()
        assert unpack_parts(out) == []  # already unpacked and checked: nothing to do

    def test_a_damaged_or_hostile_part_is_refused(self, tmp_path: Path) -> None:
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.bin").write_bytes(b"x" * 1000)
        out = tmp_path / "bundle"
        out.mkdir()
        parts = pack_parts(src, out, 10_000)
        (out / "PARTS.json").write_text(json.dumps({"parts": parts}))
        part = out / parts[0]["name"]
        part.write_bytes(part.read_bytes()[:-10])  # truncated upload
        with pytest.raises(ValueError, match="checksum"):
            unpack_parts(out)
        # a part whose checksum matches but that writes outside the data folder
        evil = out / "part-000.tar.gz"
        with tarfile.open(evil, "w:gz") as tar:
            info = tarfile.TarInfo("../escaped.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        from model.digests import file_sha256

        parts[0]["sha256"] = file_sha256(evil)
        (out / "PARTS.json").write_text(json.dumps({"parts": parts}))
        with pytest.raises(ValueError, match="refusing"):
            unpack_parts(out)
        assert not (out / "escaped.txt").exists()

    def test_split_and_join_give_back_the_file(self, tmp_path: Path) -> None:
        blob = np.random.default_rng(1).integers(0, 256, 2_500_000, dtype=np.uint8).tobytes()
        path = tmp_path / "w.safetensors"
        path.write_bytes(blob)
        import hashlib

        pieces = split_file(path, piece_bytes=1_000_000)
        assert [p["bytes"] for p in pieces] == [1_000_000, 1_000_000, 500_000] and not path.exists()
        joined = join_parts(tmp_path / pieces[0]["name"], tmp_path / "joined", hashlib.sha256(blob).hexdigest())
        assert joined.read_bytes() == blob


class TestGpuRunOnTheCpu:
    def test_the_bundle_lists_its_parts_recipe_and_script(self, bundle: Path) -> None:
        listing = json.loads((bundle / "PARTS.json").read_text())
        assert len(listing["parts"]) >= 2 and listing["caches"] == {"faces": 400, "more": 6}
        assert max(p["bytes"] for p in listing["parts"]) <= 11 * 2**20
        assert (bundle / "config.toml").read_text() == RECIPE and os.access(bundle / "run.sh", os.X_OK)

    def test_unpack_then_refuse_a_partial_set_then_train_inside_the_budget(self, bundle: Path, tmp_path: Path) -> None:
        listing = json.loads((bundle / "PARTS.json").read_text())
        last = bundle / listing["parts"][-1]["name"]
        held = tmp_path / last.name
        last.rename(held)  # this command carried every part but the last
        unpacked = run_sh(bundle, "unpack")
        assert unpacked.returncode == 0, unpacked.stdout + unpacked.stderr
        assert f"still to come: {last.name}" in unpacked.stdout
        refused = run_sh(bundle, "60", str(tmp_path / "out"))
        assert refused.returncode == 3 and "partial data set" in refused.stdout
        assert not (tmp_path / "out" / "run.json").exists()

        held.rename(last)  # the next command carries the last part and trains
        budget = 50
        started = time.monotonic()
        done = run_sh(bundle, str(budget), str(tmp_path / "out"), "--set", "qaconv_k_nearest=3")
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "training images/s" in done.stdout
        report = json.loads((tmp_path / "out" / "run.json").read_text())
        assert report["steps"] >= 1 and report["seconds"]["total"] <= budget + 5 and report["history"]
        assert elapsed < budget + 40  # interpreter start and imports on top of the budget
        assert report["throughput"]["warm_median_img_per_s"] > 0
        assert report["config"]["augment_on"] == "device" and report["config"]["unlabeled_weights"] == {"more": 2.0}
        assert report["config"]["qaconv_k_nearest"] == 3  # --set overrides the recipe (a smoke test's batch size)
        pieces = report["weights"]["pieces"]
        assert pieces and all(p["bytes"] <= 15 * 2**20 for p in pieces)
        weights = join_parts(
            tmp_path / "out" / "weights" / pieces[0]["name"], tmp_path / "w.safetensors", report["weights"]["sha256"]
        )
        model, meta = load_checkpoint(weights)
        assert meta["dtype"] == "float16"  # an fp16 serving file
        with torch.no_grad():
            emb = model.float()(torch.zeros(1, 3, 112, 112))[0]
        assert emb.shape == (1, 512) and bool(torch.isfinite(emb).all())
