"""Backbone engines: OpenVINO and ONNX Runtime run the exported graph with PyTorch's numbers in fp32; bf16 on
OpenVINO only where the weights' calibration vouches for it; one rule chooses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model import engines
from model.card import WeightsCard
from model.checkpoint import load_checkpoint
from model.embedder import Embedder
from model.engines import select_engine
from service.app import create_app
from tests.test_service import make_settings, png


def test_the_engine_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    vouched = {("openvino", "bfloat16")}
    assert select_engine("auto", cpu, None) == "openvino"  # fp32 on a CPU (no native bf16): the same numbers
    assert select_engine("auto", cpu, torch.bfloat16) == "torch"  # the calibrated bf16 path: nothing vouched
    assert select_engine("auto", cpu, torch.bfloat16, {("openvino", "float32")}) == "torch"
    assert select_engine("auto", cpu, torch.bfloat16, vouched) == "openvino"
    assert select_engine("auto", cuda, torch.float16, vouched) == "torch"
    monkeypatch.setattr(engines, "openvino_available", lambda: False)  # a platform without OpenVINO's wheels
    assert select_engine("auto", cpu, None) == "onnxruntime"
    assert select_engine("auto", cpu, torch.bfloat16, vouched) == "torch"
    monkeypatch.undo()
    assert select_engine("torch", cpu, None) == "torch"
    with pytest.raises(ValueError, match="fp32"):
        select_engine("onnxruntime", cpu, torch.bfloat16)
    with pytest.raises(ValueError):
        select_engine("tensorrt", cpu, None)
    assert select_engine("openvino", cpu, torch.bfloat16) == "openvino"  # forced: allowed, unvouched
    with pytest.raises(ValueError):
        select_engine("openvino", cuda, torch.float16)


def test_openvino_f32_gives_torchs_fp32_features(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path / "cache"))
    model, meta = load_checkpoint(weights)
    crops = np.random.default_rng(1).integers(0, 255, size=(3, 112, 112, 3), dtype=np.uint8)
    reference = Embedder(model, device="cpu", precision="fp32", engine="torch")(crops)
    got = Embedder(model, device="cpu", precision="fp32", engine="openvino", version=meta["model_version"])(crops)
    for name in ("embedding", "norm", "occlusion", "feature_map"):
        torch.testing.assert_close(getattr(got, name), getattr(reference, name), atol=5e-4, rtol=1e-3)


def test_onnxruntime_gives_torchs_fp32_features(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path / "cache"))
    model, meta = load_checkpoint(weights)
    crops = np.random.default_rng(0).integers(0, 255, size=(5, 112, 112, 3), dtype=np.uint8)
    reference = Embedder(model, device="cpu", precision="fp32", engine="torch")(crops)
    onnx = Embedder(model, device="cpu", precision="fp32", engine="onnxruntime", version=meta["model_version"])
    got = onnx(crops)
    assert onnx.engine == "onnxruntime" and onnx.describe()["engine"] == "onnxruntime"
    for name in ("embedding", "norm", "occlusion", "feature_map"):
        torch.testing.assert_close(getattr(got, name), getattr(reference, name), atol=5e-4, rtol=1e-3)
    exported = list((tmp_path / "cache").glob("*.onnx"))
    assert len(exported) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    stamp = exported[0].stat().st_mtime_ns
    Embedder(model, device="cpu", precision="fp32", engine="onnxruntime", version=meta["model_version"])
    assert exported[0].stat().st_mtime_ns == stamp  # the next start reads the export, it does not redo it


def test_the_service_says_which_engine_and_answers_alike(
    weights: Path, tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path / "cache"))
    mirrored = png(np.ascontiguousarray(astronaut[:, ::-1]))
    files = {"image_a": ("a.png", png(astronaut), "image/png"), "image_b": ("b.png", mirrored, "image/png")}
    answers = {}
    for engine in ("torch", "onnxruntime"):
        settings = make_settings(weights, tmp_path / engine, precision="fp32", engine=engine)
        with TestClient(create_app(settings)) as c:
            assert c.get("/info").json()["engine"] == engine
            r = c.post("/verify", files=files)
            assert r.status_code == 200, r.text
            answers[engine] = r.json()
    assert abs(answers["torch"]["score"] - answers["onnxruntime"]["score"]) < 1e-3
    assert answers["torch"]["match"] == answers["onnxruntime"]["match"]


def test_the_card_vouches_only_for_passed_checks() -> None:
    _, meta = load_checkpoint(Path(__file__).resolve().parents[1] / "weights" / "oaml_ir18.safetensors")
    checks = [
        {"engine": "openvino", "precision": "bfloat16", "passes": True, "isa": "amx"},
        {"engine": "onnxruntime", "precision": "int8", "passes": False, "isa": "amx"},
        {"engine": "openvino", "precision": "float16", "passes": "yes", "isa": "amx"},  # not a verdict
    ]
    card = WeightsCard.from_metadata({**meta, "calibration": {**meta["calibration"], "engine_checks": checks}})
    assert card.vouched_for("amx") == {("openvino", "bfloat16")} and card.vouched_for("avx512_bf16") == frozenset()
    assert card.vouched_classes("openvino", "bfloat16") == ["amx"]
    recalibrated = {**meta, "calibration": {k: v for k, v in meta["calibration"].items() if k != "engine_checks"}}
    assert WeightsCard.from_metadata(recalibrated).engine_checks == frozenset()


def test_a_recorded_check_replaces_the_same_engines_older_one() -> None:
    from model.training.engine_check import with_engine_check

    meta = {"calibration": {"thresholds": {}, "engine_checks": [
        {"engine": "openvino", "precision": "bfloat16", "passes": False, "isa": "amx"},
        {"engine": "openvino", "precision": "float32", "passes": True, "isa": "amx"},
        {"engine": "openvino", "precision": "bfloat16", "passes": True, "isa": "avx512_bf16"},  # another class stays
    ]}}  # fmt: skip
    report = {"engine": "openvino", "precision": "bfloat16", "passes": True, "isa": "amx"}
    out = with_engine_check(meta, report, "oaml x")
    checks = out["calibration"]["engine_checks"]
    assert [(c["precision"], c["isa"], c["passes"]) for c in checks] == [
        ("float32", "amx", True), ("bfloat16", "avx512_bf16", True), ("bfloat16", "amx", True)
    ]  # fmt: skip
    assert checks[-1]["command"] == "oaml x" and meta["calibration"]["engine_checks"][0]["passes"] is False
